"""RedisStore against real Redis.

Real processes: the shared redis-server on 127.0.0.1:6379 (each test uses its own key prefix
`sip700test:<uuid>:` and deletes its keys), a second Python process that changes bindings,
and a private redis-server on a free port that a test kills and restarts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from proxy.bindings.breaker import BreakerState
from proxy.bindings.model import (
    AXB,
    AXN,
    Binding,
    BindingConflict,
    Outcome,
    Resolution,
    StoreUnavailable,
    check_conflict,
    resolve_among,
)
from proxy.bindings.redis_store import RedisStore
from tests.integration.procs import free_port, start_redis_server, wait_redis_ping

pytestmark = pytest.mark.integration

REDIS_URL = "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parents[2]
X = "700100000000001"
X2 = "700100000000002"
A, B, C, D = "13800000001", "13900000001", "13700000001", "13600000001"


def store_config(prefix: str, url: str = REDIS_URL, **overrides: object) -> SimpleNamespace:
    cfg = SimpleNamespace(
        backend="redis",
        redis_url=url,
        key_prefix=prefix,
        sentinel=None,
        cluster=None,
        timeout_ms=200,
        retry_after_s=1,
        cache=SimpleNamespace(max_entries=10_000, max_ttl_s=30.0, negative_ttl_s=0.5),
        circuit_breaker=SimpleNamespace(failure_threshold=3, open_s=0.5),
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i : i + 1000])
    finally:
        client.close()


@pytest.fixture
def prefix() -> Iterator[str]:
    value = f"sip700test:{uuid.uuid4().hex[:12]}:"
    yield value
    delete_prefix(REDIS_URL, value)


@pytest.fixture
async def store(prefix: str) -> AsyncIterator[RedisStore]:
    instance = RedisStore.from_config(store_config(prefix))
    assert await instance.start()
    yield instance
    await instance.close()


def in_seconds(seconds: float) -> float:
    return time.time() + seconds


# -- semantics ---------------------------------------------------------------------------------


async def test_axb_routes_both_ways_and_refuses_others(store: RedisStore) -> None:
    assert await store.bind(Binding(AXB, X, A, B, in_seconds(60))) is True
    assert (await store.resolve(X, A)).callee == B
    assert (await store.resolve("+86" + X, "+8613900000001")).callee == A
    assert (await store.resolve(X, C)).outcome is Outcome.NOT_PARTY
    assert (await store.resolve(X2, A)).outcome is Outcome.NO_BINDING


async def test_axn(store: RedisStore) -> None:
    await store.bind(Binding(AXN, X, A, B, in_seconds(60)))
    await store.bind(Binding(AXN, X2, C, None, in_seconds(60)))
    assert (await store.resolve(X, D)).callee == A
    assert (await store.resolve(X, A)).callee == B
    assert (await store.resolve(X2, D)).callee == C
    assert (await store.resolve(X2, C)).outcome is Outcome.NOT_PARTY
    with pytest.raises(BindingConflict):
        await store.bind(Binding(AXB, X, C, D, in_seconds(60)))
    with pytest.raises(BindingConflict):
        await store.bind(Binding(AXN, X, D, None, in_seconds(60)))
    assert await store.bind(Binding(AXN, X2, C, D, in_seconds(60))) is False  # renewal
    await asyncio.sleep(0.05)
    assert (await store.resolve(X2, C)).callee == D


async def test_one_way_bindings_and_optional_fields_match_the_reference(
    store: RedisStore,
) -> None:
    """Direction and the optional fields through the Lua lookup, against resolve_among."""
    meta = {"id": "b1", "tenant": "shop1", "max_call_s": 600, "out_id": "o-1",
            "order_id": "ord-9", "user_data": "données"}
    X3 = "700100000000003"
    bindings = [Binding(AXB, X, A, B, in_seconds(60), direction="a_to_b", **meta),
                Binding(AXB, X2, A, B, in_seconds(60), direction="b_to_a"),
                Binding(AXB, X3, A, B, in_seconds(60), **meta),
                Binding(AXN, "700100000000004", C, D, in_seconds(60), id="n1")]
    for binding in bindings:
        await store.bind(binding)
    for binding in bindings:
        for caller in (A, B, C, D):
            got = await store.resolve(binding.x, caller)
            want = resolve_among([binding], caller, time.time())
            assert (got.outcome, got.callee) == (want.outcome, want.callee), (binding, caller)
            if got.outcome is not Outcome.NOT_PARTY and got.outcome is not Outcome.NO_BINDING:
                assert (got.binding_id, got.tenant, got.direction, got.max_call_s, got.out_id,
                        got.order_id, got.user_data) == (
                    want.binding_id, want.tenant, want.direction, want.max_call_s,
                    want.out_id, want.order_id, want.user_data), (binding, caller)
    assert (await store.resolve(X, B)).outcome is Outcome.DIRECTION_RESTRICTED
    assert [b.direction for b in await store.get(X)] == ["a_to_b"]
    [stored] = await store.get(X3)
    assert stored == dataclasses.replace(bindings[2], expires_at=stored.expires_at)
    # a renewal without the fields drops them; unbinding from B removes A's metadata too
    await store.bind(Binding(AXB, X, B, A, in_seconds(90)))
    assert (await store.resolve(X, B)).outcome is Outcome.ROUTE
    assert (await store.resolve(X, A)).binding_id is None
    await store.unbind(X3, B)
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        assert client.hgetall(f"{store.key_prefix}{{{X3}}}") == {}
        assert sorted(client.hkeys(f"{store.key_prefix}{{{X}}}")) == sorted([A, B])
    finally:
        client.close()


async def test_uniqueness_and_renewal(store: RedisStore) -> None:
    await store.bind(Binding(AXB, X, A, B, in_seconds(60)))
    await store.bind(Binding(AXB, X, C, D, in_seconds(60)))  # AXB and CXD share X
    await store.bind(Binding(AXB, X2, B, C, in_seconds(60)))  # B on another X
    with pytest.raises(BindingConflict):
        await store.bind(Binding(AXB, X, B, C, in_seconds(60)))
    with pytest.raises(BindingConflict):
        await store.bind(Binding(AXN, X, "13500000001", None, in_seconds(60)))
    assert await store.bind(Binding(AXB, X, B, A, in_seconds(120))) is False
    bindings = {(b.a, b.b): b for b in await store.get(X)}
    assert set(bindings) == {(B, A), (C, D)}
    assert bindings[(B, A)].expires_at > in_seconds(100)


async def test_unbind_get_list(store: RedisStore) -> None:
    await store.bind(Binding(AXB, X, A, B, in_seconds(60)))
    await store.bind(Binding(AXB, X, C, D, in_seconds(60)))
    await store.bind(Binding(AXN, X2, A, None, in_seconds(60)))
    assert len(await store.list()) == 3
    assert [b.x for b in await store.list(x_prefix=X2)] == [X2]
    assert len(await store.list(limit=1)) == 1
    assert await store.unbind(X, B) is True
    assert await store.unbind(X, B) is False
    assert (await store.resolve(X, A)).outcome is Outcome.NOT_PARTY
    assert await store.unbind(X2, A) is True
    assert await store.get(X2) == []
    assert await store.unbind(X, D) is True
    assert (await store.resolve(X, C)).outcome is Outcome.NO_BINDING
    raw = redis.Redis.from_url(REDIS_URL)
    try:
        assert list(raw.scan_iter(match=store.key_prefix + "*")) == []  # nothing left behind
    finally:
        raw.close()


async def test_concurrent_binds_for_the_same_number_exactly_one_wins(prefix: str) -> None:
    # a generous deadline: this test is about atomicity, and 80 cold connections at once
    stores = [RedisStore.from_config(store_config(prefix, timeout_ms=3000)) for _ in range(4)]
    try:
        for s in stores:
            assert await s.start()
        for round_number in range(5):
            x = f"7001000000001{round_number:02d}"
            attempts = [
                stores[i % 4].bind(Binding(AXB, x, A, f"139000001{i:02d}", in_seconds(60)))
                for i in range(40)
            ] + [
                stores[i % 4].bind(
                    Binding(AXB, x, f"137000001{i:02d}", "13900000100", in_seconds(60))
                )
                for i in range(40)
            ]
            results = await asyncio.gather(*attempts, return_exceptions=True)
            winners = [r for r in results if r is True]
            conflicts = [r for r in results if isinstance(r, BindingConflict)]
            assert len(winners) + len(conflicts) == len(results)
            # A and 13900000100 are each party to at most one binding on x
            bound = await stores[0].get(x)
            parties = [p for b in bound for p in (b.a, b.b)]
            assert len(parties) == len(set(parties))
            assert len(winners) == len(bound) in (1, 2)
    finally:
        for s in stores:
            await s.close()


async def test_concurrent_axn_claims_exactly_one_wins(store: RedisStore) -> None:
    results = await asyncio.gather(
        *(
            store.bind(Binding(AXN, X, f"138000002{i:02d}", None, in_seconds(60)))
            for i in range(30)
        ),
        return_exceptions=True,
    )
    assert results.count(True) == 1
    assert all(isinstance(r, BindingConflict) for r in results if r is not True)


async def test_random_operations_match_the_reference_semantics(store: RedisStore) -> None:
    """The Lua scripts against model.resolve_among / check_conflict, op by op."""
    rng = random.Random(700)
    xs = [X, X2]
    numbers = [f"1380000000{i}" for i in range(5)]
    model: list[Binding] = []
    for _ in range(150):
        op, x, a = rng.choice(["axb", "axb", "axn", "unbind"]), rng.choice(xs), rng.choice(numbers)
        if op == "unbind":
            live = [m for m in model if m.x == x and a in m.parties()]
            assert await store.unbind(x, a) is bool(live)
            model = [m for m in model if m not in live]
        else:
            b = rng.choice([n for n in numbers if n != a] + ([None] if op == AXN else []))
            binding = Binding(op, x, a, b, in_seconds(rng.randint(60, 600)))
            try:
                replaced = check_conflict([m for m in model if m.x == x], binding, time.time())
            except BindingConflict:
                with pytest.raises(BindingConflict):
                    await store.bind(binding)
            else:
                assert await store.bind(binding) is (not replaced)
                model = [m for m in model if m not in replaced] + [binding]
        for x_ in xs:
            on_x = [m for m in model if m.x == x_]
            for caller in numbers:
                expected = resolve_among(on_x, caller, time.time())
                got = await store.resolve(x_, caller)
                assert (got.outcome, got.callee) == (expected.outcome, expected.callee)
            stored = {(b.kind, b.a, b.b) for b in await store.get(x_)}
            assert stored == {(m.kind, m.a, m.b) for m in on_x}


# -- expiry ------------------------------------------------------------------------------------


async def test_short_ttl_expires_in_cache_and_in_redis(store: RedisStore) -> None:
    await store.bind(Binding(AXB, X, A, B, in_seconds(0.4)))
    assert (await store.resolve(X, A)).callee == B
    assert store.resolve_cached(X, A, time.time()) is not None  # cached...
    await asyncio.sleep(0.45)
    assert store.resolve_cached(X, A, time.time()) is None  # ...never past binding expiry
    assert (await store.resolve(X, A)).outcome is Outcome.NO_BINDING
    raw = redis.Redis.from_url(REDIS_URL)
    try:
        assert raw.exists(*store.keys(X)) == 0  # Redis expired the keys at the last expiry
    finally:
        raw.close()


async def test_expired_bindings_are_collected_from_a_busy_x(store: RedisStore) -> None:
    for i in range(50):
        await store.bind(Binding(AXB, X, f"138000003{i:02d}", f"139000003{i:02d}", in_seconds(0.2)))
    await store.bind(Binding(AXB, X, A, B, in_seconds(60)))
    await asyncio.sleep(0.25)
    assert (await store.resolve(X, "13800000300")).outcome is Outcome.NOT_PARTY
    await store.bind(Binding(AXB, X, C, D, in_seconds(60)))  # a write collects the expired
    raw = redis.Redis.from_url(REDIS_URL)
    try:
        hash_key, zset_key = store.keys(X)
        assert raw.hlen(hash_key) == 4
        assert raw.zcard(zset_key) == 2
        assert raw.pttl(hash_key) > 50_000
    finally:
        raw.close()


async def test_party_of_expired_binding_binds_again(store: RedisStore) -> None:
    await store.bind(Binding(AXB, X, A, B, in_seconds(0.2)))
    await asyncio.sleep(0.25)
    assert await store.bind(Binding(AXB, X, B, C, in_seconds(60))) is True
    assert (await store.resolve(X, B)).callee == C
    assert (await store.resolve(X, A)).outcome is Outcome.NOT_PARTY


# -- import -----------------------------------------------------------------------------------


async def test_import_file_in_pipelined_batches(store: RedisStore, tmp_path: Path) -> None:
    from proxy.bindings.admin import import_file

    path = tmp_path / "bindings.csv"
    lines = ["type,x,a,b,ttl"]
    for i in range(2500):
        lines.append(f"axb,7001{i % 300:011d},138{i:08d},139{i:08d},60")
    lines.append("axb,700100000000007,13900000007,13500000007,60")  # line 2502: 139…07 is bound
    lines.append("axb,700100000000008,12,13500000008,60")  # line 2503: bad number
    lines.append("axn,700100000000009,13500000009,,60")  # line 2504: X carries AXB bindings
    lines.append("axn,700199999999999,13500000010,,60")
    path.write_text("\n".join(lines) + "\n")
    bound, problems = await import_file(store, path, batch_size=1000)
    assert bound == 2501, problems
    assert [p.line for p in problems] == [2502, 2503, 2504]
    assert (await store.resolve("700100000000007", "13900000007")).callee == "13800000007"
    assert (await store.resolve("700100000000007", "13500000007")).outcome is Outcome.NOT_PARTY
    assert (await store.resolve("700100000000299", "13900002399")).callee == "13800002399"
    assert (await store.resolve("700199999999999", A)).callee == "13500000010"
    assert len(await store.list(limit=10_000)) == 2501


# -- cache and invalidation --------------------------------------------------------------------


async def test_concurrent_misses_make_one_redis_request(store: RedisStore) -> None:
    await store.bind(Binding(AXB, X, A, B, in_seconds(60)))
    loads_before = store.cache.loads
    answers = await asyncio.gather(*(store.resolve(X, A) for _ in range(100)))
    assert {a.callee for a in answers} == {B}
    assert store.cache.loads == loads_before + 1


async def test_negative_answers_are_cached_briefly_and_dropped_on_bind(store: RedisStore) -> None:
    assert (await store.resolve(X, A)).outcome is Outcome.NO_BINDING
    assert store.resolve_cached(X, A, time.time()).outcome is Outcome.NO_BINDING  # type: ignore[union-attr]
    await store.bind(Binding(AXB, X, A, B, in_seconds(60)))
    assert store.resolve_cached(X, A, time.time()) is None
    assert (await store.resolve(X, A)).callee == B


CHANGER = """
import asyncio, sys, time
from types import SimpleNamespace as NS
sys.path.insert(0, {root!r})
from proxy.bindings.model import Binding
from proxy.bindings.redis_store import RedisStore

