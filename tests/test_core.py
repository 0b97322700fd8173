"""ProxyCore, sans-IO: decisions the proxy takes itself, driven without sockets.

Regression test for the 100 Trying to an in-dialog INVITE: it was built from the request after
the rewrite for the other side, so the callee's re-INVITE got a 100 whose To showed the
caller's real number (found by scripts/sipp/uas_reinvite.xml).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from proxy.bindings.model import Outcome, Resolution
from proxy.core import CoreSettings, FinalResponse, Hop, ProxyCore
from proxy.privacy import DialogSealer, PrivacyPolicy
from proxy.sip.message import SipMessage, build_response, parse_message

X, A, B = "700100000000001", "13800000001", "13900000001"
CALLER = ("127.0.0.1", 5070)
GATEWAY = ("127.0.0.1", 5090)


WALL = [1_800_000_000.0]  # the wall clock the cores below see (token deadlines)


def make_core(**overrides) -> ProxyCore:
    settings = CoreSettings(
        advertise_host="127.0.0.1", advertise_port=5060,
        is_trusted=lambda ip: ip == "127.0.0.1", middle_number=lambda n: n.startswith("700"),
        gateways=[Hop(GATEWAY[0], GATEWAY[1], "udp")],
        is_gateway_address=lambda ip: ip == GATEWAY[0],
        wall_clock=lambda: WALL[0],
    )
    for name, value in overrides.items():
        setattr(settings, name, value)
    return ProxyCore(settings, DialogSealer(bytes(32)))


def request(lines: list[str], body: str = "") -> bytes:
    return ("\r\n".join(lines) + f"\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode()


class Dialog:
    """An A→X→B call established through a core, with what each side saw."""

    def __init__(self, core: ProxyCore, call_id: str = "call-1",
                 complete_lookup: Callable[..., None] | None = None) -> None:
        self.core = core
        self.caller_call_id = call_id
        core.receive_datagram(request([
            f"INVITE sip:{X}@127.0.0.1:5060 SIP/2.0",
            "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-a-1;rport",
            f"From: <sip:{A}@127.0.0.1>;tag=atag",
            f"To: <sip:{X}@127.0.0.1>",
            f"Call-ID: {call_id}",
            "CSeq: 1 INVITE",
            f"Contact: <sip:{A}@127.0.0.1:5070>",
            "Max-Forwards: 70",
        ]), CALLER, "udp", 0.0)
        relay, _x, _caller = core.lookups.pop()
        (complete_lookup or core.complete_lookup)(relay, Resolution(Outcome.ROUTE, B, 1e12),
                                                  0.0)
        forwarded = [parse_message(o.data) for o in core.outbox if o.dest == GATEWAY]
        core.outbox.clear()
        assert len(forwarded) == 1
        self.invite = forwarded[0]  # what B received
        self.callee_call_id = self.invite.call_id
        self.callee_route = self.invite.header_values("record-route")[0]
        self.caller_contact = self.invite.header_values("contact")[0]  # A's, as B sees it
        ok = build_response(self.invite, 200, "OK", to_tag="btag",
                            headers=[("Record-Route", self.callee_route),
                                     ("Contact", f"<sip:{B}@127.0.0.1:5090>")])
        core.receive_datagram(ok.serialize(), GATEWAY, "udp", 0.1)
        answers_ = [parse_message(o.data) for o in core.outbox if o.dest == CALLER]
        core.outbox.clear()
        assert [m.status for m in answers_] == [200]
        self.ok = answers_[0]  # what A received
        self.caller_route = self.ok.header_values("record-route")[0]
        self.callee_contact = self.ok.header_values("contact")[0]  # B's, as A sees it

    def from_callee(self, method: str, *, uri: str | None = None, from_tag: str = "btag",
                    call_id: str | None = None, route: str | None = None,
                    source: tuple[str, int] = GATEWAY, extra: tuple[str, ...] = (),
                    body: str = "", branch: str = "b-2", now: float = 1.0) -> None:
        target = uri or self.caller_contact.strip("<>")
        self.core.receive_datagram(request([
            f"{method} {target} SIP/2.0",
            f"Via: SIP/2.0/UDP 127.0.0.1:5090;branch=z9hG4bK-{branch}",
            f"Route: {route or self.callee_route}",
            f"From: <sip:{X}@127.0.0.1>;tag={from_tag}",
            f"To: <sip:{X}@127.0.0.1>;tag=atag",
            f"Call-ID: {call_id or self.callee_call_id}",
            f"CSeq: 2 {method}",
            f"Contact: <sip:{B}@127.0.0.1:5090>",
            "Max-Forwards: 70",
            *extra,
        ], body), source, "udp", now)

    def from_caller(self, method: str, *, uri: str | None = None, call_id: str | None = None,
                    route: str | None = None, source: tuple[str, int] = CALLER,
                    extra: tuple[str, ...] = (), branch: str = "a-2", now: float = 1.0) -> None:
        target = uri or self.callee_contact.strip("<>")
        self.core.receive_datagram(request([
            f"{method} {target} SIP/2.0",
            f"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-{branch}",
            f"Route: {route or self.caller_route}",
            f"From: <sip:{A}@127.0.0.1>;tag=atag",
            f"To: <sip:{X}@127.0.0.1>;tag=btag",
            f"Call-ID: {call_id or self.caller_call_id}",
            f"CSeq: 2 {method}",
            "Max-Forwards: 70",
            *extra,
        ]), source, "udp", now)

    def sent(self, dest: tuple[str, int]) -> list:
        out = [parse_message(o.data) for o in self.core.outbox if o.dest == dest]
        return out


def test_each_side_gets_its_own_token_call_id_and_a_reversible_contact() -> None:
    d = Dialog(make_core())
    assert d.caller_route != d.callee_route  # B's token cannot pose as A (and vice versa)
    assert d.callee_call_id != d.caller_call_id and d.ok.call_id == d.caller_call_id
    assert A not in d.callee_call_id
    assert A.encode() not in d.invite.serialize()
    assert B.encode() not in d.ok.serialize()
    assert d.ok.from_.uri.user == A and d.ok.to.tag == "btag"
    # B's BYE reaches A on A's Call-ID, with A's own Contact as the Request-URI
    d.from_callee("BYE")
    (bye,) = d.sent(CALLER)
    assert bye.uri_text == f"sip:{A}@127.0.0.1:5070" and bye.call_id == d.caller_call_id
    assert bye.to.uri.user == A and bye.from_.uri.user == X
    assert B.encode() not in bye.serialize()


def test_trying_to_a_callee_reinvite_shows_the_callee_its_own_headers() -> None:
    d = Dialog(make_core())
    d.from_callee("INVITE", now=1.0)
    assert not [o for o in d.core.outbox if o.dest == GATEWAY]  # the 100 is held 200 ms
    d.core.handle_timers(1.25)  # A has not answered: it goes out
    to_callee = [o.data for o in d.core.outbox if o.dest == GATEWAY]
    assert len(to_callee) == 1 and to_callee[0].startswith(b"SIP/2.0 100 ")
    assert A.encode() not in to_callee[0]
    assert f"To: <sip:{X}@127.0.0.1>;tag=atag".encode() in to_callee[0]
    # the re-INVITE itself does reach A with A's own number restored
    (reinvite,) = d.sent(CALLER)
    assert reinvite.to.uri.user == A


def test_spoofed_from_tag_does_not_turn_the_direction() -> None:
    """B poses as A with A's tag: the request still counts as B's, A's answer hides A."""
    d = Dialog(make_core())
    d.from_callee("INVITE", from_tag="atag")
    (reinvite,) = d.sent(CALLER)
    assert reinvite.call_id == d.caller_call_id
    d.core.outbox.clear()
    answer = build_response(reinvite, 200, "OK",
                            headers=[("Contact", f"<sip:{A}@127.0.0.1:5070>")],
                            body=f"v=0\r\no={A} 2 2 IN IP4 127.0.0.1\r\n".encode())
    answer.insert_header("Content-Type", "application/sdp", len(answer.rows) - 1)
    d.core.receive_datagram(answer.serialize(), CALLER, "udp", 1.1)
    (to_b,) = d.sent(GATEWAY)
    assert to_b.status == 200 and A.encode() not in to_b.serialize()
    assert to_b.call_id == d.callee_call_id


