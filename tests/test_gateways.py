"""The carrier leg, sans-IO: gateway groups and routes, failover inside the INVITE transaction,
OPTIONS probing, and what the caller sees when no gateway is left."""

from __future__ import annotations

import pytest

from proxy.bindings.model import Outcome, Resolution
from proxy.core import CoreSettings, Hop, ProxyCore
from proxy.gateways import (
    REFUSED,
    Gateway,
    GatewayGroup,
    ProbeSettings,
    Router,
    probed_gateways,
    record_probe,
)
from proxy.privacy import DialogSealer
from proxy.sip.message import build_response, parse_message

X, A, B = "700100000000001", "13800000001", "13900000001"
CALLER = ("127.0.0.1", 5070)
GW1 = ("127.0.0.2", 5090)
GW2 = ("127.0.0.3", 5090)
GW3 = ("127.0.0.4", 5090)


def gw(addr: tuple[str, int], priority: int = 1, weight: int = 1) -> Gateway:
    return Gateway(f"sip:{addr[0]}:{addr[1]}", addr[0], addr[1], "udp", priority, weight)


def make_core(router: Router, **overrides) -> ProxyCore:
    gateways = {g.host for g in router.all_gateways()}
    settings = CoreSettings(
        advertise_host="127.0.0.1", advertise_port=5060,
        is_trusted=lambda ip: ip == "127.0.0.1", middle_number=lambda n: n.startswith("700"),
        gateways=[Hop(*GW1, "udp")], router=router,
        is_gateway_address=lambda ip: ip in gateways, wall_clock=lambda: 1_800_000_000.0,
    )
    for name, value in overrides.items():
        setattr(settings, name, value)
    return ProxyCore(settings, DialogSealer(bytes(32)))


def invite(core: ProxyCore, callee: str = B, now: float = 0.0, call_id: str = "c1") -> None:
    core.receive_datagram((
        f"INVITE sip:{X}@127.0.0.1:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-{call_id};rport\r\n"
        f"From: <sip:{A}@127.0.0.1>;tag=atag\r\nTo: <sip:{X}@127.0.0.1>\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:{A}@127.0.0.1:5070>\r\n"
        "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode(), CALLER, "udp", now)
    relay, _x, _caller = core.lookups.pop()
    core.complete_lookup(relay, Resolution(Outcome.ROUTE, callee, 1e12), now)


def sent(core: ProxyCore, dest: tuple[str, int]) -> list:
    out = [parse_message(o.data) for o in core.outbox if o.dest == dest]
    return out


def tick(core: ProxyCore, until: float, step: float = 0.01) -> float:
    now = 0.0
    while now < until:
        now = round(now + step, 6)
        deadline = core.next_deadline()
        if deadline is not None and deadline <= now:
            core.handle_timers(now)
    return now


def answer(core: ProxyCore, request, status: int, source: tuple[str, int], now: float,
           headers: list[tuple[str, str]] | None = None) -> None:
    resp = build_response(request, status, "X", to_tag="gtag", headers=headers or [])
    core.receive_datagram(resp.serialize(), source, "udp", now)


# ---- selection ---------------------------------------------------------------------------------
def test_priority_first_then_weighted_among_equals() -> None:
    a, b, c = gw(GW1, 1, 3), gw(GW2, 1, 1), gw(GW3, 2, 1)
    group = GatewayGroup("g", [a, b, c])
    firsts = [group.candidates(0.0)[0] for _ in range(40)]
    assert firsts.count(a) == 30 and firsts.count(b) == 10 and c not in firsts
    order = group.candidates(0.0)
    assert order[-1] is c and set(order[:2]) == {a, b}  # the lower priority is the last resort
    a.up = b.up = False
    assert group.candidates(0.0) == [c]
    c.down_until = 5.0
    assert group.candidates(4.9) == [] and group.candidates(5.0) == [c]


def test_routes_pick_the_longest_prefix_and_can_refuse() -> None:
    default, mobile, fixed = (GatewayGroup(n, [gw(GW1)]) for n in ("d", "m", "f"))
    router = Router(default, {"mobile": mobile, "fixed": fixed},
                    {"13": "mobile", "139": "fixed", "170": REFUSED})
    assert router.group_for("13800000001") is mobile
    assert router.group_for("13900000001") is fixed
    assert router.group_for("17012345678") is None
    assert router.group_for("15000000000") is default


def test_probe_counting_needs_consecutive_results() -> None:
    s = ProbeSettings(enabled=True, down_after=3, up_after=2)
    g = gw(GW1)
    assert [record_probe(g, False, s) for _ in range(3)] == [None, None, False]
    assert not g.up
    assert record_probe(g, True, s) is None and record_probe(g, False, s) is None
    assert record_probe(g, True, s) is None and record_probe(g, True, s) is True and g.up


def test_auto_probing_covers_groups_that_can_fail_over() -> None:
    lone, pair1, pair2 = gw(GW1), gw(GW2), gw(GW3)
    router = Router(GatewayGroup("d", [lone]), {"p": GatewayGroup("p", [pair1, pair2])})
    assert probed_gateways(router, ProbeSettings(enabled=None)) == [pair1, pair2]
    assert probed_gateways(router, ProbeSettings(enabled=False)) == []
    assert len(probed_gateways(router, ProbeSettings(enabled=True))) == 3


# ---- failover inside the transaction -------------------------------------------------------
def failover_core(**overrides) -> ProxyCore:
    return make_core(Router(GatewayGroup("d", [gw(GW1, 1), gw(GW2, 2)])), **overrides)


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504])
def test_a_failing_answer_moves_the_invite_to_the_next_gateway(status: int) -> None:
    core = failover_core()
    invite(core)
    (first,) = sent(core, GW1)
    core.outbox.clear()
    answer(core, first, status, GW1, 0.05)
    assert [m.method for m in sent(core, GW1)] == ["ACK"]  # the failed branch is ACKed
    (second,) = sent(core, GW2)
    assert second.method == "INVITE" and second.uri.host == GW2[0]
    assert second.top_via.branch != first.top_via.branch
    assert second.call_id == first.call_id and A.encode() not in second.serialize()
    assert not sent(core, CALLER)  # the caller sees nothing of it
    core.outbox.clear()
    answer(core, second, 200, GW2, 0.1, [("Contact", f"<sip:{B}@{GW2[0]}:{GW2[1]}>")])
    (ok,) = sent(core, CALLER)
    assert ok.status == 200 and ok.from_.uri.user == A
    assert core.stats["branches_failed_over"] == 1


