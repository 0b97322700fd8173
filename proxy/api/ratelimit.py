"""Per-tenant request rate: a token bucket in each API process."""

from __future__ import annotations

import math
import time


class RateLimiter:
    """`rate` requests a second per tenant, with bursts up to one second's worth."""

    def __init__(self, rates: dict[str, float], clock=time.monotonic) -> None:
        self._rates = rates
        self._clock = clock
        self._buckets: dict[str, list[float]] = {}  # tenant -> [tokens, last refill]

    def check(self, tenant: str) -> float:
        """0 when the request may go ahead (one token taken), else seconds to wait."""
        rate = self._rates.get(tenant)
        if rate is None:
            return 0.0
        now = self._clock()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = [rate, now]
        tokens = min(rate, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / rate

    @staticmethod
    def retry_after(wait: float) -> str:
        """The Retry-After header value (whole seconds, at least 1)."""
        return str(max(1, math.ceil(wait)))