def test_an_unreadable_body_in_dialog_is_refused_when_configured() -> None:
    d = Dialog(make_core(privacy=PrivacyPolicy(unreadable_body="reject")))
    d.from_callee("INVITE", extra=("Content-Type: application/x-unknown",), body="opaque")
    assert answers(d.core, GATEWAY)[-1] == 415 and d.sent(CALLER) == []
    assert d.core.stats["rejected_body"] == 1 and not d.core.stats.get("internal_errors")


def test_token_without_to_tag_is_an_initial_request() -> None:
    d = Dialog(make_core())
    d.core.receive_datagram(request([
        "INVITE sip:+8613312345678@127.0.0.1:5090 SIP/2.0",
        "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-fraud",
        f"Route: {d.caller_route}",
        f"From: <sip:{A}@127.0.0.1>;tag=fraud",
        "To: <sip:+8613312345678@127.0.0.1>",
        "Call-ID: fresh", "CSeq: 1 INVITE", "Max-Forwards: 70",
    ]), CALLER, "udp", 2.0)
    assert answers(d.core) == [404] and answers(d.core, GATEWAY) == []
    d.core.outbox.clear()
    stranger = ("127.0.0.7", 5070)
    d.core.receive_datagram(request([
        "INVITE sip:+8613312345678@127.0.0.7:5999 SIP/2.0",
        "Via: SIP/2.0/UDP 127.0.0.7:5070;branch=z9hG4bK-fraud2",
        f"Route: {d.caller_route}",
        "From: <sip:x@127.0.0.7>;tag=fraud", "To: <sip:+8613312345678@127.0.0.7>",
        "Call-ID: fresh2", "CSeq: 1 INVITE", "Max-Forwards: 70",
    ]), stranger, "udp", 2.0)
    assert [o.dest for o in d.core.outbox] == [stranger]
    assert answers(d.core, stranger) == [403]


def test_token_is_bound_to_its_call_id_and_side() -> None:
    d = Dialog(make_core())
    d.from_caller("BYE", call_id="another-call")
    assert answers(d.core) == [403] and answers(d.core, GATEWAY) == []
    assert d.core.stats["rejected_token_call_id"] == 1
    d.core.outbox.clear()
    d.from_caller("BYE", route=d.callee_route)  # B's token on A's Call-ID
    assert answers(d.core) == [403] and answers(d.core, GATEWAY) == []


