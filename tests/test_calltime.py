"""Maximum call duration (proxy/calltime.py and its glue in ProxyCore), sans-IO with a fake
clock: the proxy ends an answered call at its limit with a BYE to each side, in that side's
own dialog, and refuses the dialog's requests afterwards."""

from __future__ import annotations

import pytest

from proxy.bindings.model import Outcome, Resolution
from proxy.calltime import CSEQ_MARGIN, lowest_limit
from proxy.core import ProxyCore
from proxy.records.tracker import CallTracker
from proxy.sip.message import build_response, parse_message
from tests.test_core import CALLER, GATEWAY, A, B, Dialog, X, make_core, request

PROXY_UPSTREAM = "<sip:127.0.0.9:5080;lr>"  # a proxy on the caller's side of us
PROXY_DOWNSTREAM = "<sip:127.0.0.8:5082;lr>"  # and one on the callee's side


def call(core: ProxyCore, resolution: Resolution, *, webhook_s: float | None = None,
         upstream_rr: bool = False, downstream_rr: bool = False) -> dict:
    """A→X→B answered at t=0.1; what each side received, and the callee's Call-ID."""
    rows = [f"INVITE sip:{X}@127.0.0.1:5060 SIP/2.0",
            "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-a-1;rport",
            f"From: \"{A}\" <sip:{A}@127.0.0.1>;tag=atag", f"To: <sip:{X}@127.0.0.1>",
            "Call-ID: call-1", "CSeq: 7 INVITE", f"Contact: <sip:{A}@127.0.0.1:5070>",
            "Max-Forwards: 70"]
    if upstream_rr:
        rows.append(f"Record-Route: {PROXY_UPSTREAM}")
    core.receive_datagram(request(rows), CALLER, "udp", 0.0)
    relay, _x, _caller = core.lookups.pop()
    relay.max_call_s = webhook_s
    core.complete_lookup(relay, resolution, 0.0)
    (invite,) = [parse_message(o.data) for o in core.outbox if o.dest == GATEWAY]
    core.outbox.clear()
    rrs = [v for v in invite.header_values("record-route")]
    if downstream_rr:
        rrs.insert(0, PROXY_DOWNSTREAM)
    ok = build_response(invite, 200, "OK", to_tag="btag",
                        headers=[*(("Record-Route", r) for r in rrs),
                                 ("Contact", f"<sip:{B}@127.0.0.1:5090>")])
    core.receive_datagram(ok.serialize(), GATEWAY, "udp", 0.1)
    (answer,) = [parse_message(o.data) for o in core.outbox if o.dest == CALLER]
    core.outbox.clear()
    return {"invite": invite, "ok": answer}


def byes(core: ProxyCore) -> dict:
    out = {}
    for o in core.outbox:
        msg = parse_message(o.data)
        if msg.is_request and msg.method == "BYE":
            out[o.dest] = (msg, o.data)
    return out


def route(b: str = B) -> Resolution:
    return Resolution(Outcome.ROUTE, b, 1e12)


def test_lowest_limit_ignores_unset_ones() -> None:
    assert lowest_limit(None, 30, None, 20.5) == 20.5
    assert lowest_limit(None, None) is None


def test_global_cap_ends_the_call_with_a_bye_in_each_sides_own_dialog() -> None:
    core = make_core(max_call_s=3.0)
    d = Dialog(core)  # answered at t=0.1
    d.from_caller("INFO", now=1.0)  # CSeq 2 from A
    d.from_callee("INFO", now=1.5)  # CSeq 2 from B
    core.outbox.clear()
    core.handle_timers(3.0)
    assert byes(core) == {}
    assert core.next_deadline() == pytest.approx(3.1, abs=0.011)
    core.handle_timers(3.11)
    sent = byes(core)
    assert set(sent) == {CALLER, GATEWAY}
    to_a, raw_a = sent[CALLER]
    to_b, raw_b = sent[GATEWAY]
    # the caller's: its Call-ID and Contact, the callee as the caller knows it (X, B's tag)
    assert to_a.uri_text == f"sip:{A}@127.0.0.1:5070" and to_a.call_id == d.caller_call_id
    assert to_a.from_.uri.user == X and to_a.from_.tag == "btag"
    assert to_a.to.uri.user == A and to_a.to.tag == "atag"
    assert to_a.cseq == (2 + CSEQ_MARGIN, "BYE")  # past B's INFO, in B's CSeq space
    assert B.encode() not in raw_a
    # the callee's: its own Call-ID and Contact, the caller as X with A's tag
    assert to_b.uri_text == f"sip:{B}@127.0.0.1:5090" and to_b.call_id == d.callee_call_id
    assert to_b.from_.uri.user == X and to_b.from_.tag == "atag" and to_b.to.tag == "btag"
    assert to_b.cseq == (2 + CSEQ_MARGIN, "BYE")  # past A's INFO, in A's CSeq space
    assert A.encode() not in raw_b
    assert core.stats["calls_ended_max_duration"] == 1
    # both answer 200: absorbed, nothing forwarded
    core.outbox.clear()
    for msg, dest in ((to_a, CALLER), (to_b, GATEWAY)):
        core.receive_datagram(build_response(msg, 200, "OK").serialize(), dest, "udp", 3.2)
    assert core.outbox == [] and core.stats["proxy_byes_answered"] == 2
    # the dialog is over: its requests get 481, from either side
    d.from_caller("INFO", branch="a-9", now=4.0)
    d.from_callee("INFO", branch="b-9", now=4.0)
    assert sorted(parse_message(o.data).status for o in core.outbox) == [481, 481]
    assert [o.dest for o in core.outbox] == [CALLER, GATEWAY]
    # and the state goes after a while
    core.outbox.clear()
    core.handle_timers(200.0)
    assert core._limited == {} and core.next_deadline() is None


