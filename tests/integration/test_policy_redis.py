"""The policy's Redis side against the machine's Redis (no SIP): the counter script's sliding
windows, concurrency leases and their release / refresh / self-healing, the bulk detector,
two clients sharing the caps, and the Redis blocklists with their version counter."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import yaml

from proxy.bindings.redis_lookup import LeanConnection, LookupReplyError, lean_target
from proxy.config import load_config_text
from proxy.policy.blocklist_store import BlocklistStore
from proxy.policy.engine import CallFacts, PolicyEngine
from proxy.policy.redis_counters import RedisCounters
from proxy.policy.spec import compile_policy
from tests.integration.procs import REDIS_URL, delete_redis_prefix

X, A, B = "700100000000001", "13800000001", "13900000001"


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    p = f"sip700test:{uuid.uuid4().hex[:12]}:policy:"
    yield p
    delete_redis_prefix(p)


@pytest.fixture
async def client() -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(REDIS_URL)
    yield c
    await c.aclose()


def engine(prefix: str, policy: dict) -> PolicyEngine:
    cfg = load_config_text(yaml.safe_dump({
        "carrier": {"gateways": ["sip:127.0.0.1:5090"]}, "store": {"backend": "redis"},
        "policy": {"key_prefix": prefix, **policy}}), Path("/tmp/p.yaml"))
    spec = compile_policy(cfg)
    assert spec is not None
    return PolicyEngine(spec, lambda n: n.startswith("700"))


def facts(n: int, caller: str = A, callee: str = B) -> CallFacts:
    return CallFacts(f"call{n}", X, caller, callee, "shop1")


async def decide(e: PolicyEngine, counters: RedisCounters, f: CallFacts, now_ms: int):
    plan = e.plan(f)
    assert plan is not None
    return e.counter_verdict(f, plan, await counters.check(plan, f, now_ms))


async def test_sliding_window_allows_n_calls_then_refuses_until_one_ages_out(
        prefix: str, client: aioredis.Redis) -> None:
    e = engine(prefix, {"rate_limits": [{"name": "caller-min", "per": "caller", "max_calls": 3,
                                         "window_s": 60, "code": 486, "reason": "Over"}]})
    counters = RedisCounters(client, prefix + "h:", 120_000)
    t0 = 1_000_000_000
    results = [await decide(e, counters, facts(i), t0 + i * 10_000) for i in range(4)]
    assert [d.connect for d in results] == [True, True, True, False]
    assert (results[3].rule, results[3].code) == ("caller-min", 486)
    # the refused call counted nowhere; the first call leaves the window at t0 + 60 s
    assert not (await decide(e, counters, facts(5), t0 + 59_999)).connect
    assert (await decide(e, counters, facts(6), t0 + 60_001)).connect
    # another caller has its own window
    assert (await decide(e, counters, facts(7, caller="13800000002"), t0 + 60_002)).connect
    # the caller's list keeps the last max_calls times only, newest first, and expires
    key = (await client.keys(prefix + "l:*caller-min:" + A))[0]
    assert [int(t) for t in await client.lrange(key, 0, -1)] == [
        t0 + 60_001, t0 + 20_000, t0 + 10_000]
    assert 0 < await client.pttl(key) <= 60_000
    # the boundary: a call exactly one window after the oldest counted one is let through
    assert (await decide(e, counters, facts(8), t0 + 70_000)).connect
    assert not (await decide(e, counters, facts(9), t0 + 79_999)).connect


async def test_a_lower_cap_after_a_reload_counts_the_calls_already_made(
        prefix: str, client: aioredis.Redis) -> None:
    rule = {"name": "caller-min", "per": "caller", "max_calls": 4, "window_s": 60}
    counters = RedisCounters(client, prefix + "h:", 120_000)
    t0 = 1_000_000_000
    e = engine(prefix, {"rate_limits": [rule]})
    assert all([(await decide(e, counters, facts(i), t0 + i)).connect for i in range(3)])
    lower = engine(prefix, {"rate_limits": [{**rule, "max_calls": 2}]})
    assert not (await decide(lower, counters, facts(3), t0 + 10)).connect
    higher = engine(prefix, {"rate_limits": [{**rule, "max_calls": 4}]})
    assert (await decide(higher, counters, facts(4), t0 + 11)).connect
    assert not (await decide(higher, counters, facts(5), t0 + 12)).connect


async def test_two_clients_share_one_cap(prefix: str) -> None:
    e = engine(prefix, {"rate_limits": [{"name": "x-day", "per": "x", "max_calls": 5,
                                         "window_s": 86400}]})
    clients = [aioredis.Redis.from_url(REDIS_URL) for _ in range(2)]
    try:
        counters = [RedisCounters(c, prefix + "h:", 120_000) for c in clients]
        allowed = 0
        for i in range(12):
            d = await decide(e, counters[i % 2], facts(i), 2_000_000_000 + i)
            allowed += d.connect
        assert allowed == 5
    finally:
        for c in clients:
            await c.aclose()


async def test_concurrency_release_refresh_and_self_healing(prefix: str,
                                                            client: aioredis.Redis) -> None:
    e = engine(prefix, {"concurrency": [{"name": "x-conc", "per": "x", "max_calls": 2}]})
    counters = RedisCounters(client, prefix + "h:", 30_000)
    t0 = 3_000_000_000
    first = await decide(e, counters, facts(1), t0)
    second = await decide(e, counters, facts(2), t0)
    third = await decide(e, counters, facts(3), t0)
    assert (first.connect, second.connect, third.connect) == (True, True, False)
    assert first.slot == "call1" and third.rule == "x-conc"
    await counters.release(["call1"])
    await counters.release(["call1"])  # a second BYE: nothing more
    assert (await decide(e, counters, facts(4), t0 + 1)).connect
    assert not (await decide(e, counters, facts(5), t0 + 2)).connect
    # call2's lease is renewed, call4's instance "died": its place frees when the lease ends
    gone = await counters.refresh(["call2", "call1"], t0 + 20_000)
    assert gone == ["call1"]  # released already: the holder stops renewing it
    assert not (await decide(e, counters, facts(6), t0 + 29_000)).connect
    assert (await decide(e, counters, facts(7), t0 + 30_001)).connect  # call4 expired
    assert not (await decide(e, counters, facts(8), t0 + 30_002)).connect  # call2 renewed


async def test_bulk_detector_counts_distinct_callees(prefix: str,
                                                     client: aioredis.Redis) -> None:
    e = engine(prefix, {"bulk": {"max_distinct_callees": 2, "window_s": 600}})
    counters = RedisCounters(client, prefix + "h:", 120_000)
    t0 = 4_000_000_000
    callees = ["13900000001", "13900000002", "13900000001", "13900000003"]
    got = [await decide(e, counters, facts(i, callee=c), t0 + i) for i, c in enumerate(callees)]
    assert [d.connect for d in got] == [True, True, True, False]
    assert (got[3].rule, got[3].flag) == ("bulk", "bulk_caller")
    assert (await decide(e, counters, facts(9, callee="13900000003"), t0 + 600_002)).connect


async def test_redis_blocklists_and_their_version(prefix: str, client: aioredis.Redis) -> None:
    store = BlocklistStore(client, prefix)
    v0 = await store.version()
    assert await store.add(None, "caller:13800000009")
    assert not await store.add(None, "caller:13800000009")
    assert await store.add("shop1", "prefix:170")
    assert await store.version() != v0
    lists = await store.load_all()
    assert lists[""].match("13800000009", B, X) == "caller"
    assert lists["shop1"].match("17000000000", B, X) == "prefix"
    assert await store.entries("shop1") == ["prefix:170"]
    assert await store.remove("shop1", "prefix:170")
    assert not await store.remove("shop1", "prefix:170")
    assert "shop1" not in await store.load_all()


@pytest.mark.parametrize("fresh_redis", [False, True], ids=["scripts-loaded", "noscript"])
async def test_the_lean_connection_checks_and_releases_many_at_once(
        prefix: str, client: aioredis.Redis, fresh_redis: bool) -> None:
    """The per-call path over the store's lean connection (raw RESP, what the proxy uses):
    checks, then one write releasing several calls; a Redis that forgot the scripts
    (NOSCRIPT) is served through redis-py, which loads them again."""
    target = lean_target(REDIS_URL, None, None)
    assert target is not None
    lean = LeanConnection(target)
    try:
        e = engine(prefix, {"concurrency": [{"name": "x-conc", "per": "x", "max_calls": 3}]})
        counters = RedisCounters(client, prefix + "h:", 30_000, lean=lean, timeout_s=2.0)
        t0 = 3_000_000_000
        if fresh_redis:
            await client.script_flush()
        verdicts = [await decide(e, counters, facts(n), t0) for n in (1, 2, 3, 4)]
        assert [v.connect for v in verdicts] == [True, True, True, False]
        if fresh_redis:
            await client.script_flush()
        await counters.release(["call1", "call2", "call3"])
        verdicts = [await decide(e, counters, facts(n), t0 + 1) for n in (5, 6, 7, 8)]
        assert [v.connect for v in verdicts] == [True, True, True, False]
    finally:
        lean.close()


@pytest.mark.parametrize("fresh_redis", [False, True], ids=["scripts-loaded", "noscript"])
async def test_one_write_checks_a_batch_of_calls_in_order(
        prefix: str, client: aioredis.Redis, fresh_redis: bool) -> None:
    """What the shell sends for one event-loop pass: every call's script in one write, the
    replies in the calls' order (the cap lets the first three through, not any three); after
    a script flush the batch is still decided, each call counted once."""
    target = lean_target(REDIS_URL, None, None)
    assert target is not None
    lean = LeanConnection(target)
    try:
        e = engine(prefix, {"rate_limits": [{"name": "x-cap", "per": "x", "max_calls": 3,
                                             "window_s": 60}]})
        counters = RedisCounters(client, prefix + "h:", 30_000, lean=lean, timeout_s=2.0)
        await counters.check(*_plan_and_facts(e, 0), 3_000_000_000)  # the script is loaded
        await client.delete(*(await client.keys(prefix + "*")))
        if fresh_redis:
            await client.script_flush()
        calls = [_plan_and_facts(e, n) for n in range(1, 6)]
        replies = await counters.check_many(calls, 3_000_000_000)
        verdicts = [e.counter_verdict(f, p, r) for (p, f), r in zip(calls, replies, strict=True)]
        assert [v.connect for v in verdicts] == [True, True, True, False, False]
        assert verdicts[3].rule == "x-cap"
        (key,) = await client.keys(prefix + "l:*")
        assert await client.llen(key) == 3  # counted once each, NOSCRIPT retry or not
    finally:
        lean.close()


def _plan_and_facts(e: PolicyEngine, n: int):
    f = facts(n)
    plan = e.plan(f)
    assert plan is not None
    return plan, f


async def test_an_error_reply_stays_with_its_own_command() -> None:
    """call_each: a batch where one command fails gives the others their replies."""
    target = lean_target(REDIS_URL, None, None)
    assert target is not None
    lean = LeanConnection(target)
    try:
        replies = await lean.call_each([("ECHO", "a"), ("NOSUCHCOMMAND",), ("ECHO", "b")])
        assert replies[0] == b"a" and replies[2] == b"b"
        assert isinstance(replies[1], LookupReplyError)
        assert await lean.call_each([]) == []
        with pytest.raises(LookupReplyError):
            await lean.call_many([("ECHO", "a"), ("NOSUCHCOMMAND",)])
    finally:
        lean.close()


async def test_send_each_answers_by_callback_in_order_and_gives_up_at_its_time_out(
        prefix: str) -> None:
    """The per-call path without a task: nothing is sent before the connection is up; then
    the replies come to the callback in order (an error reply in its place); a reply later
    than the time-out gives TimeoutError once and is skipped when it comes, and the next
    command's reply still goes to its own callback; a lost connection gives ConnectionError."""
    import asyncio

    target = lean_target(REDIS_URL, None, None)
    assert target is not None
    lean = LeanConnection(target)
    got: list = []
    try:
        assert not lean.send_each([("ECHO", "a")], got.append, 1.0)  # not connected yet
        await lean.call("PING")
        assert lean.send_each([("ECHO", "a"), ("NOSUCHCOMMAND",), ("ECHO", "b")],
                              got.append, 1.0)
        await lean.call("PING")  # its reply comes after theirs
        (replies,) = got
        assert replies[0] == b"a" and replies[2] == b"b"
        assert isinstance(replies[1], LookupReplyError)
        got.clear()
        # BLPOP holds the connection 0.5 s: past the 0.1 s time-out
        assert lean.send_each([("BLPOP", prefix + "nothing", "0.5")], got.append, 0.1)
        assert lean.send_each([("ECHO", "after")], got.append, 2.0)
        await asyncio.sleep(0.3)
        assert len(got) == 1 and isinstance(got[0], TimeoutError)
        await asyncio.sleep(0.5)
        assert got[1:] == [[b"after"]]  # the late nil went nowhere
        got.clear()
        assert lean.send_each([("BLPOP", prefix + "nothing", "1")], got.append, 5.0)
        lean.close()
        await asyncio.sleep(0.1)
        assert len(got) == 1 and isinstance(got[0], ConnectionError)
    finally:
        lean.close()