def test_in_dialog_requests_only_from_trusted_peers_and_gateways() -> None:
    d = Dialog(make_core())
    stranger = ("127.0.0.7", 5070)
    d.from_caller("BYE", source=stranger)
    assert answers(d.core, stranger) == [403] and answers(d.core, GATEWAY) == []
    assert d.core.stats["rejected_untrusted"] == 1


def test_after_the_deadline_only_ack_bye_cancel_pass() -> None:
    core = make_core(max_dialog_s=60)
    d = Dialog(core)
    WALL[0] += 61
    try:
        d.from_caller("INVITE", branch="late-reinvite")
        assert answers(core) == [403] and answers(core, GATEWAY) == []
        core.outbox.clear()
        d.from_caller("BYE", branch="late-bye")
        assert [m.method for m in d.sent(GATEWAY)] == ["BYE"]
    finally:
        WALL[0] -= 61


def test_proxy_errors_are_built_from_the_request_as_received() -> None:
    d = Dialog(make_core())
    d.from_callee("BYE", uri=f"tel:{X}")
    (reply,) = d.sent(GATEWAY)
    assert reply.status == 502 and A.encode() not in reply.serialize()
    assert reply.header("to") == f"<sip:{X}@127.0.0.1>;tag=atag"
    assert reply.call_id == d.callee_call_id


def test_next_hop_must_be_a_peer_a_gateway_or_allowed() -> None:
    core = make_core()
    d = Dialog(core)
    d.from_caller("BYE", uri="sip:13900000001@127.0.0.9:5099")
    assert answers(core) == [403] and not [o for o in core.outbox if o.dest[0] == "127.0.0.9"]
    core.outbox.clear()
    core.settings.is_allowed_next_hop = lambda ip: ip == "127.0.0.9"
    d.from_caller("BYE", uri="sip:13900000001@127.0.0.9:5099", branch="a-3")
    assert [parse_message(o.data).method for o in core.outbox if o.dest[0] == "127.0.0.9"] == [
        "BYE"]


def test_a_request_for_the_caller_never_goes_to_a_gateway_only_address() -> None:
    """A's From is restored in what A gets, so B must not steer it back to its own side."""
    core = make_core(is_trusted=lambda ip: ip == "127.0.0.1",
                     is_gateway_address=lambda ip: ip in ("127.0.0.1", "127.0.0.8"))
    d = Dialog(core)
    d.from_callee("BYE", uri="sip:anyone@127.0.0.8:5090", source=GATEWAY)
    assert answers(core, GATEWAY) == [403]
    assert not [o for o in core.outbox if o.dest[0] == "127.0.0.8"]


def test_refer_is_refused_unless_passed() -> None:
    d = Dialog(make_core())
    refer = ("Refer-To: <sip:13312345678@127.0.0.1>", f"Referred-By: <sip:{A}@127.0.0.1>")
    d.from_caller("REFER", extra=refer)
    assert answers(d.core) == [403] and answers(d.core, GATEWAY) == []
    core = make_core()
    core.settings.privacy = PrivacyPolicy(refer="pass")
    core.privacy.policy = core.settings.privacy
    d = Dialog(core)
    d.from_caller("REFER", extra=refer)
    (refer_out,) = d.sent(GATEWAY)
    assert refer_out.method == "REFER" and A.encode() not in refer_out.serialize()


def test_via_gets_received_and_rport_filled() -> None:
    d = Dialog(make_core())
    vias = d.invite.header_values("via")
    caller_via = d.invite.vias[1]
    assert caller_via.rport == "5070" and caller_via.received == "127.0.0.1"
    assert caller_via.branch == "z9hG4bK-a-1"
    assert d.ok.header_values("via") == [vias[1]]
    core = make_core()
    core.receive_datagram(invite(x="13912345678", extra=()).replace(
        b"branch=z9hG4bK-b1", b"branch=z9hG4bK-b1;rport"), CALLER, "udp", 0.0)
    (reply,) = [parse_message(o.data) for o in core.outbox]
    assert reply.top_via.rport == "5070" and reply.top_via.received == "127.0.0.1"


def test_pai_is_added_when_the_caller_sent_none() -> None:
    d = Dialog(make_core())
    assert d.invite.header_values("p-asserted-identity") == [f"<sip:{X}@127.0.0.1>"]
    core = make_core()
    core.settings.privacy = PrivacyPolicy(add_asserted_identity=False)
    core.privacy.policy = core.settings.privacy
    assert not Dialog(core).invite.has("p-asserted-identity")


def test_unanswered_lookup_ends_in_503() -> None:
    core = make_core(lookup_deadline=0.5)
    core.receive_datagram(invite(), CALLER, "udp", 0.0)
    assert core.lookups  # handed to the shell, which never answers
    assert answers(core) == []  # the 100 Trying is held
    core.handle_timers(0.25)
    assert answers(core) == [100]  # nothing else went out in 200 ms: the 100 did
    core.outbox.clear()
    core.handle_timers(0.6)
    assert answers(core) == [503] and core.stats["lookup_deadline_expired"] == 1
    relay = core.lookups[0][0]
    core.complete_lookup(relay, Resolution(Outcome.ROUTE, B, 1e12), 0.7)  # too late
    assert answers(core, GATEWAY) == []


