"""Flood protection per source address (pike-style), sans-IO: requests counted per source IP in
one-second windows; a source over its limit is blocked for a cool-down.

Per message: one dict lookup, a compare and an add. Memory is bounded against a flood from
spoofed sources: at most `max_sources` addresses are tracked; stale ones are swept when a new
address comes (every SWEEP_S; once a second at most while the table is full), and a new
address that finds the table full of active ones is not tracked (a source that sends once from
a spoofed address is not what pike-style blocking stops anyway).

Counting is per worker: with several workers, what lands on the shared port is counted by the
worker the kernel hands it to (SO_REUSEPORT hashes on the source, so one source usually meets
one worker there); what comes to a worker's own port (in-dialog requests) by that worker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, NamedTuple

ALLOWED, BLOCKED, NEWLY_BLOCKED = 0, 1, 2
SWEEP_S: Final = 10.0
MAX_SOURCES: Final = 65536
_EXEMPT: Final = 0  # the limit of a source that is never blocked


class FloodSettings(NamedTuple):
    """policy.flood, for the core."""

    max_requests_per_s: int = 200
    cooldown_s: float = 10.0
    action: str = "reply"  # reply (503 with Retry-After) | drop
    trusted_limit: int | None = None  # None: trusted peers and gateways are exempt


class FloodGuard:
    """Which requests to refuse, by source IP. Not thread-safe; one event loop feeds it."""

    __slots__ = ("_sources", "_sweep_at", "cooldown_s", "is_trusted", "limit",
                 "max_sources", "trusted_limit")

    def __init__(self, limit: int, cooldown_s: float, trusted_limit: int | None,
                 is_trusted: Callable[[str], bool], *, max_sources: int = MAX_SOURCES) -> None:
        self.limit = limit
        self.cooldown_s = cooldown_s
        self.trusted_limit = trusted_limit
        self.is_trusted = is_trusted
        self.max_sources = max_sources
        # ip → [window (whole second), requests in it, blocked until, the source's limit]
        self._sources: dict[str, list] = {}
        self._sweep_at = 0.0

    def __len__(self) -> int:
        return len(self._sources)

    def check(self, ip: str, now: float, weight: int = 1) -> int:
        """ALLOWED, BLOCKED, or NEWLY_BLOCKED (this request started a cool-down: log it).

        `weight`: how many of the source's requests this one stands for: the number of workers
        when the kernel spreads a source's datagrams evenly over them (proxy/spread.py), so that
        each worker, seeing its share, blocks the source at the limit for all of them."""
        entry = self._sources.get(ip)
        if entry is None:
            entry = self._track(ip, now)
            if entry is None:
                return ALLOWED
        limit = entry[3]
        if limit == _EXEMPT:
            return ALLOWED
        if entry[2] > now:
            return BLOCKED
        second = int(now)
        if entry[0] != second:
            entry[0] = second
            entry[1] = weight
            return ALLOWED
        entry[1] += weight
        if entry[1] <= limit:
            return ALLOWED
        entry[2] = now + self.cooldown_s
        return NEWLY_BLOCKED

    def _track(self, ip: str, now: float) -> list | None:
        sources = self._sources
        if len(sources) >= self.max_sources:
            # full: one sweep a second at most (a spoofed flood must not buy a sweep a packet)
            if now < self._sweep_at - SWEEP_S + 1.0:
                return None
            self.sweep(now)
            if len(sources) >= self.max_sources:
                return None
        elif now >= self._sweep_at:
            self.sweep(now)
        trusted = self.is_trusted(ip)
        limit = (self.limit if not trusted else
                 _EXEMPT if self.trusted_limit is None else self.trusted_limit)
        entry = [int(now), 0, 0.0, limit]
        sources[ip] = entry
        return entry

    def sweep(self, now: float) -> None:
        """Forget sources idle since the last second and not blocked."""
        self._sweep_at = now + SWEEP_S
        recent = int(now) - 1
        stale = [ip for ip, e in self._sources.items() if e[0] < recent and e[2] <= now]
        for ip in stale:
            del self._sources[ip]

    def blocked_sources(self, now: float) -> list[str]:
        """The addresses in a cool-down now (for the status log and the tests)."""
        return [ip for ip, e in self._sources.items() if e[2] > now]
