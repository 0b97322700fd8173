"""RedisStore.lookup_batch against real Redis: a loop pass's misses in one write, with the
semantics of resolve() (single flight, breaker, stale answers, invalidation, a forgotten
script). The machine's Redis with a key prefix per test, and a private redis-server that a
test freezes with SIGSTOP."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from proxy.bindings.breaker import BreakerState
from proxy.bindings.model import AXB, AXN, Binding, Outcome, Resolution
from proxy.bindings.redis_store import RedisStore
from tests.integration.test_redis_store import (
    REDIS_URL,
    RedisProcess,
    delete_prefix,
    private_redis,  # noqa: F401 (a fixture)
    store_config,
)

pytestmark = pytest.mark.integration

X, X2, X3 = "700100000000011", "700100000000012", "700100000000013"
A, B, C, D = "13800000011", "13900000011", "13700000011", "13600000011"

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


async def test_a_batch_answers_as_resolve_does_with_one_load_a_key(
        store: RedisStore, prefix: str) -> None:
    await store.bind(Binding(AXB, X, A, B, in_seconds(60)))
    await store.bind(Binding(AXN, X3, A, None, in_seconds(60)))
    requests = [(1, X, A), (2, X, B), (3, X, C), (4, X2, A), (5, X, A), (6, X3, C),
                (7, "+86" + X[0:0] + X, A)]  # 7: X written with a prefix the store normalises
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
        private_redis: RedisProcess) -> None:  # noqa: F811
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