def test_a_stream_of_1xx_cannot_keep_an_invite_alive() -> None:
    core = make_core(max_invite_lifetime=10.0, timer_c=3.0)
    forwarded = route_call(core)
    t = 0.0
    while t < 9.0:
        t += 1.0
        core.receive_datagram(_callee_reply(forwarded, 180), GATEWAY, "udp", t)
        core.handle_timers(t)
    assert 408 not in answers(core)  # timer C keeps being reset by the 180s
    core.outbox.clear()
    core.handle_timers(10.1)
    assert answers(core) == [408] and core.stats["invite_lifetime_exceeded"] == 1
    assert [parse_message(o.data).method for o in core.outbox if o.dest == GATEWAY] == [
        "CANCEL"]


class BuggyRecords:
    """Call records (the core's `calls` hooks) whose `failing` hook raises: a bug in the
    middle of the core's work on a call. Injected through a collaborator, not by patching the
    core's own functions, which may be compiled (scripts/build-compiled)."""

    def __init__(self, failing: str) -> None:
        self.failing = failing

    def __getattr__(self, hook: str):
        def call(*_args, **_kw):
            if hook == self.failing:
                raise RuntimeError("bug")
            return object()  # `invite`: the call record in the making

        return call


def test_a_bug_ends_the_transaction_with_500() -> None:
    core = make_core()
    core.calls = BuggyRecords("forwarded")  # while forwarding the INVITE to the callee
    core.receive_datagram(invite(), CALLER, "udp", 0.0)
    relay, _x, _caller = core.lookups.pop()
    core.outbox.clear()
    core.complete_lookup(relay, Resolution(Outcome.ROUTE, B, 1e12), 0.1)
    assert answers(core) == [500] and core.stats["internal_errors"] == 1
    assert relay.final_sent and answers(core, GATEWAY) == []
    # and a bug on a request's own path: stateless 500 from the received request
    core.calls = BuggyRecords("invite")
    core.outbox.clear()
    core.receive_datagram(invite(branch="b9"), CALLER, "udp", 0.2)
    assert answers(core) == [500] and core.stats["internal_errors"] == 2


# ---- request validation and refusals (RFC 3261 §16.3) ---------------------------------------

def invite(x: str = X, caller: str = A, extra: tuple[str, ...] = (), branch: str = "b1",
           max_forwards: str = "70") -> bytes:
    return request([
        f"INVITE sip:{x}@127.0.0.1:5060 SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-{branch}",
        f"From: <sip:{caller}@127.0.0.1>;tag=atag",
        f"To: <sip:{x}@127.0.0.1>",
        f"Call-ID: call-{branch}",
        "CSeq: 1 INVITE",
        f"Max-Forwards: {max_forwards}",
        *extra,
    ])


def answers(core: ProxyCore, dest: tuple[str, int] = CALLER) -> list[int]:
    out = [parse_message(o.data).status for o in core.outbox if o.dest == dest]
    return out


def test_refusals_are_answered_and_never_forwarded() -> None:
    cases = [
        (invite(max_forwards="0"), 483),
        (invite(extra=("Proxy-Require: com.example.magic",)), 420),
        (invite(x="13912345678"), 404),  # not a middle number
        (request([
            "INVITE nobodyknows:thisisnotauri SIP/2.0",
            "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-s1",
            "From: <sip:a@127.0.0.1>;tag=1", "To: <sip:b@127.0.0.1>", "Call-ID: s1",
            "CSeq: 1 INVITE", "Max-Forwards: 70"]), 416),
        (invite(extra=("Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKs7loop",),
                branch="l1"), 482),
    ]
    for data, status in cases:
        core = make_core()
        core.receive_datagram(data, CALLER, "udp", 0.0)
        assert answers(core) == [status], (data[:60], answers(core))
        assert not core.lookups
        assert answers(core, GATEWAY) == []
    core = make_core()
    core.receive_datagram(invite(extra=("Proxy-Require: com.example.magic",)), CALLER, "udp", 0.0)
    assert parse_message(core.outbox[0].data).header("unsupported") == "com.example.magic"


def test_untrusted_peer_gets_403_and_nothing_is_looked_up() -> None:
    core = make_core()
    core.settings.is_trusted = lambda ip: ip == "127.0.0.1"
    stranger = ("127.0.0.9", 5070)
    core.receive_datagram(invite(), stranger, "udp", 0.0)
    assert [parse_message(o.data).status for o in core.outbox] == [403]
    assert core.outbox[0].dest == stranger and not core.lookups
    assert core.stats["rejected_untrusted"] == 1


def test_tampered_token_is_refused() -> None:
    d = Dialog(make_core())
    route = d.caller_route
    start = route.index("s7=") + 3
    bad = route[:start] + ("A" if route[start] != "A" else "B") + route[start + 1:]
    d.from_caller("BYE", route=bad)
    assert answers(d.core) == [403] and answers(d.core, GATEWAY) == []