def test_bye_is_retransmitted_over_udp_until_answered() -> None:
    core = make_core(max_call_s=3.0)
    Dialog(core)
    core.handle_timers(3.11)
    assert len(byes(core)) == 2
    core.outbox.clear()
    core.handle_timers(3.11 + 0.51)  # Timer E: T1
    assert set(byes(core)) == {CALLER, GATEWAY}
    to_b = byes(core)[GATEWAY][0]
    core.outbox.clear()
    core.receive_datagram(build_response(to_b, 200, "OK").serialize(), GATEWAY, "udp", 3.7)
    core.handle_timers(3.11 + 1.52)  # Timer E: 2·T1 later, only the unanswered one again
    assert set(byes(core)) == {CALLER}
    core.outbox.clear()
    core.handle_timers(40.0)  # Timer F: given up, no more
    core.outbox.clear()
    core.handle_timers(41.0)
    assert byes(core) == {} and core.stats["proxy_bye_timeouts"] == 1


@pytest.mark.parametrize(("resolution", "settings", "webhook_s", "ends_at"), [
    (Resolution(Outcome.ROUTE, B, 1e12, max_call_s=2), {"max_call_s": 10.0}, None, 2.1),
    (Resolution(Outcome.ROUTE, B, 1e12, max_call_s=20, tenant="shop"),
     {"max_call_s": 10.0, "tenant_max_call_s": {"shop": 5.0}}, None, 5.1),
    (Resolution(Outcome.ROUTE, B, 1e12, tenant="other"),
     {"tenant_max_call_s": {"shop": 5.0}}, None, None),
    (Resolution(Outcome.ROUTE, B, 1e12, max_call_s=20), {}, 1.5, 1.6),
    (route(), {"max_call_s": 4.0}, 9.0, 4.1),
])
def test_the_lowest_limit_wins(resolution: Resolution, settings: dict,
                               webhook_s: float | None, ends_at: float | None) -> None:
    core = make_core(**settings)
    call(core, resolution, webhook_s=webhook_s)
    if ends_at is None:
        assert core._limited == {}  # no limit: no state at all
        core.handle_timers(100_000.0)
        assert byes(core) == {}
        return
    core.handle_timers(ends_at - 0.02)
    assert byes(core) == {}
    core.handle_timers(ends_at + 0.011)
    assert set(byes(core)) == {CALLER, GATEWAY}


def test_route_sets_follow_each_sides_record_route() -> None:
    core = make_core(max_call_s=3.0, is_allowed_next_hop=lambda ip: ip.startswith("127.0.0."))
    seen = call(core, route(), upstream_rr=True, downstream_rr=True)
    assert seen["ok"].header_values("record-route")[0] == PROXY_DOWNSTREAM
    core.handle_timers(3.2)
    sent = byes(core)
    # each BYE goes to the first proxy of its side's route set, the Contact as Request-URI
    assert set(sent) == {("127.0.0.9", 5080), ("127.0.0.8", 5082)}
    to_a = sent[("127.0.0.9", 5080)][0]
    to_b = sent[("127.0.0.8", 5082)][0]
    assert to_a.header_values("route") == [PROXY_UPSTREAM]
    assert to_b.header_values("route") == [PROXY_DOWNSTREAM]
    assert to_a.uri_text == f"sip:{A}@127.0.0.1:5070" and to_b.uri_text == f"sip:{B}@127.0.0.1:5090"
    assert to_b.cseq == (7 + CSEQ_MARGIN, "BYE")  # the caller's INVITE CSeq was 7
    assert A.encode() not in sent[("127.0.0.8", 5082)][1]


def test_a_hangup_before_the_limit_leaves_nothing_behind() -> None:
    core = make_core(max_call_s=3.0)
    d = Dialog(core)
    assert len(core._limited) == 2  # one call, by each side's Call-ID
    d.from_callee("BYE", now=1.0)
    assert core._limited == {} and core._limit_wheel.next_deadline() is None
    core.outbox.clear()
    core.handle_timers(10.0)
    assert byes(core) == {}


