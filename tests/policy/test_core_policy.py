"""The core's policy step, sans-IO: queued after the lookup, resumed by complete_policy;
refusals answered with the rule's status and Reason, recorded `policy:<rule>`, counted and
logged masked; concurrency given back at the end of the call, whichever end it is."""

from __future__ import annotations

from dataclasses import replace

from proxy.bindings.model import Outcome, Resolution
from proxy.policy.engine import CONNECT, Decision
from proxy.records.model import call_key
from proxy.records.tracker import CallTracker
from proxy.sip.message import parse_message
from tests.test_core import (
    CALLER,
    GATEWAY,
    A,
    B,
    Dialog,
    _callee_reply,
    invite,
    make_core,
)

RESOLVED = Resolution(Outcome.ROUTE, B, 1e12, "bid-1", "shop1")


def policy_core(**overrides):
    lines: list[tuple[str, dict]] = []
    core = make_core(policy=True, policy_holds=True, **overrides)
    core.log = lambda event, **kw: lines.append((event, kw))
    core.calls = CallTracker("test-1", wall_offset=0.0)
    return core, lines


def queued(core, branch: str = "b1"):
    core.outbox.clear()
    core.receive_datagram(invite(branch=branch), CALLER, "udp", 0.0)
    relay, _x, _caller = core.lookups.pop()
    core.complete_lookup(relay, RESOLVED, 0.0)
    assert not [o for o in core.outbox if o.dest == GATEWAY]  # nothing forwarded yet
    (checked, resolution), = core.policy_checks
    core.policy_checks.clear()
    assert checked is relay and resolution is RESOLVED
    core.outbox.clear()
    return relay


def test_without_policy_the_lookup_forwards_at_once() -> None:
    core = make_core()
    core.receive_datagram(invite(), CALLER, "udp", 0.0)
    relay, _x, _caller = core.lookups.pop()
    core.complete_lookup(relay, RESOLVED, 0.0)
    assert not core.policy_checks and [o for o in core.outbox if o.dest == GATEWAY]


def test_a_refusal_gets_the_rule_status_reason_record_counter_and_a_masked_log() -> None:
    core, lines = policy_core()
    relay = queued(core)
    core.complete_policy(relay, Decision(False, "caller-per-minute", 486, "Over Limit",
                                         "5 calls per 60 s"), 0.01)
    sent = [parse_message(o.data) for o in core.outbox if o.dest == CALLER]
    assert [(m.status, m.reason) for m in sent] == [(486, "Over Limit")]
    assert sent[0].header("reason") == 'SIP;cause=486;text="Over Limit"'
    assert not [o for o in core.outbox if o.dest == GATEWAY]
    assert core.stats["policy_refused:caller-per-minute"] == 1
    assert core.stats["calls_policy_refused"] == 1
    (record,) = [op[1] for op in core.calls.out if op[0] == "record"]
    assert (record["refusal"], record["sip_status"], record["tenant"]) == (
        "policy:caller-per-minute", "486", "shop1")
    refused = [kw for event, kw in lines if event == "policy_refused"]
    assert refused and refused[0]["rule"] == "caller-per-minute"
    assert A not in repr(lines) and B not in repr(lines)


def test_bulk_refusal_is_flagged() -> None:
    core, lines = policy_core()
    relay = queued(core)
    core.complete_policy(relay, Decision(False, "bulk", 403, "Call Policy", flag="bulk_caller"),
                         0.0)
    assert core.stats["bulk_caller"] == 1 and core.stats["policy_refused:bulk"] == 1
    assert any(event == "bulk_caller" for event, _ in lines)


def test_connect_forwards_to_the_decided_callee_and_carries_max_call_s() -> None:
    core, _ = policy_core()
    relay = queued(core)
    relay.max_call_s = 60
    core.complete_policy(relay, replace(CONNECT, callee="13700000001", max_call_s=90), 0.0)
    (out,) = [parse_message(o.data) for o in core.outbox if o.dest == GATEWAY]
    assert out.uri.user == "13700000001"
    assert relay.max_call_s == 60  # the lower one wins
    relay2 = queued(core, "b2")
    core.complete_policy(relay2, replace(CONNECT, callee=B, max_call_s=30), 0.0)
    assert relay2.max_call_s == 30