async def main():
    cfg = NS(backend="redis", redis_url={url!r}, key_prefix={prefix!r}, sentinel=None,
             cluster=None, timeout_ms=500, cache=NS(max_entries=10, max_ttl_s=1,
             negative_ttl_s=1), circuit_breaker=NS(failure_threshold=3, open_s=1))
    store = RedisStore.from_config(cfg)
    op = sys.argv[1]
    if op == "unbind":
        print(await store.unbind(sys.argv[2], sys.argv[3]))
    else:
        print(await store.bind(Binding("axb", sys.argv[2], sys.argv[3], sys.argv[4],
                                       time.time() + 60)))
    await store.close()

asyncio.run(main())
"""


def run_other_process(prefix: str, *args: str) -> str:
    code = CHANGER.format(root=str(ROOT), url=REDIS_URL, prefix=prefix)
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def test_unbind_in_another_process_stops_routing_within_a_second(
    store: RedisStore, prefix: str
) -> None:
    await store.bind(Binding(AXB, X, A, B, in_seconds(60)))
    assert (await store.resolve(X, A)).callee == B
    assert store.resolve_cached(X, A, time.time()) is not None
    assert await asyncio.to_thread(run_other_process, prefix, "unbind", X, B) == "True"
    changed_at = time.monotonic()
    while store.resolve_cached(X, A, time.time()) is not None:
        assert time.monotonic() - changed_at < 1.0, "still routing from cache after 1 s"
        await asyncio.sleep(0.01)
    assert (await store.resolve(X, A)).outcome is Outcome.NO_BINDING


async def test_bind_in_another_process_replaces_cached_refusal(
    store: RedisStore, prefix: str
) -> None:
    await store.bind(Binding(AXB, X, A, B, in_seconds(60)))
    assert (await store.resolve(X, C)).outcome is Outcome.NOT_PARTY  # negatively cached
    assert await asyncio.to_thread(run_other_process, prefix, "bind", X, C, D) == "True"
    changed_at = time.monotonic()
    while store.resolve_cached(X, C, time.time()) is not None:
        assert time.monotonic() - changed_at < 1.0
        await asyncio.sleep(0.01)
    assert (await store.resolve(X, C)).callee == D


async def test_two_instances_in_one_process_invalidate_each_other(prefix: str) -> None:
    first = RedisStore.from_config(store_config(prefix, cache=_long_cache()))
    second = RedisStore.from_config(store_config(prefix, cache=_long_cache()))
    try:
        assert await first.start() and await second.start()
        await first.bind(Binding(AXB, X, A, B, in_seconds(60)))
        assert (await second.resolve(X, A)).callee == B
        await first.unbind(X, A)
        await first.bind(Binding(AXB, X, A, C, in_seconds(60)))
        deadline = time.monotonic() + 1.0
        while (await second.resolve(X, A)).callee != C:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
    finally:
        await first.close()
        await second.close()


def _forked_resolver(store: RedisStore, conn: Connection) -> None:
    async def run() -> None:
        assert await store.start()
        first = await store.resolve(X, A)
        conn.send(("cached", first.callee, store.resolve_cached(X, A, time.time()) is not None))
        assert conn.recv() == "unbound"
        started = time.monotonic()
        while (
            store.resolve_cached(X, A, time.time()) is not None and time.monotonic() - started < 5
        ):
            await asyncio.sleep(0.01)
        after = await store.resolve(X, A)
        conn.send(("after", time.monotonic() - started, after.outcome.name))
        await store.close()

    asyncio.run(run())


def _forked_unbinder(store: RedisStore, conn: Connection) -> None:
    async def run() -> None:
        conn.send(await store.unbind(X, B))
        await store.close()

    asyncio.run(run())


def test_workers_forked_from_one_store_invalidate_each_other(prefix: str) -> None:
    """The proxy opens the store once, then forks workers: each must hear the others."""
    setup = RedisStore.from_config(store_config(prefix))

    async def bind() -> None:
        await setup.bind(Binding(AXB, X, A, B, in_seconds(60)))
        await setup.close()

    asyncio.run(bind())
    shared = RedisStore.from_config(store_config(prefix, cache=_long_cache()))
    fork = multiprocessing.get_context("fork")
    resolver_end, resolver_conn = fork.Pipe()
    unbinder_end, unbinder_conn = fork.Pipe()
    resolver = fork.Process(target=_forked_resolver, args=(shared, resolver_conn))
    unbinder = fork.Process(target=_forked_unbinder, args=(shared, unbinder_conn))
    resolver.start()
    try:
        assert resolver_end.poll(10)
        assert resolver_end.recv() == ("cached", B, True)
        unbinder.start()
        assert unbinder_end.poll(10) and unbinder_end.recv() is True
        resolver_end.send("unbound")
        assert resolver_end.poll(10)
        label, seconds, outcome = resolver_end.recv()
        assert label == "after" and outcome == "NO_BINDING"
        assert seconds < 1.0
    finally:
        for proc in (resolver, unbinder):
            proc.join(10)
            if proc.is_alive():
                proc.kill()


def _long_cache() -> SimpleNamespace:
    return SimpleNamespace(max_entries=1000, max_ttl_s=300.0, negative_ttl_s=60.0)


# -- Redis failure -----------------------------------------------------------------------------


class RedisProcess:
    """A private redis-server without persistence, for tests that kill it."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = start_redis_server(self.port, self.workdir, "--appendonly", "no")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    server = RedisProcess(free_port(), tmp_path)
    server.start()
    yield server
    server.kill()


