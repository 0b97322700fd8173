"""Call records made by the core's tracking hooks, sans-IO: every way a call attempt ends gives
one record with the right times, `release_dir`, `refusal`, status and Q.850 cause."""

from __future__ import annotations

from proxy.bindings.model import Outcome, Resolution
from proxy.core import ProxyCore
from proxy.records.model import FIELDS, call_key, parse_iso
from proxy.records.tracker import CallTracker, finish
from proxy.sip.message import build_response, parse_message
from tests.test_core import (
    CALLER,
    GATEWAY,
    WALL,
    A,
    B,
    Dialog,
    X,
    invite,
    make_core,
    request,
)

T0 = 1_800_000_000.0  # the wall clock at the core's monotonic 0


def tracked_core(**overrides) -> tuple[ProxyCore, CallTracker]:
    core = make_core(**overrides)
    tracker = CallTracker("test-1", event_tenants=frozenset({"shop1"}), wall_offset=T0)
    core.calls = tracker
    return core, tracker


def records(tracker: CallTracker) -> list[dict[str, str]]:
    return [op[1] for op in tracker.out if op[0] == "record"]


def ops(tracker: CallTracker, kind: str) -> list[tuple]:
    return [op for op in tracker.out if op[0] == kind]


RESOLVED = Resolution(Outcome.ROUTE, B, 1e12, binding_id="b" * 32, tenant="shop1",
                      out_id="o-1", order_id="order-1", user_data="ud", leg="a_to_b")


def start_call(core: ProxyCore, resolution: Resolution = RESOLVED, call_id: str = "c-1") -> bytes:
    core.receive_datagram(invite(extra=()).replace(b"Call-ID: ", b"Call-ID: " + call_id.encode()
                                                   + b"x"), CALLER, "udp", 0.0)
    relay, _x, _caller = core.lookups.pop()
    core.complete_lookup(relay, resolution, 0.25)
    (out,) = [o.data for o in core.outbox if o.dest == GATEWAY]
    core.outbox.clear()
    return out


def reply(core: ProxyCore, forwarded: bytes, status: int, now: float, **kw) -> None:
    msg = parse_message(forwarded)
    resp = build_response(msg, status, "X", to_tag="btag", **kw)
    core.receive_datagram(resp.serialize(), GATEWAY, "udp", now)


def test_answered_call_gives_one_record_at_the_bye_with_every_field_in_order() -> None:
    core, tracker = tracked_core()
    WALL[0] = T0
    d = Dialog.__new__(Dialog)
    Dialog.__init__(d, core)  # INVITE at 0.0, answered at 0.1
    assert not records(tracker)
    (opened,) = ops(tracker, "open")
    assert opened[1] == call_key(d.caller_call_id)
    d.from_caller("BYE", now=5.35, extra=('Reason: Q.850;cause=16;text="Normal"',))
    (rec,) = records(tracker)
    assert set(rec) <= set(FIELDS)
    assert rec["caller"] == A and rec["callee"] == B and rec["x"] == X
    assert rec["display_number"] == X and rec["call_id"] == d.caller_call_id
    assert rec["release_dir"] == "caller" and rec["sip_status"] == "200"
    assert rec["q850_cause"] == "16" and "refusal" not in rec
    times = [parse_iso(rec[k]) for k in ("invite_at", "forwarded_at", "answer_at",
                                          "release_at")]
    assert times == sorted(times) and times[0] == T0
    assert rec["talk_s"] == "6"  # 5.25 s, rounded up as billing does
    assert rec["instance"] == "test-1" and len(rec["record_id"]) == 32
    assert ops(tracker, "close") == [("close", opened[1])]
    # a retransmitted BYE makes no second record
    d.from_caller("BYE", now=5.8)
    assert len(records(tracker)) == 1


def test_callee_bye_is_released_by_the_callee() -> None:
    core, tracker = tracked_core()
    d = Dialog(core)
    d.from_callee("BYE", now=3.0)
    (rec,) = records(tracker)
    assert rec["release_dir"] == "callee" and rec["q850_cause"] == "16"


def test_binding_fields_ring_and_events() -> None:
    core, tracker = tracked_core()
    fwd = start_call(core)
    reply(core, fwd, 180, 1.0)
    reply(core, fwd, 200, 3.0)
    [(_, key, fields)] = ops(tracker, "open")
    assert fields["binding_id"] == "b" * 32 and fields["tenant"] == "shop1"
    assert fields["out_id"] == "o-1" and fields["order_id"] == "order-1"
    assert fields["user_data"] == "ud" and fields["direction"] == "a_to_b"
    assert fields["gateway"].startswith("sip:127.0.0.1:5090")
    tracker.bye(key, "callee", None, 10.0)
    (rec,) = records(tracker)
    assert rec["ring_ms"] == "2000" and rec["talk_s"] == "7"
    assert [e[1]["event"] for e in ops(tracker, "event")] == ["start", "ring", "answer", "end"]