def test_a_target_refresh_moves_the_bye() -> None:
    core = make_core(max_call_s=3.0, is_allowed_next_hop=lambda ip: ip.startswith("127.0.0."))
    d = Dialog(core)
    d.core.receive_datagram(request([
        f"UPDATE {d.caller_contact.strip('<>')} SIP/2.0",
        "Via: SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bK-b-upd",
        f"Route: {d.callee_route}",
        f"From: <sip:{X}@127.0.0.1>;tag=btag", f"To: <sip:{X}@127.0.0.1>;tag=atag",
        f"Call-ID: {d.callee_call_id}", "CSeq: 40 UPDATE",
        f"Contact: <sip:{B}@127.0.0.5:5099>", "Max-Forwards: 70",
    ]), GATEWAY, "udp", 1.5)
    core.outbox.clear()
    core.handle_timers(3.2)
    sent = byes(core)
    assert set(sent) == {CALLER, ("127.0.0.5", 5099)}
    assert sent[("127.0.0.5", 5099)][0].uri_text == f"sip:{B}@127.0.0.5:5099"
    assert sent[CALLER][0].cseq == (40 + CSEQ_MARGIN, "BYE")


def test_the_record_says_the_proxy_released_the_call() -> None:
    core = make_core(max_call_s=3.0)
    core.calls = CallTracker("test", wall_offset=1_800_000_000.0)
    Dialog(core)
    core.calls.out.clear()
    core.handle_timers(3.2)
    (record,) = [op[1] for op in core.calls.out if op[0] == "record"]
    # released at the limit, 3 s after the answer (not at the tick that noticed it)
    assert record["release_dir"] == "proxy" and record["talk_s"] == "3"
    assert record["release_at"] == "2027-01-15T08:00:03.100Z"


def test_logs_mask_the_call_and_name_the_reason() -> None:
    lines: list[tuple[str, dict]] = []
    core = make_core(max_call_s=3.0)
    core.log = lambda event, **kw: lines.append((event, kw))
    Dialog(core, call_id="call-13800000001")
    core.handle_timers(3.2)
    (ended,) = [kw for event, kw in lines if event == "call_ended"]
    assert ended["reason"] == "max_call_duration" and ended["max_call_s"] == 3.0
    assert "13800000001" not in repr(ended)


def test_a_caller_on_tcp_gets_its_bye_down_its_own_connection() -> None:
    core = make_core(max_call_s=3.0)
    core.receive_datagram(request([
        f"INVITE sip:{X}@127.0.0.1:5060;transport=tcp SIP/2.0",
        "Via: SIP/2.0/TCP 127.0.0.1:5070;branch=z9hG4bK-t-1",
        f"From: <sip:{A}@127.0.0.1>;tag=atag", f"To: <sip:{X}@127.0.0.1>",
        "Call-ID: tcp-1", "CSeq: 1 INVITE",
        f"Contact: <sip:{A}@127.0.0.1:5070;transport=tcp>", "Max-Forwards: 70",
    ]), CALLER, "tcp", 0.0)
    relay, _x, _caller = core.lookups.pop()
    core.complete_lookup(relay, route(), 0.0)
    (invite,) = [parse_message(o.data) for o in core.outbox if o.dest == GATEWAY]
    core.outbox.clear()
    ok = build_response(invite, 200, "OK", to_tag="btag",
                        headers=[("Record-Route", v) for v in invite.header_values("record-route")]
                        + [("Contact", f"<sip:{B}@127.0.0.1:5090>")])
    core.receive_datagram(ok.serialize(), GATEWAY, "udp", 0.1)
    core.outbox.clear()
    core.handle_timers(3.2)
    legs = {o.dest: o for o in core.outbox}
    assert set(legs) == {CALLER, GATEWAY}
    assert legs[CALLER].transport == "tcp" and legs[CALLER].flow is not None
    assert legs[CALLER].flow[1:] == CALLER  # the connection A opened to us
    assert b"Via: SIP/2.0/TCP " in legs[CALLER].data
    assert legs[GATEWAY].transport == "udp"
    core.handle_timers(3.8)  # reliable: no retransmission towards A, one towards B (Timer E)
    assert [o.dest for o in core.outbox[2:]] == [GATEWAY]


def test_a_call_the_proxy_ends_frees_its_place_under_the_concurrency_caps() -> None:
    core = make_core(max_call_s=3.0, policy_holds=True)
    Dialog(core)
    core.policy_out.clear()
    core.handle_timers(3.2)
    assert [kind for kind, _key in core.policy_out] == ["end"]


def test_a_dialog_the_proxy_cannot_read_at_the_limit_is_forgotten_without_a_bye() -> None:
    """The 2xx's rows are read only when the limit is reached (most calls never are): a
    Contact that does not parse then sends no BYE to either side, logs an internal error and
    leaves no state; the core goes on."""
    core = make_core(max_call_s=3.0)
    d = Dialog(core)
    call = core._limited[d.callee_call_id]
    call.sources["b"] = call.sources["b"]._replace(contacts=("<sip:broken",))  # the callee
    core.outbox.clear()
    core.handle_timers(3.2)
    assert byes(core) == {}
    assert core.stats["internal_errors"] == 1
    assert core._limited == {} and core._limit_wheel.next_deadline() is None