async def test_redis_killed_mid_traffic_and_restarted(private_redis: RedisProcess) -> None:
    url = f"redis://127.0.0.1:{private_redis.port}/0"
    cfg = store_config(
        "sip700test:",
        url,
        cache=SimpleNamespace(max_entries=1000, max_ttl_s=0.3, negative_ttl_s=0.2),
    )
    store = RedisStore.from_config(cfg)
    traffic_errors: list[BaseException] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        while not stop.is_set():
            for caller in (A, C, "13500000001"):
                try:
                    await store.resolve(X, caller)
                except StoreUnavailable:
                    pass
                except BaseException as exc:  # anything else is a bug
                    traffic_errors.append(exc)
            await asyncio.sleep(0.002)

    assert await store.start()
    await store.bind(Binding(AXB, X, A, B, in_seconds(60)))
    await store.bind(Binding(AXB, X, C, D, in_seconds(60)))
    assert (await store.resolve(X, A)).callee == B
    assert (await store.resolve(X, C)).callee == D
    load = asyncio.ensure_future(traffic())
    await asyncio.sleep(0.2)

    private_redis.kill()
    await asyncio.sleep(1.0)  # past max_ttl_s: the cached answers are stale, and still route
    assert (await store.resolve(X, A)).callee == B
    assert (await store.resolve(X, C)).callee == D
    for x, caller in ((X, D), (X2, A)):  # never looked up: misses fail, and fail fast
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.resolve(x, caller)
        assert time.monotonic() - started < 1.0
    assert store.breaker.state is not BreakerState.CLOSED
    with pytest.raises(StoreUnavailable):
        await store.bind(Binding(AXB, X2, A, B, in_seconds(60)))

    private_redis.start()  # empty again: no persistence
    deadline = time.monotonic() + 10
    while True:
        try:
            await store.bind(Binding(AXB, X2, A, B, in_seconds(60)))
            break
        except StoreUnavailable:
            assert time.monotonic() < deadline, "store did not recover"
            await asyncio.sleep(0.1)
    assert (await store.resolve(X2, B)).callee == A
    assert store.breaker.state is BreakerState.CLOSED
    deadline = time.monotonic() + 10
    while not store.cache.trusted:  # the invalidation channel came back too
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    stop.set()
    await load
    await store.close()
    assert traffic_errors == []