def test_bye_for_a_call_this_process_does_not_hold_goes_to_redis() -> None:
    core, tracker = tracked_core()
    d = Dialog(core)
    tracker.live.clear()  # as after a restart
    d.from_caller("BYE", now=4.0)
    (rel,) = ops(tracker, "release")
    assert rel[1] == call_key(d.caller_call_id) and rel[2]["release_dir"] == "caller"
    d.from_caller("BYE", now=4.5)  # its retransmission: nothing more
    assert len(ops(tracker, "release")) == 1 and not records(tracker)
    # what the shell does with the Redis hash
    opened = ops(tracker, "open")[0][2]
    rec = finish(opened, rel[2])
    assert rec["talk_s"] == "4" and rec["release_dir"] == "caller"


def test_busy_cancel_and_timer_c() -> None:
    core, tracker = tracked_core()
    fwd = start_call(core, call_id="busy")
    reply(core, fwd, 486, 1.0, headers=[("Reason", "Q.850;cause=17")])
    core, tracker2 = tracked_core(timer_c=2.0)
    fwd2 = start_call(core, call_id="tc")
    reply(core, fwd2, 180, 0.5)
    core.handle_timers(3.0)
    (busy,) = records(tracker)
    (tc,) = records(tracker2)
    assert (busy["refusal"], busy["release_dir"], busy["sip_status"], busy["q850_cause"]) == (
        "busy", "callee", "486", "17")
    assert (tc["refusal"], tc["release_dir"], tc["sip_status"], tc["q850_cause"]) == (
        "no_answer", "proxy", "408", "102")
    assert "ring_at" in tc and "answer_at" not in tc and tc["ring_ms"] == "2500"


def test_cancel_while_ringing_is_released_by_the_caller() -> None:
    core, tracker = tracked_core()
    fwd = start_call(core, call_id="cx")
    reply(core, fwd, 180, 0.5)
    inv = invite().replace(b"Call-ID: ", b"Call-ID: cxx")
    cancel = inv.replace(b"INVITE sip", b"CANCEL sip", 1).replace(b"1 INVITE", b"1 CANCEL")
    core.receive_datagram(cancel, CALLER, "udp", 1.0)
    reply(core, fwd, 487, 1.2)
    (rec,) = records(tracker)
    assert (rec["refusal"], rec["release_dir"], rec["sip_status"]) == (
        "cancelled", "caller", "487")


def test_refusals_name_their_reason_and_are_direction_refused() -> None:
    core, tracker = tracked_core()
    for outcome in (Outcome.NO_BINDING, Outcome.NOT_PARTY, Outcome.DIRECTION_RESTRICTED):
        core.receive_datagram(invite(branch=outcome.value), CALLER, "udp", 0.0)
        relay, _x, _c = core.lookups.pop()
        core.complete_lookup(relay, Resolution(outcome, None, 1e12), 0.01)
    relay = None
    core.receive_datagram(invite(branch="store"), CALLER, "udp", 0.0)
    relay, _x, _c = core.lookups.pop()
    core.fail_lookup(relay, 0.02)
    core.receive_datagram(invite(branch="untrusted"), ("10.0.0.9", 5060), "udp", 0.0)
    core.overloaded = True
    core.receive_datagram(invite(branch="shed"), CALLER, "udp", 0.0)
    got = [(r["refusal"], r["sip_status"], r["direction"], r["release_dir"])
           for r in records(tracker)]
    assert got == [("no_binding", "404", "refused", "proxy"),
                   ("not_party", "403", "refused", "proxy"),
                   ("direction_restricted", "403", "refused", "proxy"),
                   ("store_unavailable", "503", "refused", "proxy"),
                   ("untrusted_peer", "403", "refused", "proxy"),
                   ("overloaded", "503", "refused", "proxy")]
    assert all(r["caller"] == A and r["x"] == X for r in records(tracker))
    assert len({r["record_id"] for r in records(tracker)}) == 6


def test_a_core_without_records_is_unchanged() -> None:
    core = make_core()
    Dialog(core).from_caller("BYE")
    assert core.calls is None


def test_requests_helper_is_used() -> None:  # keeps the shared helpers importable here
    assert request(["OPTIONS sip:x SIP/2.0"]).startswith(b"OPTIONS")


def test_a_repeated_bye_is_recognised_until_its_memory_expires_in_order() -> None:
    tracker = CallTracker("test-1", wall_offset=T0)
    for i in range(5):  # calls this process does not hold: each BYE releases one in Redis
        tracker.bye(f"k{i}", "caller", None, float(i))
    tracker.bye("k1", "callee", None, 10.0)  # a retransmission: no second release
    assert tracker.stats == {"records_released_from_redis": 5, "records_bye_repeated": 1}
    tracker.expire(33.5)  # k0 and k1 (until 32 and 33) are forgotten, k2.. remembered
    assert sorted(tracker._ended) == ["k2", "k3", "k4"] and len(tracker._ended_order) == 3
    tracker.bye("k1", "caller", None, 40.0)  # the same key, long after: a new release
    tracker.bye("k3", "caller", None, 40.0)
    assert [op[1] for op in ops(tracker, "release")] == ["k0", "k1", "k2", "k3", "k4", "k1"]
    tracker.expire(71.0)  # k2..k4 long gone, k1 put again at 40: kept until 72
    assert list(tracker._ended) == ["k1"]
    tracker.expire(72.0)
    assert not tracker._ended and not tracker._ended_order