def test_silence_fails_over_after_the_branch_timeout() -> None:
    core = failover_core(branch_timeout=2.0)
    invite(core)
    core.outbox.clear()
    tick(core, 1.99)
    assert not sent(core, GW2)  # retransmissions to GW1 only, so far
    tick(core, 2.02)
    (second,) = [m for m in sent(core, GW2) if m.method == "INVITE"]
    assert second.uri.host == GW2[0]
    core.outbox.clear()
    tick(core, 3.0)
    assert not sent(core, GW1)  # the silent branch is no longer retransmitted


def test_the_last_gateway_is_waited_for_beyond_the_branch_timeout() -> None:
    core = make_core(Router(GatewayGroup("d", [gw(GW1)])), branch_timeout=2.0)
    invite(core)
    (first,) = sent(core, GW1)
    core.outbox.clear()
    tick(core, 5.0)
    assert [m.status for m in sent(core, CALLER)] == [100]  # still waiting for it
    core.outbox.clear()
    answer(core, first, 180, GW1, 5.0)
    assert [m.status for m in sent(core, CALLER)] == [180]


def test_a_provisional_answer_keeps_the_branch() -> None:
    core = failover_core(branch_timeout=2.0)
    invite(core)
    (first,) = sent(core, GW1)
    answer(core, first, 100, GW1, 0.05)
    core.outbox.clear()
    tick(core, 5.0)
    assert not sent(core, GW2)


def test_a_final_4xx_is_the_callers_answer() -> None:
    core = failover_core()
    invite(core)
    (first,) = sent(core, GW1)
    core.outbox.clear()
    answer(core, first, 486, GW1, 0.05)
    assert not [m for m in sent(core, GW2)]
    assert [m.status for m in sent(core, CALLER)] == [486]


def test_every_gateway_failing_gives_no_gateway_with_retry_after() -> None:
    core = failover_core()
    invite(core)
    (first,) = sent(core, GW1)
    core.outbox.clear()
    answer(core, first, 503, GW1, 0.05)
    (second,) = [m for m in sent(core, GW2) if m.method == "INVITE"]
    core.outbox.clear()
    answer(core, second, 503, GW2, 0.1)
    (final,) = sent(core, CALLER)
    assert final.status == 503 and final.reason == "No Gateway Available"
    assert final.header("retry-after") == "5"