# -- lookup_batch: a loop pass's misses in one write ------------------------------------------
# The semantics of resolve() (single flight, breaker, stale answers, invalidation, a forgotten
# script) without a task per lookup; a private redis-server frozen with SIGSTOP for the time-out.

X3 = "700100000000003"
Results = list[tuple[Any, Resolution | None]]


class Collector:
    """The `done` callback: every (tag, answer) it was given, and a wait for a count."""

    def __init__(self) -> None:
        self.results: dict[Any, Resolution | None] = {}
        self.calls = 0
        self._changed = asyncio.Event()

    def __call__(self, results: Results) -> None:
        self.calls += 1
        for tag, answer in results:
            assert tag not in self.results, f"{tag} answered twice"
            self.results[tag] = answer
        self._changed.set()

    async def wait_for(self, count: int, timeout: float = 3.0) -> dict[Any, Resolution | None]:
        async with asyncio.timeout(timeout):
            while len(self.results) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.results


async def test_a_batch_answers_as_resolve_does_with_one_load_a_key(
        store: RedisStore, prefix: str) -> None:
    await store.bind(Binding(AXB, X, A, B, in_seconds(60)))
    await store.bind(Binding(AXN, X3, A, None, in_seconds(60)))
    requests = [(1, X, A), (2, X, B), (3, X, C), (4, X2, A), (5, X, A), (6, X3, C),
                (7, "+86" + X, A)]  # 7: X written with a prefix the store normalises
    done = Collector()
    loads = store.cache.loads
    answered, left = store.lookup_batch(requests, done)
    assert (answered, left) == ([], [])
    results = await done.wait_for(len(requests))
    # the same answers as a separate store's resolve() (no shared cache)
    other = RedisStore.from_config(store_config(prefix))
    try:
        assert await other.start()
        for tag, x, caller in requests:
            expected = await other.resolve(x, caller)
            got = results[tag]
            assert got is not None
            assert (got.outcome, got.callee) == (expected.outcome, expected.callee), tag
    finally:
        await other.close()
    assert (results[1].outcome, results[1].callee) == (Outcome.ROUTE, B)
    assert (results[2].outcome, results[2].callee) == (Outcome.ROUTE, A)
    assert results[3].outcome is Outcome.NOT_PARTY
    assert results[4].outcome is Outcome.NO_BINDING
    assert (results[6].outcome, results[6].callee) == (Outcome.ROUTE, A)
    # (X, A) asked three times (1, 5 and 7): one load; the rest one each
    assert store.cache.loads == loads + 5
    # now cached: a second batch is answered at once, nothing goes out
    again = Collector()
    answered, left = store.lookup_batch([(1, X, A), (2, X, B), (3, X2, A)], again)
    assert left == [] and again.calls == 0
    assert {tag: a.callee if a else None for tag, a in answered} == {1: B, 2: A, 3: None}
    assert store.cache.loads == loads + 5