def _callee_reply(forwarded_invite: bytes, status: int, *, vias: int = 2) -> bytes:
    """A reply from the gateway to the INVITE the core forwarded."""
    forwarded = parse_message(forwarded_invite)
    rows = [row.decode() for name, row in forwarded.rows
            if name in ("via", "from", "to", "call-id", "cseq")]
    via_rows = [r for r in rows if r.lower().startswith("via")][:vias]
    other = [r for r in rows if not r.lower().startswith("via")]
    other = [r + ";tag=btag" if r.lower().startswith("to") else r for r in other]
    return request([f"SIP/2.0 {status} Whatever", *via_rows, *other])


def route_call(core: ProxyCore) -> bytes:
    """A→X through the core; returns the INVITE it sent to the gateway."""
    core.receive_datagram(invite(), CALLER, "udp", 0.0)
    relay, _x, _caller = core.lookups.pop()
    core.complete_lookup(relay, Resolution(Outcome.ROUTE, B, 1e12), 0.0)
    sent = [o.data for o in core.outbox if o.dest == GATEWAY]
    core.outbox.clear()
    assert len(sent) == 1
    return sent[0]


def test_response_carrying_only_our_via_is_not_forwarded() -> None:
    core = make_core()
    forwarded = route_call(core)
    core.receive_datagram(_callee_reply(forwarded, 180, vias=1), GATEWAY, "udp", 0.1)
    assert answers(core) == []
    assert core.stats["responses_dropped"] == 1


def test_a_response_whose_vias_share_one_row_goes_back_with_the_callers_vias() -> None:
    core = make_core()
    forwarded = route_call(core)
    reply = _callee_reply(forwarded, 180)
    msg = parse_message(reply)
    ours, theirs = (row.decode() for name, row in msg.rows if name == "via")
    joined = reply.replace((ours + "\r\n" + theirs).encode(),
                           (ours + ", " + theirs.split(":", 1)[1].strip()).encode())
    assert joined != reply
    core.receive_datagram(joined, GATEWAY, "udp", 0.1)
    (ringing,) = [parse_message(o.data) for o in core.outbox if o.dest == CALLER]
    original = parse_message(invite())
    assert ringing.status == 180
    assert ringing.raw_values("via") == original.raw_values("via")
    assert core.stats.get("responses_dropped", 0) == 0


def test_2xx_after_timer_c_is_still_forwarded() -> None:
    core = make_core()
    core.settings.timer_c = 1.0
    forwarded = route_call(core)
    core.receive_datagram(_callee_reply(forwarded, 180), GATEWAY, "udp", 0.1)
    core.outbox.clear()
    core.handle_timers(1.5)  # Timer C: CANCEL down, 408 up
    assert answers(core) == [408]
    cancels = [o.data for o in core.outbox if o.dest == GATEWAY]
    assert cancels and cancels[0].startswith(b"CANCEL ")
    core.outbox.clear()
    core.receive_datagram(_callee_reply(forwarded, 200), GATEWAY, "udp", 1.6)
    ok = [parse_message(o.data) for o in core.outbox if o.dest == CALLER]
    assert [m.status for m in ok] == [200]
    assert ok[0].from_.uri.user == A and B.encode() not in ok[0].serialize()
    assert core.stats["late_2xx_forwarded"] == 1


def test_call_log_masks_a_number_in_the_call_id() -> None:
    lines: list[dict] = []
    core = make_core()
    core.log = lambda event, **kw: lines.append({"event": event, **kw})
    Dialog(core, call_id=f"{A}-4711@127.0.0.1")
    (call,) = [line for line in lines if line["event"] == "call"]
    assert A not in str(call) and call["call_id"] == "138****0001-4711@127.0.0.1"


def test_in_dialog_bye_over_udp_is_forwarded_without_a_transaction_pair() -> None:
    core = make_core()
    d = Dialog(core)
    servers, clients = len(core.server_txs), len(core.client_txs)
    d.from_caller("BYE", branch="bye-1")
    (bye,) = d.sent(GATEWAY)
    assert (len(core.server_txs), len(core.client_txs)) == (servers, clients)
    assert core.stats["forwarded_stateless"] == 1
    core.outbox.clear()
    d.from_caller("BYE", branch="bye-1", now=1.5)  # the caller's retransmission
    (again,) = d.sent(GATEWAY)
    assert again.top_via.branch == bye.top_via.branch  # §16.11: the same branch downstream
    core.outbox.clear()
    ok = build_response(bye, 200, "OK")
    core.receive_datagram(ok.serialize(), GATEWAY, "udp", 1.6)
    (to_a,) = d.sent(CALLER)
    assert to_a.status == 200 and to_a.call_id == d.caller_call_id
    assert to_a.from_.uri.user == A and to_a.to.tag == "btag"
    assert B.encode() not in to_a.serialize()
    assert to_a.header_values("via") == [
        "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-bye-1"]
    assert not [e for e in core._stateless.values() if not e.invite]  # a final ends it


def test_unanswered_stateless_request_is_forgotten_after_timer_f() -> None:
    core = make_core()
    d = Dialog(core)
    d.from_caller("INFO", branch="info-1")
    assert [e.invite for e in core._stateless.values()] == [True, False]  # INVITE, INFO
    core.outbox.clear()
    core.handle_timers(40.0)
    assert not core._stateless and core.outbox == []  # no 408 for a non-INVITE (RFC 4320)