def test_concurrency_is_released_when_an_unanswered_call_ends() -> None:
    core, _ = policy_core()
    relay = queued(core)
    core.complete_policy(relay, replace(CONNECT, callee=B, slot="k1"), 0.0)
    (sent,) = [o.data for o in core.outbox if o.dest == GATEWAY]
    core.outbox.clear()
    core.receive_datagram(_callee_reply(sent, 486), GATEWAY, "udp", 0.2)
    assert core.policy_out == [("end", "k1")]


def test_a_call_cancelled_during_the_check_gives_its_place_back() -> None:
    core, _ = policy_core()
    relay = queued(core)
    core._final(relay, core.settings.no_gateway, 0.1, outcome="no gateway")
    core.complete_policy(relay, replace(CONNECT, callee=B, slot="k2"), 0.2)
    assert core.policy_out == [("end", "k2")]
    relay = queued(core, "b3")
    core.policy_out.clear()
    core.complete_policy(relay, Decision(False, "webhook", 403, "No", slot="k3"), 0.0)
    assert core.policy_out == [("end", "k3")]


def test_an_answered_call_is_held_until_its_bye() -> None:
    core = make_core(policy=True, policy_holds=True)
    original = core.complete_lookup

    def through_policy(relay, resolution, now):
        original(relay, resolution, now)
        for r, res in core.policy_checks:
            core.complete_policy(r, replace(CONNECT, callee=res.callee,
                                            slot=call_key(r.request.call_id)), now)
        core.policy_checks.clear()

    d = Dialog(core, complete_lookup=through_policy)
    key = call_key(d.caller_call_id)
    assert core.policy_out == [("answered", key)]
    d.from_callee("BYE")
    assert core.policy_out == [("answered", key), ("end", key)]


def test_an_unanswered_policy_step_ends_in_503() -> None:
    core, _ = policy_core(policy_deadline=0.5)
    queued(core)
    core.handle_timers(0.6)
    # the held 100 Trying (nothing else had gone out by 200 ms), then the 503
    assert [parse_message(o.data).status for o in core.outbox if o.dest == CALLER] == [100, 503]


def test_refusals_by_rule_are_one_labelled_metric() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from proxy.metrics import WorkerCollector

    registry = CollectorRegistry()
    registry.register(WorkerCollector(
        lambda: {"policy_refused:caller-per-minute": 2, "policy_refused:bulk": 1,
                 "calls_policy_refused": 3}, lambda: {}))
    text = generate_latest(registry).decode()
    assert 'sip700_policy_refused_total{rule="caller-per-minute"} 2.0' in text
    assert 'sip700_policy_refused_total{rule="bulk"} 1.0' in text
    assert "sip700_calls_policy_refused_total 3.0" in text
    assert "policy_refused:" not in text


def test_a_bindings_own_time_window_is_enforced_with_the_policy_off() -> None:
    """A binding's time_window needs no shared state: the core checks it on its lookup, with
    policy.refusal's status, whether a policy is configured or not."""
    from tests.test_core import WALL

    core = make_core(wall_clock=lambda: WALL[0])
    core.calls = CallTracker("test-1", wall_offset=0.0)
    lines: list[tuple[str, dict]] = []
    core.log = lambda event, **kw: lines.append((event, kw))
    # WALL[0] is 2027-01-15 08:00:00 UTC = 16:00 in Shanghai, 09:00 in Berlin
    for n, (window, forwarded) in enumerate((("08:00-22:00", True), ("17:00-08:00", False),
                                             ("08:30-12:00 Europe/Berlin", True),
                                             ("09:30-12:00 Europe/Berlin", False))):
        core.outbox.clear()
        core.calls.out.clear()
        core.receive_datagram(invite(branch=f"w{n}"), CALLER, "udp", 0.0)
        relay, _x, _caller = core.lookups.pop()
        core.complete_lookup(relay, replace(RESOLVED, time_window=window), 0.0)
        sent = [parse_message(o.data) for o in core.outbox]
        to_gateway = [o for o in core.outbox if o.dest == GATEWAY]
        if forwarded:
            assert to_gateway, window
            continue
        assert not to_gateway, window
        final = sent[-1]
        assert (final.status, final.reason) == (403, "Call Policy"), window
        (record,) = [op[1] for op in core.calls.out if op[0] == "record"]
        assert record["refusal"] == "policy:time_window"
    assert core.stats["policy_refused:time_window"] == 2
    assert all(B not in repr(kw) for _, kw in lines)