async def test_without_its_connection_the_store_hands_the_batch_back(prefix: str) -> None:
    store = RedisStore.from_config(store_config(prefix))  # not started: nothing connected
    try:
        requests = [(1, X, A), (2, X, B)]
        assert store.lookup_batch(requests, Collector()) == ([], requests)
    finally:
        await store.close()


async def test_a_resolve_during_a_batch_shares_its_load(store: RedisStore) -> None:
    await store.bind(Binding(AXB, X, A, B, in_seconds(60)))
    done = Collector()
    loads = store.cache.loads
    store.lookup_batch([("t", X, A)], done)
    # still out: resolve() joins it instead of asking again, and so does a second batch
    second = Collector()
    assert store.lookup_batch([("u", X, A)], second) == ([], [])
    answer = await store.resolve(X, A)
    assert answer.callee == B
    assert (await done.wait_for(1))["t"].callee == B
    assert (await second.wait_for(1))["u"].callee == B
    assert store.cache.loads == loads + 1


async def test_an_invalidation_during_the_load_keeps_its_answer_out_of_the_cache(
        store: RedisStore) -> None:
    await store.bind(Binding(AXB, X, A, B, in_seconds(60)))
    done = Collector()
    store.lookup_batch([("t", X, A)], done)
    store.cache.invalidate_x(X)  # an unbind raced the lookup
    assert (await done.wait_for(1))["t"].callee == B  # its callers get the answer
    assert store.cache.get(X, A, time.time()) is None  # but it is not remembered


