"""Local cache of resolutions in front of a remote store (Redis).

- bounded: at most `max_entries` (x, caller) answers, oldest inserted evicted first;
- an answer is fresh until min(binding expiry, now + max_ttl_s); misses (NO_BINDING,
  NOT_PARTY) for `negative_ttl_s`;
- a ROUTE answer past its freshness but before its binding expiry can still be served as
  *stale* when the store cannot answer (`get_stale`), so cached calls keep routing in an outage;
- single flight: concurrent misses for one key share one load, whether it runs as a task
  (`get_or_load`) or inside a batch of lookups sent in one write (`start_flight` /
  `end_flight`, which the Redis store's `lookup_batch` uses);
- `invalidate_x` drops every answer for X and poisons loads in flight for X, so a load that
  raced an unbind is returned to its callers but never cached;
- while `trusted` is False (the invalidation channel is down) nothing fresh is served or stored.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from proxy.bindings.model import Outcome, Resolution

_Key = tuple[str, str]


# told how a load ended: (the answer, None) or (None, why it failed)
Settled = Callable[[Resolution | None, BaseException | None], None]


class _Flight:
    """One load in progress; `poisoned` once X was invalidated while it ran.

    A task's load (`get_or_load`) has `task`; a batch's load has none until a task-side caller
    joins it, and tells the callers that joined it through `joined` when it ends."""

    __slots__ = ("joined", "poisoned", "task", "x")

    def __init__(self, x: str) -> None:
        self.x = x
        self.poisoned = False
        self.task: asyncio.Future[Resolution] | None = None
        self.joined: list[Settled] | None = None


class ResolutionCache:
    """Bounded (x, caller) → Resolution cache with freshness, stale fallback and single flight."""

    def __init__(self, max_entries: int, max_ttl_s: float, negative_ttl_s: float) -> None:
        self.max_entries = int(max_entries)  # 0: cache nothing
        self.max_ttl_s = float(max_ttl_s)
        self.negative_ttl_s = float(negative_ttl_s)
        self.trusted = True
        # value: (answer, fresh_until)
        self._entries: OrderedDict[_Key, tuple[Resolution, float]] = OrderedDict()
        self._callers_by_x: dict[str, set[str]] = {}
        self._flights: dict[_Key, _Flight] = {}
        self.loads = 0  # loads started (for tests and stats)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, x: str, caller: str, now: float) -> Resolution | None:
        """A fresh answer, or None. The hot path: one dict lookup and one compare."""
        entry = self._entries.get((x, caller))
        if entry is not None and now < entry[1] and self.trusted:
            return entry[0]
        return None

    def get_stale(self, x: str, caller: str, now: float) -> Resolution | None:
        """A cached ROUTE whose binding has not expired, however old the answer is."""
        entry = self._entries.get((x, caller))
        if entry is not None:
            answer = entry[0]
            if answer.outcome is Outcome.ROUTE and now < answer.expires_at:
                return answer
        return None

    def put(self, x: str, caller: str, answer: Resolution, now: float) -> None:
        """Remember an answer; never beyond its binding's expiry."""
        if not self.trusted or self.max_entries <= 0:
            return
        if answer.outcome is Outcome.ROUTE:
            fresh_until = min(answer.expires_at, now + self.max_ttl_s)
        else:
            fresh_until = now + self.negative_ttl_s
        if fresh_until <= now:
            return
        key = (x, caller)
        entries = self._entries
        if entries.pop(key, None) is None:
            callers = self._callers_by_x.get(x)
            if callers is None:
                callers = self._callers_by_x[x] = set()
            callers.add(caller)
        entries[key] = (answer, fresh_until)
        while len(entries) > self.max_entries:
            (old_x, old_caller), _ = entries.popitem(last=False)
            self._forget_caller(old_x, old_caller)

    def _forget_caller(self, x: str, caller: str) -> None:
        callers = self._callers_by_x.get(x)
        if callers is not None:
            callers.discard(caller)
            if not callers:
                del self._callers_by_x[x]

    def invalidate_x(self, x: str) -> None:
        """Drop every answer for X; loads in flight for X will not be cached."""
        callers = self._callers_by_x.pop(x, None)
        if callers:
            entries = self._entries
            for caller in callers:
                entries.pop((x, caller), None)
        for flight in self._flights.values():
            if flight.x == x:
                flight.poisoned = True

    def clear(self) -> None:
        """Drop everything (after missed invalidations); loads in flight will not be cached."""
        self._entries.clear()
        self._callers_by_x.clear()
        for flight in self._flights.values():
            flight.poisoned = True

    def in_flight(self, x: str, caller: str) -> _Flight | None:
        """The load in progress for (x, caller), if any."""
        return self._flights.get((x, caller))

    def start_flight(self, x: str, caller: str) -> _Flight:
        """Register a load the caller runs itself (no task); it must call `end_flight`."""
        flight = self._flights[(x, caller)] = _Flight(x)
        self.loads += 1
        return flight

    def end_flight(self, x: str, caller: str, flight: _Flight, answer: Resolution | None,
                   error: BaseException | None, now: float) -> None:
        """A `start_flight` load ended: cache its answer (unless X was invalidated meanwhile)
        and tell every caller that joined it."""
        if answer is not None and not flight.poisoned:
            self.put(x, caller, answer, now)
        key = (x, caller)
        if self._flights.get(key) is flight:
            del self._flights[key]
        if flight.joined is not None:
            for settled in flight.joined:
                settled(answer, error)

    def join(self, flight: _Flight, settled: Settled) -> None:
        """Be told how a load in progress ends."""
        task = flight.task
        if task is not None:
            task.add_done_callback(lambda done: settled(*_outcome(done)))
        elif flight.joined is None:
            flight.joined = [settled]
        else:
            flight.joined.append(settled)

    async def get_or_load(
        self, x: str, caller: str, load: Callable[[], Awaitable[Resolution]]
    ) -> Resolution:
        """The fresh answer, or the result of `load()`, shared by concurrent callers for a key."""
        key = (x, caller)
        flight = self._flights.get(key)
        if flight is None:
            hit = self.get(x, caller, time.time())
            if hit is not None:
                return hit
            flight = self._flights[key] = _Flight(x)
            self.loads += 1
            flight.task = asyncio.ensure_future(self._run(key, flight, load))
            flight.task.add_done_callback(_consume_exception)
        elif flight.task is None:  # a batch's load: wait for it through a future
            future: asyncio.Future[Resolution] = asyncio.get_running_loop().create_future()
            future.add_done_callback(_consume_exception)
            self.join(flight, lambda answer, error: _settle(future, answer, error))
            flight.task = future
        assert flight.task is not None
        # shield: one caller giving up (its INVITE cancelled) must not cancel the others' load
        return await asyncio.shield(flight.task)

    async def _run(
        self, key: _Key, flight: _Flight, load: Callable[[], Awaitable[Resolution]]
    ) -> Resolution:
        try:
            answer = await load()
            if not flight.poisoned:
                self.put(key[0], key[1], answer, time.time())
            return answer
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]


def _outcome(done: asyncio.Future[Resolution]) -> tuple[Resolution | None, BaseException | None]:
    if done.cancelled():
        return None, asyncio.CancelledError()
    error = done.exception()
    return (None, error) if error is not None else (done.result(), None)


def _settle(future: asyncio.Future[Resolution], answer: Resolution | None,
            error: BaseException | None) -> None:
    if future.done():
        return
    if answer is not None:
        future.set_result(answer)
    else:
        future.set_exception(error or RuntimeError("load ended without an answer"))


def _consume_exception(task: asyncio.Future[Resolution]) -> None:
    # Every waiter may have been cancelled; do not let asyncio log "exception never retrieved".
    if not task.cancelled():
        task.exception()
