"""Circuit breaker for the Redis store: stop sending requests to a Redis that keeps failing.

closed ──(failure_threshold consecutive failures)──▶ open ──(open period over)──▶ half-open
half-open lets one trial request through: success closes, failure reopens with a doubled
period (capped at 8× open_s). Any success seen elsewhere (the pub/sub link reconnecting)
closes it too. One log line per state change, never one per call.
"""

from __future__ import annotations

import enum

import structlog

log = structlog.get_logger("sip700.bindings")


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Counts consecutive failures; `allow(now)` says whether to try the backend."""

    def __init__(self, failure_threshold: int, open_s: float, name: str = "redis") -> None:
        self.failure_threshold = max(1, int(failure_threshold))
        self.open_s = float(open_s)
        self.max_open_s = self.open_s * 8
        self.name = name
        self.state = BreakerState.CLOSED
        self._failures = 0
        self._open_period = self.open_s
        self._retry_at = 0.0

    def allow(self, now: float) -> bool:
        """True when a request may go to the backend now."""
        if self.state is BreakerState.CLOSED:
            return True
        if now < self._retry_at:
            return False  # open, or half-open with a trial still out
        if self.state is BreakerState.OPEN:
            self._set(BreakerState.HALF_OPEN)
        # A trial that never reports back (answered from cache, say) must not wedge the
        # breaker: another is allowed one open period later.
        self._retry_at = now + self._open_period
        return True

    def record_success(self) -> None:
        self._failures = 0
        self._open_period = self.open_s
        if self.state is not BreakerState.CLOSED:
            self._set(BreakerState.CLOSED)

    def record_failure(self, now: float, reason: str = "") -> None:
        self._failures += 1
        if self.state is BreakerState.HALF_OPEN:
            self._open_period = min(self._open_period * 2, self.max_open_s)
            self._open(now, reason)
        elif self.state is BreakerState.CLOSED and self._failures >= self.failure_threshold:
            self._open(now, reason)

    def _open(self, now: float, reason: str) -> None:
        self._retry_at = now + self._open_period
        self._set(BreakerState.OPEN, reason=reason, retry_in_s=round(self._open_period, 3))

    def _set(self, state: BreakerState, **details: object) -> None:
        previous, self.state = self.state, state
        if state is BreakerState.HALF_OPEN:
            return  # the trial's outcome is what matters; keep the log to open/closed
        if state is BreakerState.OPEN:
            if previous is BreakerState.HALF_OPEN:
                return  # still down after a trial: not a new state for the operator
            log.warning("circuit_open", backend=self.name, **details)
        else:
            log.info("circuit_closed", backend=self.name)