async def test_a_forgotten_script_is_loaded_again(store: RedisStore) -> None:
    await store.bind(Binding(AXB, X, A, B, in_seconds(60)))
    redis.Redis.from_url(REDIS_URL).script_flush()  # as a restarted Redis would be
    done = Collector()
    store.lookup_batch([(1, X, A), (2, X, B), (3, X, C)], done)
    results = await done.wait_for(3)
    assert results[1].callee == B and results[2].callee == A
    assert results[3].outcome is Outcome.NOT_PARTY
    assert store.breaker.state is BreakerState.CLOSED
    again = Collector()  # loaded again: the next batch goes through EVALSHA as before
    store.lookup_batch([(4, X2, A)], again)
    assert (await again.wait_for(1))[4].outcome is Outcome.NO_BINDING


async def test_a_frozen_redis_times_out_serves_stale_answers_then_fails_fast(
        private_redis: RedisProcess) -> None:
    url = f"redis://127.0.0.1:{private_redis.port}/0"
    store = RedisStore.from_config(store_config(
        "sip700test:", url, timeout_ms=100,
        cache=SimpleNamespace(max_entries=1000, max_ttl_s=0.2, negative_ttl_s=0.2),
        circuit_breaker=SimpleNamespace(failure_threshold=2, open_s=5.0)))
    assert private_redis.process is not None
    pid = private_redis.process.pid
    try:
        assert await store.start()
        await store.bind(Binding(AXB, X, A, B, in_seconds(60)))
        warm = Collector()
        store.lookup_batch([(0, X, A)], warm)
        assert (await warm.wait_for(1))[0].callee == B
        os.kill(pid, signal.SIGSTOP)  # up, connected, and silent
        await asyncio.sleep(0.3)  # past max_ttl_s: the cached answer is stale
        done = Collector()
        started = time.monotonic()
        answered, left = store.lookup_batch([(1, X, A), (2, X, D)], done)
        assert (answered, left) == ([], [])
        results = await done.wait_for(2)
        assert 0.09 < time.monotonic() - started < 1.0  # the store's timeout_ms
        assert results[1] is not None and results[1].callee == B  # stale, still routes
        assert results[2] is None  # never looked up: the store could not answer
        assert store.breaker.state is BreakerState.OPEN  # two failures, threshold two
        # open: answered at once, nothing written
        fast = Collector()
        answered, left = store.lookup_batch([(3, X, A), (4, X2, A)], fast)
        assert left == [] and fast.calls == 0
        assert {tag: a.callee if a else None for tag, a in answered} == {3: B, 4: None}
    finally:
        os.kill(pid, signal.SIGCONT)
        await store.close()