def test_stateless_entries_expire_in_order_whatever_ended_or_refreshed_them() -> None:
    """Expiry reads the order of the entries put, not the tables: an entry a final response
    ended and one a retransmission refreshed leave records that change nothing."""
    core = make_core()
    d = Dialog(core)  # the answered INVITE: absorbed for STATELESS_LIFE
    d.from_caller("INFO", branch="info-1", now=1.0)
    d.from_caller("INFO", branch="info-2", now=2.0)
    infos = d.sent(GATEWAY)
    core.outbox.clear()
    core.receive_datagram(build_response(infos[1], 200, "OK").serialize(), GATEWAY, "udp", 2.1)
    assert [m.status for m in d.sent(CALLER)] == [200]
    core.outbox.clear()
    d.from_caller("INFO", branch="info-1", now=10.0)  # retransmitted: kept to 10 + 32
    assert len(core._expiry_order) == 5  # INVITE (2 tables), info-1 twice, info-2
    core.handle_timers(35.0)
    assert [e.invite for e in core._stateless.values()] == [False]  # info-1's
    assert not core._accepted and len(core._expiry_order) == 1
    assert core.next_deadline() == 42.0
    core.outbox.clear()
    core.receive_datagram(build_response(infos[0], 200, "OK").serialize(), GATEWAY, "udp", 36.0)
    assert [m.status for m in d.sent(CALLER)] == [200]  # still known: its response goes back
    assert not core._stateless and core.next_deadline() == 42.0  # a record of nothing, ...
    core.handle_timers(42.0)
    assert not core._expiry_order and core.next_deadline() is None  # ... dropped on time


def test_tcp_upstream_keeps_the_stateful_path() -> None:
    """A TCP caller never retransmits: only a transaction retransmits over the UDP leg."""
    core = make_core()
    d = Dialog(core)
    target = d.callee_contact.strip("<>")
    core.receive_datagram(request([
        f"BYE {target} SIP/2.0",
        "Via: SIP/2.0/TCP 127.0.0.1:5070;branch=z9hG4bK-tcp-bye",
        f"Route: {d.caller_route}",
        f"From: <sip:{A}@127.0.0.1>;tag=atag", f"To: <sip:{X}@127.0.0.1>;tag=btag",
        f"Call-ID: {d.caller_call_id}", "CSeq: 3 BYE", "Max-Forwards: 70",
    ]), CALLER, "tcp", 2.0)
    assert [m.method for m in d.sent(GATEWAY)] == ["BYE"]
    assert "forwarded_stateless" not in core.stats
    assert any(r.request.method == "BYE" for r in core.server_txs.values())


def test_an_invite_answered_2xx_keeps_no_transaction_pair() -> None:
    core = make_core()
    d = Dialog(core)
    assert not core.server_txs and not core.client_txs and len(core.wheel) == 0
    assert core.stats["invites_retired"] == 1
    # what is kept for Timer L/M is rows of text, not the INVITE and what was parsed of it
    (entry,) = core._stateless.values()
    assert entry.invite and _only_text(entry.restore)
    names, blob, ends, had_tag = entry.restore
    assert names == ("via", "from", "to", "call-id") and not had_tag
    assert len(ends) == 4 and ends[-1] == len(blob) and d.caller_call_id.encode() in blob
    # the caller's INVITE retransmission is absorbed, not looked up and sent again
    core.receive_datagram(request([
        f"INVITE sip:{X}@127.0.0.1:5060 SIP/2.0",
        "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-a-1;rport",
        f"From: <sip:{A}@127.0.0.1>;tag=atag", f"To: <sip:{X}@127.0.0.1>",
        f"Call-ID: {d.caller_call_id}", "CSeq: 1 INVITE", "Max-Forwards: 70",
    ]), CALLER, "udp", 0.5)
    assert not core.lookups and core.outbox == []
    # the callee's 2xx retransmission still reaches the caller, rewritten the same way
    ok = build_response(d.invite, 200, "OK", to_tag="btag",
                        headers=[("Record-Route", d.callee_route),
                                 ("Contact", f"<sip:{B}@127.0.0.1:5090>")])
    core.receive_datagram(ok.serialize(), GATEWAY, "udp", 0.6)
    (again,) = d.sent(CALLER)
    assert again.header_values("record-route") == [d.caller_route]
    assert again.call_id == d.caller_call_id and B.encode() not in again.serialize()
    core.outbox.clear()
    core.handle_timers(40.0)
    assert not core._stateless and not core._accepted and core.next_deadline() is None


def test_a_sealed_contact_user_opens_only_for_its_own_contact() -> None:
    """B aims A's sealed Contact at an address of its choosing: the real user stays sealed."""
    d = Dialog(make_core())
    target = d.caller_contact.strip("<>")
    assert ";s7u=" in target and "127.0.0.1:5070" in target
    d.from_callee("BYE", uri=target.replace("127.0.0.1:5070", "127.0.0.1:5999"))
    assert answers(d.core, GATEWAY) == [403]
    assert not [o for o in d.core.outbox if o.dest != GATEWAY]
    assert A.encode() not in b"".join(o.data for o in d.core.outbox)


