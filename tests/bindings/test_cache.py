"""ResolutionCache: bounded, fresh until binding expiry, negatives, stale, single flight."""

import asyncio
import time

import pytest

from proxy.bindings.cache import ResolutionCache
from proxy.bindings.model import Outcome, Resolution, StoreUnavailable

X = "700100000000001"
NOW = 1_000_000.0


def route(callee: str, expires_at: float) -> Resolution:
    return Resolution(Outcome.ROUTE, callee, expires_at)


def test_hit_until_binding_expiry_when_sooner_than_max_ttl() -> None:
    cache = ResolutionCache(10, max_ttl_s=60, negative_ttl_s=1)
    cache.put(X, "a", route("b", NOW + 5), NOW)
    assert cache.get(X, "a", NOW + 4.9) == route("b", NOW + 5)
    assert cache.get(X, "a", NOW + 5) is None
    assert cache.get_stale(X, "a", NOW + 5) is None


def test_max_ttl_caps_freshness_but_stale_serves_until_binding_expiry() -> None:
    cache = ResolutionCache(10, max_ttl_s=2, negative_ttl_s=1)
    cache.put(X, "a", route("b", NOW + 100), NOW)
    assert cache.get(X, "a", NOW + 1.9) is not None
    assert cache.get(X, "a", NOW + 2) is None
    assert cache.get_stale(X, "a", NOW + 99) == route("b", NOW + 100)
    assert cache.get_stale(X, "a", NOW + 100) is None


def test_negative_answers_live_briefly_and_are_never_stale() -> None:
    cache = ResolutionCache(10, max_ttl_s=60, negative_ttl_s=0.5)
    cache.put(X, "a", Resolution(Outcome.NO_BINDING, None, NOW), NOW)
    cache.put(X, "c", Resolution(Outcome.NOT_PARTY, None, NOW), NOW)
    assert cache.get(X, "a", NOW + 0.4) is not None
    assert cache.get(X, "c", NOW + 0.4).outcome is Outcome.NOT_PARTY  # type: ignore[union-attr]
    assert cache.get(X, "a", NOW + 0.5) is None
    assert cache.get_stale(X, "a", NOW) is None


def test_bounded_oldest_first() -> None:
    cache = ResolutionCache(3, max_ttl_s=60, negative_ttl_s=1)
    for i in range(5):
        cache.put(X, f"c{i}", route("b", NOW + 60), NOW)
    assert len(cache) == 3
    assert cache.get(X, "c0", NOW) is None and cache.get(X, "c1", NOW) is None
    assert cache.get(X, "c4", NOW) is not None
    cache.invalidate_x(X)  # the index of callers per X stayed consistent through evictions
    assert len(cache) == 0


def test_invalidate_x_drops_only_that_x() -> None:
    cache = ResolutionCache(10, max_ttl_s=60, negative_ttl_s=1)
    cache.put(X, "a", route("b", NOW + 60), NOW)
    cache.put(X, "b", route("a", NOW + 60), NOW)
    cache.put("700100000000002", "a", route("d", NOW + 60), NOW)
    cache.invalidate_x(X)
    assert cache.get(X, "a", NOW) is None and cache.get(X, "b", NOW) is None
    assert cache.get_stale(X, "a", NOW) is None
    assert cache.get("700100000000002", "a", NOW) is not None


def test_untrusted_cache_serves_only_stale_and_stores_nothing() -> None:
    cache = ResolutionCache(10, max_ttl_s=60, negative_ttl_s=1)
    cache.put(X, "a", route("b", NOW + 60), NOW)
    cache.trusted = False
    assert cache.get(X, "a", NOW) is None
    assert cache.get_stale(X, "a", NOW) is not None
    cache.put(X, "c", route("d", NOW + 60), NOW)
    assert cache.get_stale(X, "c", NOW) is None


async def test_single_flight_one_load_for_concurrent_misses() -> None:
    cache = ResolutionCache(10, max_ttl_s=60, negative_ttl_s=1)
    release = asyncio.Event()
    calls = 0

    async def load() -> Resolution:
        nonlocal calls
        calls += 1
        await release.wait()
        return route("b", time.time() + 60)

    waiters = [asyncio.ensure_future(cache.get_or_load(X, "a", load)) for _ in range(50)]
    await asyncio.sleep(0.01)
    release.set()
    answers = await asyncio.gather(*waiters)
    assert calls == 1
    assert {a.callee for a in answers} == {"b"}
    assert await cache.get_or_load(X, "a", load) == answers[0]  # now cached
    assert calls == 1