async def test_the_metered_store_times_batched_lookups(store: RedisStore) -> None:
    from proxy.bindings.memory import MemoryStore
    from proxy.metrics import Histogram, MeteredStore

    histogram = Histogram((0.001, 1.0))
    metered = MeteredStore(store, histogram)
    await store.bind(Binding(AXB, X, A, B, in_seconds(60)))
    done = Collector()
    assert metered.lookup_batch([(1, X, A), (2, X2, A)], done) == ([], [])
    results = await done.wait_for(2)
    assert results[1].callee == B and results[2].outcome is Outcome.NO_BINDING
    assert sum(histogram.counts) == 2 and 0 < histogram.sum < 2.0
    # a store without batches: the transport's getattr finds none through the wrapper
    assert getattr(MeteredStore(MemoryStore(), histogram), "lookup_batch", None) is None


# -- Cluster and Sentinel ----------------------------------------------------------------------


def cluster_ports(count: int) -> list[int]:
    """Free ports whose cluster-bus port (port + 10000) is free and valid as well."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(20_000, 40_000)
        try:
            for candidate in (port, port + 10_000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        if port not in ports:
            ports.append(port)
    return ports


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[list[str]]:
    """Three cluster-enabled redis-servers (no replicas) joined with `redis-cli --cluster`."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server / redis-cli not installed")
    ports = cluster_ports(3)
    procs = []
    try:
        for port in ports:
            workdir = tmp_path / str(port)
            workdir.mkdir()
            procs.append(
                start_redis_server(
                    port,
                    workdir,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--appendonly",
                    "no",
                )
            )
        nodes = [f"127.0.0.1:{port}" for port in ports]
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *nodes,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 10
        while b"cluster_state:ok" not in redis.Redis(port=ports[0]).execute_command(
            "CLUSTER", "INFO"
        ):
            assert time.monotonic() < deadline, "cluster did not come up"
            time.sleep(0.1)
        yield nodes
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