def test_direction_restricted_gets_its_configured_response_and_is_not_forwarded() -> None:
    core = make_core(direction_restricted=FinalResponse(403, "One Way Only"))
    core.receive_datagram(invite(), CALLER, "udp", 0.0)
    relay = core.lookups.pop()[0]
    core.outbox.clear()
    core.complete_lookup(relay, Resolution(Outcome.DIRECTION_RESTRICTED, None, 1e12), 0.0)
    assert answers(core) == [403]
    assert parse_message(core.outbox[0].data).reason == "One Way Only"
    assert answers(core, GATEWAY) == []
    assert core.stats["calls_direction_restricted"] == 1


@pytest.mark.parametrize("host", [
    "127.0.0.1", "0.0.0.0", "01.2.3.4", "1.2.3", "256.1.1.1", "0x7f.0.0.1", "127.1", "::1", "::",
    "::ffff:1.2.3.4", "fe80::1%eth0", "1::2::3", "1:2:3:4:5:6:7:8:9", "localhost", "", " 1.2.3.4",
    "[::1]", "1.2.3.4\x00", "a" * 300])
def test_next_hop_address_check_is_ipaddress_s(host: str) -> None:
    """The next hop's host check (C parser first) agrees with ipaddress.ip_address."""
    import ipaddress

    from proxy.core import _is_ip_address

    try:
        ipaddress.ip_address(host)
        expected = True
    except ValueError:
        expected = False
    assert _is_ip_address(host) is expected


# ---- the 100 Trying (RFC 3261 §17.2.1): held, and sent only when nothing else went out ------

def _relayed_invite(core: ProxyCore, now: float = 0.0, branch: str = "b1") -> SipMessage:
    core.receive_datagram(invite(branch=branch), CALLER, "udp", now)
    relay, _x, _caller = core.lookups.pop()
    core.complete_lookup(relay, Resolution(Outcome.ROUTE, B, 1e12), now)
    (fwd,) = [parse_message(o.data) for o in core.outbox if o.dest == GATEWAY]
    return fwd


def test_a_call_answered_within_200_ms_gets_no_100_trying() -> None:
    core = make_core()
    fwd = _relayed_invite(core)
    assert answers(core) == []
    core.receive_datagram(build_response(fwd, 180, "Ringing", to_tag="btag").serialize(),
                          GATEWAY, "udp", 0.05)
    core.handle_timers(0.5)
    core.handle_timers(1.0)
    assert answers(core) == [180]  # the 180 made the 100 moot: it never goes out
    assert all(r.trying_due is None for r in core.server_txs.values())


def test_a_refusal_within_200_ms_gets_no_100_trying() -> None:
    core = make_core()
    core.receive_datagram(invite(), CALLER, "udp", 0.0)
    relay, _x, _caller = core.lookups.pop()
    core.complete_lookup(relay, Resolution(Outcome.NO_BINDING, None, 1e12), 0.001)
    core.handle_timers(0.5)
    assert answers(core) == [404]


def test_a_slow_callee_gets_the_caller_one_100_trying_at_200_ms() -> None:
    core = make_core()
    fwd = _relayed_invite(core)
    core.handle_timers(0.15)
    assert answers(core) == []
    core.handle_timers(0.21)
    assert answers(core) == [100]
    (trying,) = [parse_message(o.data) for o in core.outbox if o.dest == CALLER]
    assert trying.to.tag is None and trying.call_id == "call-b1"  # the caller's own rows
    assert B.encode() not in trying.serialize()
    core.outbox.clear()
    core.handle_timers(0.6)
    assert answers(core) == []  # one 100, not one a tick
    core.receive_datagram(build_response(fwd, 180, "Ringing", to_tag="btag").serialize(),
                          GATEWAY, "udp", 0.7)
    assert answers(core) == [180]


def test_a_retransmitted_invite_gets_the_held_100_at_once() -> None:
    core = make_core()
    _relayed_invite(core)
    core.receive_datagram(invite(), CALLER, "udp", 0.1)  # the same INVITE again
    assert answers(core) == [100] and core.stats["retransmissions_absorbed"] == 1
    core.outbox.clear()
    core.handle_timers(0.5)
    core.receive_datagram(invite(), CALLER, "udp", 0.6)  # again: the 100 is replayed
    assert answers(core) == [100]


def test_trying_after_zero_sends_the_100_before_the_lookup() -> None:
    core = make_core(trying_after=0.0)
    core.receive_datagram(invite(), CALLER, "udp", 0.0)
    assert core.lookups and answers(core) == [100]