async def test_single_flight_shares_failure_and_caches_nothing() -> None:
    cache = ResolutionCache(10, max_ttl_s=60, negative_ttl_s=1)
    calls = 0

    async def failing() -> Resolution:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        raise StoreUnavailable("down")

    results = await asyncio.gather(
        *(cache.get_or_load(X, "a", failing) for _ in range(10)), return_exceptions=True
    )
    assert calls == 1
    assert all(isinstance(r, StoreUnavailable) for r in results)
    assert len(cache) == 0


async def test_cancelled_waiter_does_not_cancel_the_shared_load() -> None:
    cache = ResolutionCache(10, max_ttl_s=60, negative_ttl_s=1)
    release = asyncio.Event()

    async def load() -> Resolution:
        await release.wait()
        return route("b", time.time() + 60)

    first = asyncio.ensure_future(cache.get_or_load(X, "a", load))
    second = asyncio.ensure_future(cache.get_or_load(X, "a", load))
    await asyncio.sleep(0)
    first.cancel()
    release.set()
    assert (await second).callee == "b"
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_invalidation_during_load_is_not_cached() -> None:
    cache = ResolutionCache(10, max_ttl_s=60, negative_ttl_s=1)
    release = asyncio.Event()

    async def load() -> Resolution:
        await release.wait()
        return route("b", time.time() + 60)

    pending = asyncio.ensure_future(cache.get_or_load(X, "a", load))
    await asyncio.sleep(0)
    cache.invalidate_x(X)  # e.g. an unbind raced the lookup
    release.set()
    assert (await pending).callee == "b"  # the caller still gets its answer
    assert cache.get(X, "a", time.time()) is None  # but it is not kept


def test_a_batch_load_tells_its_joiners_and_caches_once() -> None:
    cache = ResolutionCache(10, max_ttl_s=60, negative_ttl_s=1)
    flight = cache.start_flight(X, "a")
    assert cache.in_flight(X, "a") is flight and cache.loads == 1
    told: list[tuple[Resolution | None, BaseException | None]] = []
    cache.join(flight, lambda answer, error: told.append((answer, error)))
    cache.join(flight, lambda answer, error: told.append((answer, error)))
    cache.end_flight(X, "a", flight, route("b", NOW + 5), None, NOW)
    assert told == [(route("b", NOW + 5), None)] * 2
    assert cache.in_flight(X, "a") is None
    assert cache.get(X, "a", NOW + 1) == route("b", NOW + 5)


def test_a_failed_or_poisoned_batch_load_caches_nothing() -> None:
    cache = ResolutionCache(10, max_ttl_s=60, negative_ttl_s=1)
    failed = cache.start_flight(X, "a")
    told: list[tuple[Resolution | None, BaseException | None]] = []
    cache.join(failed, lambda answer, error: told.append((answer, error)))
    down = StoreUnavailable("down")
    cache.end_flight(X, "a", failed, None, down, NOW)
    assert told == [(None, down)] and cache.get(X, "a", NOW) is None
    poisoned = cache.start_flight(X, "c")
    cache.invalidate_x(X)
    cache.end_flight(X, "c", poisoned, route("d", NOW + 5), None, NOW)
    assert cache.get(X, "c", NOW) is None and cache.in_flight(X, "c") is None


async def test_get_or_load_waits_for_a_batch_load_instead_of_loading() -> None:
    cache = ResolutionCache(10, max_ttl_s=60, negative_ttl_s=1)
    flight = cache.start_flight(X, "a")

    async def never() -> Resolution:
        raise AssertionError("a second load")

    waiters = [asyncio.ensure_future(cache.get_or_load(X, "a", never)) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    cache.end_flight(X, "a", flight, route("b", time.time() + 5), None, time.time())
    assert {(await w).callee for w in waiters} == {"b"}
    assert cache.loads == 1
    # and a failure reaches them as the exception resolve() turns into a stale answer or 503
    flight = cache.start_flight(X, "c")
    waiter = asyncio.ensure_future(cache.get_or_load(X, "c", never))
    await asyncio.sleep(0)
    cache.end_flight(X, "c", flight, None, StoreUnavailable("down"), time.time())
    with pytest.raises(StoreUnavailable):
        await waiter


async def test_a_batch_joining_a_task_load_hears_its_outcome() -> None:
    cache = ResolutionCache(10, max_ttl_s=60, negative_ttl_s=1)
    release = asyncio.Event()

    async def load() -> Resolution:
        await release.wait()
        return route("b", time.time() + 5)

    waiter = asyncio.ensure_future(cache.get_or_load(X, "a", load))
    await asyncio.sleep(0)
    flight = cache.in_flight(X, "a")
    assert flight is not None and flight.task is not None
    told: list[tuple[Resolution | None, BaseException | None]] = []
    cache.join(flight, lambda answer, error: told.append((answer, error)))
    release.set()
    assert (await waiter).callee == "b"
    await asyncio.sleep(0)
    assert [(a.callee if a else None, e) for a, e in told] == [("b", None)]
