"""A hashed timer wheel: O(1) arm, re-arm and cancel for hundreds of thousands of transactions.

A heap would need lazy deletion (every re-arm leaves a dead entry behind until its deadline);
transactions re-arm on nearly every message, so buckets with an owner→bucket map are cheaper.
Deadlines are rounded up to the tick, so nothing fires early.
"""

from __future__ import annotations

import math
from typing import Generic, TypeVar

T = TypeVar("T")


class TimerWheel(Generic[T]):
    """Objects scheduled at a deadline; `due(now)` hands back those whose time has come."""

    __slots__ = ("_buckets", "_next", "_slot_of", "tick")

    def __init__(self, tick: float = 0.01) -> None:
        self.tick = tick
        self._buckets: dict[int, set[T]] = {}
        self._slot_of: dict[T, int] = {}
        self._next: int | None = None  # lowest slot that may hold something

    def __len__(self) -> int:
        return len(self._slot_of)

    def schedule(self, owner: T, deadline: float | None) -> None:
        """(Re-)arm `owner` for `deadline`; None cancels."""
        old = self._slot_of.get(owner)
        slot = None if deadline is None else math.ceil(deadline / self.tick)
        if old == slot:
            return
        if old is not None:
            bucket = self._buckets[old]
            bucket.discard(owner)
            if not bucket:
                del self._buckets[old]
        if slot is None:
            if old is not None:  # (`del`, not `pop`: compiled, a C call, not a call by name)
                del self._slot_of[owner]
            return
        self._slot_of[owner] = slot
        target = self._buckets.get(slot)
        if target is None:
            self._buckets[slot] = {owner}
        else:
            target.add(owner)
        if self._next is None or slot < self._next:
            self._next = slot

    def cancel(self, owner: T) -> None:
        self.schedule(owner, None)

    def next_deadline(self) -> float | None:
        if not self._buckets:
            self._next = None
            return None
        if self._next is None or self._next not in self._buckets:
            self._next = min(self._buckets)
        return self._next * self.tick

    def due(self, now: float) -> list[T]:
        """Remove and return every owner whose deadline is ≤ now."""
        out: list[T] = []
        if not self._buckets:
            return out
        limit = math.floor(now / self.tick)
        if len(self._buckets) < 64:
            slots = sorted(s for s in self._buckets if s <= limit)
        else:
            start = self._next if self._next is not None else min(self._buckets)
            slots = [s for s in range(start, limit + 1) if s in self._buckets] if (
                limit - start < 4096
            ) else sorted(s for s in self._buckets if s <= limit)
        for slot in slots:
            bucket = self._buckets[slot]
            del self._buckets[slot]
            for owner in bucket:
                del self._slot_of[owner]
            out.extend(bucket)
        self._next = None
        return out
