"""Flood protection per source address (proxy/flood.py and ProxyCore.refuse_flood), sans-IO
with a fake clock."""

from __future__ import annotations

from proxy.flood import ALLOWED, BLOCKED, NEWLY_BLOCKED, FloodGuard, FloodSettings
from proxy.sip.message import parse_message
from tests.test_core import make_core, request

TRUSTED = "127.0.0.1"
STRANGER = ("127.0.0.2", 5099)


def guard(**kw) -> FloodGuard:
    args = {"limit": 3, "cooldown_s": 10.0, "trusted_limit": None,
            "is_trusted": lambda ip: ip == TRUSTED, **kw}
    return FloodGuard(args.pop("limit"), args.pop("cooldown_s"), args.pop("trusted_limit"),
                      args.pop("is_trusted"), **args)


def test_over_the_limit_in_one_second_blocks_for_the_cooldown() -> None:
    g = guard()
    assert [g.check("10.0.0.1", 100.1 + i * 0.1) for i in range(5)] == [
        ALLOWED, ALLOWED, ALLOWED, NEWLY_BLOCKED, BLOCKED]
    assert g.check("10.0.0.2", 100.6) == ALLOWED  # another source is not affected
    assert g.check("10.0.0.1", 110.3) == BLOCKED  # still cooling down
    assert g.check("10.0.0.1", 110.5) == ALLOWED  # over: counted afresh
    assert g.blocked_sources(110.5) == []


def test_a_worker_seeing_its_share_blocks_at_the_limit_for_all() -> None:
    """Two workers, each handed half of one source's datagrams by the kernel, count each as
    two: a limit of 6 a second lets each worker pass 3, 6 in all, not 12."""
    workers = [guard(limit=6), guard(limit=6)]
    verdicts = [workers[i % 2].check("10.0.0.1", 100.1 + i * 0.05, weight=2) for i in range(10)]
    assert verdicts.count(ALLOWED) == 6 and verdicts[6:] == [NEWLY_BLOCKED, NEWLY_BLOCKED,
                                                            BLOCKED, BLOCKED]


def test_the_window_is_per_second() -> None:
    g = guard()
    for second in range(10):  # 3 a second, every second: never blocked
        assert {g.check("10.0.0.1", second + 0.2 * i) for i in range(3)} == {ALLOWED}


def test_trusted_peers_are_exempt_or_have_their_own_limit() -> None:
    exempt = guard()
    assert {exempt.check(TRUSTED, 5.0) for _ in range(1000)} == {ALLOWED}
    own = guard(trusted_limit=10)
    assert [own.check(TRUSTED, 5.0) for _ in range(11)][-2:] == [ALLOWED, NEWLY_BLOCKED]
    assert own.check("10.0.0.1", 5.0) == ALLOWED


def test_memory_stays_bounded_against_spoofed_sources() -> None:
    g = guard(max_sources=100)
    for i in range(1000):  # every request from a new address, all in one second
        g.check(f"10.1.{i // 256}.{i % 256}", 50.0)
    assert len(g) == 100
    swept_at = g._sweep_at
    for i in range(500):  # still full of active sources: no sweep a packet
        g.check(f"10.2.{i // 256}.{i % 256}", 50.5)
    assert g._sweep_at == swept_at and len(g) == 100
    g.check("10.9.9.9", 52.5)  # later: the idle ones are swept to make room
    assert len(g) == 1


def flood_core(action: str = "reply", trusted_limit: int | None = None):
    core = make_core(flood=FloodSettings(3, 10.0, action, trusted_limit))
    core.configure_flood()
    lines: list[tuple[str, dict]] = []
    core.log = lambda event, **kw: lines.append((event, kw))
    return core, lines


def options(n: int) -> bytes:
    return request([
        "OPTIONS sip:127.0.0.1:5060 SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.2:5099;branch=z9hG4bK-f{n};rport",
        "From: <sip:probe@127.0.0.2>;tag=f", "To: <sip:127.0.0.1>",
        f"Call-ID: flood-{n}", f"CSeq: {n} OPTIONS", "Max-Forwards: 70"])


def test_core_answers_503_with_retry_after_and_logs_once_per_cooldown() -> None:
    core, lines = flood_core()
    refused = [core.refuse_flood(STRANGER, "udp", 7.0, data=options(i)) for i in range(6)]
    assert refused == [False, False, False, True, True, True]
    replies = [parse_message(o.data) for o in core.outbox]
    assert [r.status for r in replies] == [503, 503, 503]
    assert {r.header("retry-after") for r in replies} == {"10"}
    assert [o.dest for o in core.outbox] == [STRANGER] * 3
    assert [(e, kw["source"]) for e, kw in lines] == [("flood_blocked", "127.0.0.2")]
    assert core.stats["flood_blocked"] == 3 and core.stats["flood_sources_blocked"] == 1
    # the next cool-down is logged again
    core.refuse_flood(STRANGER, "udp", 17.5, data=options(10))
    for i in range(4):
        core.refuse_flood(STRANGER, "udp", 17.6, data=options(11 + i))
    assert len(lines) == 2


def test_drop_sends_nothing() -> None:
    core, _lines = flood_core("drop")
    refused = [core.refuse_flood(STRANGER, "udp", 7.0, data=options(i)) for i in range(5)]
    assert refused == [False, False, False, True, True] and core.outbox == []


def test_gateways_count_as_trusted() -> None:
    core, _lines = flood_core(trusted_limit=None)
    gateway = ("127.0.0.1", 5090)  # make_core's gateway (and trusted peer)
    assert not any(core.refuse_flood(gateway, "udp", 7.0, data=options(i)) for i in range(50))
    core.settings.is_gateway_address = lambda ip: ip == "127.0.0.3"
    core.configure_flood()
    assert not any(core.refuse_flood(("127.0.0.3", 5060), "udp", 7.0, data=options(i))
                   for i in range(50))


def test_off_by_default() -> None:
    assert make_core().flood is None