def test_503_retry_after_marks_the_gateway_down_for_that_long() -> None:
    core = failover_core()
    invite(core, call_id="c1")
    (first,) = sent(core, GW1)
    core.outbox.clear()
    answer(core, first, 503, GW1, 0.05, [("Retry-After", "60")])
    core.outbox.clear()
    invite(core, call_id="c2", now=1.0)
    assert not sent(core, GW1) and len(sent(core, GW2)) == 1  # GW1 skipped while down
    core.outbox.clear()
    invite(core, call_id="c3", now=61.0)
    assert len(sent(core, GW1)) == 1


def test_all_gateways_down_answers_at_once_without_sending() -> None:
    router = Router(GatewayGroup("d", [gw(GW1), gw(GW2)]))
    for g in router.all_gateways():
        g.up = False
    core = make_core(router)
    invite(core)
    assert not sent(core, GW1) and not sent(core, GW2)
    assert [m.status for m in sent(core, CALLER) if m.status >= 200] == [503]


def test_refused_prefix_and_group_routing() -> None:
    mobile = GatewayGroup("m", [gw(GW2)])
    core = make_core(Router(GatewayGroup("d", [gw(GW1)]), {"m": mobile},
                            {"139": "m", "170": REFUSED}))
    invite(core, callee=B)
    assert len(sent(core, GW2)) == 1 and not sent(core, GW1)
    core.outbox.clear()
    invite(core, callee="17000000001", call_id="c2")
    assert [m.status for m in sent(core, CALLER) if m.status >= 200] == [403]
    assert not sent(core, GW1) and not sent(core, GW2)


def test_a_late_answer_on_an_abandoned_branch_is_released() -> None:
    core = failover_core(branch_timeout=2.0)
    invite(core)
    (first,) = sent(core, GW1)
    tick(core, 2.05)  # GW1 silent: the INVITE went to GW2
    core.outbox.clear()
    answer(core, first, 200, GW1, 2.5, [("Contact", f"<sip:{B}@{GW1[0]}:{GW1[1]}>")])
    methods = [m.method for m in sent(core, GW1)]
    assert methods == ["ACK", "BYE"]
    bye = sent(core, GW1)[1]
    assert bye.uri_text == f"sip:{B}@{GW1[0]}:{GW1[1]}" and bye.to.tag == "gtag"
    assert not sent(core, CALLER)  # the caller never hears of that branch
    assert core.stats["late_answers_released"] == 1


# ---- probing -------------------------------------------------------------------------------
def test_probes_mark_a_gateway_down_and_up_again() -> None:
    a, b = gw(GW1), gw(GW2)
    probe = ProbeSettings(enabled=True, interval=1.0, down_after=2, up_after=2)
    core = make_core(Router(GatewayGroup("d", [a, b])), probe=probe)
    now = 0.0
    for _round in range(3):  # GW1 answers, GW2 stays silent
        deadline = core.next_deadline()
        assert deadline is not None
        now = max(now, deadline)
        core.handle_timers(now)
        for opt in sent(core, GW1):
            if opt.method == "OPTIONS":
                answer(core, opt, 200, GW1, now + 0.01)
        core.outbox.clear()
        now += 0.01
    tick_to = now + 1.0
    core.handle_timers(tick_to)
    assert a.up and not b.up
    assert dict(core.gateway_states()) == {a.uri: 1, b.uri: 0}
    assert core.stats["gateway_state_changes"] == 1
    # GW2 comes back: two answered probes
    for _round in range(2):
        core.outbox.clear()
        tick_to += 1.0
        core.handle_timers(tick_to)
        for opt in sent(core, GW2):
            if opt.method == "OPTIONS":
                answer(core, opt, 200, GW2, tick_to + 0.01)
    assert b.up


def test_a_probe_answered_with_a_code_not_listed_counts_as_failure() -> None:
    a, b = gw(GW1), gw(GW2)
    probe = ProbeSettings(enabled=True, interval=1.0, down_after=1, up_after=1,
                          alive_codes=frozenset({200}))
    core = make_core(Router(GatewayGroup("d", [a, b])), probe=probe)
    core.handle_timers(0.0)
    (opt,) = [m for m in sent(core, GW1) if m.method == "OPTIONS"]
    assert opt.top_via.branch.startswith("z9hG4bKs7")
    answer(core, opt, 404, GW1, 0.01)
    assert not a.up