async def test_the_shell_decides_by_callback_over_the_lean_connection(prefix: str) -> None:
    """PolicyRunner.submit: the first batch goes through a task (the connection is opened),
    the next ones by callback from the Redis reader; the cap holds either way and the flush
    runs after each answered batch."""
    import asyncio
    from types import SimpleNamespace

    from proxy.bindings.model import Outcome, Resolution
    from proxy.policy.runner import PolicyRunner

    e = engine(prefix, {"redis_url": REDIS_URL, "rate_limits": [
        {"name": "x-cap", "per": "x", "max_calls": 3, "window_s": 60}]})
    decided: list = []
    flushes: list = []
    core = SimpleNamespace(settings=SimpleNamespace(middle_number=lambda n: n[:3] == "700"),
                           stats={}, policy_out=[],
                           complete_policy=lambda relay, d, now: decided.append((relay.n, d)))
    runner = PolicyRunner(core, e.spec, lambda: flushes.append(1))

    def call(n: int) -> tuple:
        relay = SimpleNamespace(n=n, request=SimpleNamespace(call_id=f"c{n}@h"), x=X,
                                caller=A, final_sent=False, lookup_deadline=1.0)
        return relay, Resolution(Outcome.ROUTE, B, 1e12)

    try:
        runner.submit([call(1)])
        for _ in range(100):
            if decided:
                break
            await asyncio.sleep(0.01)
        assert runner.lean is not None and runner.lean._protocol is not None  # now up
        tasks_before = len(runner._tasks)
        runner.submit([call(2), call(3), call(4)])
        assert len(runner._tasks) == tasks_before  # no task: a callback
        for _ in range(100):
            if len(decided) == 4:
                break
            await asyncio.sleep(0.01)
        assert [(n, d.connect) for n, d in decided] == [(1, True), (2, True), (3, True),
                                                        (4, False)]
        assert decided[3][1].rule == "x-cap"
        assert len(flushes) == 2
    finally:
        await runner.close()