async def test_cluster(redis_cluster: list[str]) -> None:
    cfg = store_config(
        "sip700test:", cluster=SimpleNamespace(startup_nodes=redis_cluster[:2]), timeout_ms=1000
    )
    first = RedisStore.from_config(cfg)
    second = RedisStore.from_config(cfg)
    try:
        assert await first.start() and await second.start()
        xs = [f"70010000000{i:04d}" for i in range(30)]  # spread over the slots
        for x in xs:
            await first.bind(Binding(AXB, x, A, B, in_seconds(60)))
        with pytest.raises(BindingConflict):
            await first.bind(Binding(AXB, xs[0], B, C, in_seconds(60)))
        errors = await first.bind_many(
            [Binding(AXB, x, C, D, in_seconds(60)) for x in xs]
            + [Binding(AXB, xs[1], A, C, in_seconds(60))]
        )
        assert errors[:-1] == [None] * len(xs) and isinstance(errors[-1], BindingConflict)
        assert len(await first.list(limit=1000)) == 2 * len(xs)
        assert [(await second.resolve(x, D)).callee for x in xs] == [C] * len(xs)
        await first.unbind(xs[5], C)
        deadline = time.monotonic() + 1.0
        while second.resolve_cached(xs[5], D, time.time()) is not None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert (await second.resolve(xs[5], D)).outcome is Outcome.NOT_PARTY
    finally:
        await first.close()
        await second.close()


@pytest.fixture
def redis_sentinel(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A master and one sentinel watching it as `sip700test`."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    master_port, sentinel_port = free_port(), free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\n"
        f"sentinel monitor sip700test 127.0.0.1 {master_port} 1\n"
    )
    master = start_redis_server(master_port, tmp_path, "--appendonly", "no")
    sentinel = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", str(conf), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_redis_ping(sentinel_port)
        yield f"127.0.0.1:{sentinel_port}", master_port
    finally:
        for proc in (sentinel, master):
            proc.kill()
            proc.wait()


async def test_sentinel(redis_sentinel: tuple[str, int]) -> None:
    address, master_port = redis_sentinel
    sentinel_cfg = SimpleNamespace(addresses=[address], service_name="sip700test")
    cfg = store_config("sip700test:", "redis://ignored:1/0", sentinel=sentinel_cfg)
    store = RedisStore.from_config(cfg)
    try:
        assert await store.start()
        await store.bind(Binding(AXB, X, A, B, in_seconds(60)))
        assert await store.bind_many([Binding(AXB, X2, A, B, in_seconds(60))]) == [None]
        assert (await store.resolve(X2, B)).callee == A
        master = redis.Redis(port=master_port)
        assert master.exists(*store.keys(X)) == 2  # written on the master Sentinel named
    finally:
        await store.close()


def test_the_configured_cache_is_the_one_used() -> None:
    """store.cache.* reach the store (an empty cache is falsy: `cache or default` once threw
    the configured one away, so every setting there was silently ignored)."""
    from proxy.config import load_config_text

    cfg = load_config_text(
        "carrier: {gateways: ['sip:127.0.0.1:5090']}\n"
        "store: {backend: redis, redis_url: 'redis://127.0.0.1:6379/0',\n"
        "        cache: {max_entries: 20000, max_ttl_s: 120, negative_ttl_s: 2.5}}\n",
        Path("/tmp/cache.yaml"))
    store = RedisStore.from_config(cfg.store)
    assert (store.cache.max_entries, store.cache.max_ttl_s, store.cache.negative_ttl_s) == (
        20000, 120.0, 2.5)