def test_the_invite_leaves_before_the_callers_token_is_sealed() -> None:
    """The caller's dialog token goes into the responses only: the INVITE is sent without
    waiting for it (after_send seals it once the sends are out), and a response handled
    before that seals it itself. Either way the caller gets the same kind of token, which
    the in-dialog requests then use."""
    for shell_calls_after_send in (True, False):
        core = make_core()
        core.receive_datagram(request([
            f"INVITE sip:{X}@127.0.0.1:5060 SIP/2.0",
            "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-a-1;rport",
            f"From: <sip:{A}@127.0.0.1>;tag=atag", f"To: <sip:{X}@127.0.0.1>",
            "Call-ID: seal-later", "CSeq: 1 INVITE", f"Contact: <sip:{A}@127.0.0.1:5070>",
            "Max-Forwards: 70",
        ]), CALLER, "udp", 0.0)
        relay, _x, _caller = core.lookups.pop()
        core.complete_lookup(relay, Resolution(Outcome.ROUTE, B, 1e12), 0.0)
        (invite,) = [parse_message(o.data) for o in core.outbox if o.dest == GATEWAY]
        core.outbox.clear()
        assert core.to_seal == [relay] and relay.token_to_seal is not None
        assert relay.token_swap is not None and relay.token_swap[1] == b""
        if shell_calls_after_send:
            core.after_send()
            assert core.to_seal == [] and relay.token_to_seal is None
            assert relay.token_swap[1] not in (b"", relay.token_swap[0])
        ok = build_response(invite, 200, "OK", to_tag="btag",
                            headers=[("Record-Route", invite.header_values("record-route")[0]),
                                     ("Contact", f"<sip:{B}@127.0.0.1:5090>")])
        core.receive_datagram(ok.serialize(), GATEWAY, "udp", 0.1)
        (answer,) = [parse_message(o.data) for o in core.outbox if o.dest == CALLER]
        core.outbox.clear()
        assert core.to_seal == [] and relay.token_to_seal is None
        caller_route = answer.header_values("record-route")[0]
        assert caller_route != invite.header_values("record-route")[0]
        assert relay.token_swap[1].decode() in caller_route
        assert A.encode() not in invite.serialize() and B.encode() not in answer.serialize()
        # the caller's ACK and BYE come back with that token and reach B
        core.receive_datagram(request([
            f"BYE sip:{B}@127.0.0.1:5090 SIP/2.0",
            "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-a-2",
            f"Route: {caller_route}", f"From: <sip:{A}@127.0.0.1>;tag=atag",
            f"To: <sip:{X}@127.0.0.1>;tag=btag", "Call-ID: seal-later", "CSeq: 2 BYE",
            "Max-Forwards: 70",
        ]), CALLER, "udp", 1.0)
        (bye,) = [parse_message(o.data) for o in core.outbox if o.dest == GATEWAY]
        assert bye.method == "BYE" and bye.call_id == invite.call_id


def _only_text(value: object) -> bool:
    """True when `value` is made of tuples, text, numbers and flags only (nothing the collector
    walks again, no parsed message kept alive)."""
    if isinstance(value, tuple):
        return all(_only_text(item) for item in value)
    return isinstance(value, (str, bytes, int))


@pytest.mark.parametrize(("vias", "forwarded"), [
    ("{ours}, {theirs}", True),
    ("{ours} ,{theirs}", True),
    ("{ours}", False),
    ("{ours},", False),
    ("{ours}, ,", False),
    ("{ours}, , {theirs}", True),
    ('{ours};x="a,b"', False),  # a comma inside a quoted string separates nothing
    ('{ours};x="a,b", {theirs}', True),
])
def test_a_response_with_one_via_row_is_forwarded_only_when_a_value_follows_ours(
        vias: str, forwarded: bool) -> None:
    core = make_core()
    sent = route_call(core)
    reply = _callee_reply(sent, 180)
    msg = parse_message(reply)
    ours, theirs = (row.decode().split(":", 1)[1].strip()
                    for name, row in msg.rows if name == "via")
    one_row = b"Via: " + vias.format(ours=ours, theirs=theirs).encode()
    rows = [row for name, row in msg.rows if name != "via"]
    data = b"\r\n".join([msg.start_line, one_row, *rows, b"", b""])
    core.receive_datagram(data, GATEWAY, "udp", 0.1)
    to_caller = [parse_message(o.data) for o in core.outbox if o.dest == CALLER]
    assert [m.status for m in to_caller] == ([180] if forwarded else [])
    if forwarded:
        assert to_caller[0].raw_values("via") == parse_message(invite()).raw_values("via")


_VIA_TAILS = ["", ",", ", ", ", ,", " , ", ", SIP/2.0/UDP 10.0.0.2;branch=z9hG4bKb",
              ',SIP/2.0/UDP a;x="p,q"', ';x="a,b"', ";x=\"a,b\", SIP/2.0/UDP c", "\r\n ,c",
              ", ,SIP/2.0/UDP d", "\t,\tSIP/2.0/TCP e:5070"]
_VIA_ROWS = ["Via: SIP/2.0/UDP 10.0.0.3;branch=z9hG4bKc", "Via: ,", "Via: ", "v: x, y"]


def test_dropping_our_via_answers_as_cutting_it_would() -> None:
    """_drop_our_via skips the cut (restored=True) only where pop_via would leave a Via: every
    tail of our row with up to two more Via rows of every shape."""
    from proxy.core import _drop_our_via

    kept = 0
    extra = [[], *([r] for r in _VIA_ROWS), *([r, q] for r in _VIA_ROWS for q in _VIA_ROWS)]
    for tail in _VIA_TAILS:
        for more in extra:
            rows = ["Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-s7-1" + tail, *more,
                    "From: <sip:a@h>;tag=1", "To: <sip:b@h>;tag=2", "Call-ID: c1",
                    "CSeq: 1 INVITE"]
            data = ("SIP/2.0 180 Ringing\r\n" + "\r\n".join(rows) + "\r\n\r\n").encode()
            cut = parse_message(data)
            cut.pop_via()
            expected = cut.has("via")
            kept += expected
            for restored in (True, False):
                assert _drop_our_via(parse_message(data), restored) == expected, (rows, restored)
    assert 0 < kept < len(_VIA_TAILS) * len(extra)  # both answers occur
