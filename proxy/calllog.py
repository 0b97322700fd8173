"""The call log's per-call step: one JSON `call` line a call, and the call histograms.

Compiled with the core (proxy/compiled.py): the core calls it for every call, and as plain
Python the two functions it replaced (the metrics' wrapper and the line renderer) cost three
interpreted frames a call. What it writes is exactly what `proxy.logs.info_logger` documents
(structlog's JSON line: the fields, then event, level, timestamp).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Any


class UtcClock:
    """structlog's ISO timestamp (`2026-12-03T13:37:44.123456Z`), its date and time of day
    formatted once a second."""

    __slots__ = ("prefix", "second")

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def __call__(self) -> str:
        now = time.time()
        second = int(now)
        if second != self.second:
            self.second = second
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self.prefix}.{int((now - second) * 1e6):06d}Z"


class JsonCallLog:
    """`log(event, **fields)` for the call log: the line rendered by `encode` (JSON, keys in
    structlog's order) and handed to `write`; with `observe`, every `call` line also feeds the
    decision and lookup histograms and the outcome counts (proxy/metrics.py).

    With `write_later` (proxy/linewriter.py), the fields (timestamp included) are handed over
    as they are and rendered at the end of the event loop's pass, after the sends of the
    message that logged them."""

    __slots__ = ("clock", "decision", "encode", "lookup", "outcomes", "write", "write_later")

    def __init__(self, write: Callable[[str], None], encode: Callable[[dict[str, Any]], str],
                 clock: UtcClock | None = None,
                 write_later: Callable[[Callable[[dict[str, Any]], str], dict[str, Any]], None]
                 | None = None) -> None:
        self.write = write
        self.write_later = write_later
        self.encode = encode
        self.clock = clock if clock is not None else UtcClock()
        self.decision: Any = None  # proxy.metrics.Histogram
        self.lookup: Any = None
        self.outcomes: dict[str, int] | None = None

    def observed(self, decision: Any, lookup: Any, outcomes: dict[str, int]) -> JsonCallLog:
        """The same log, feeding these histograms (seconds) and outcome counts too."""
        log = JsonCallLog(self.write, self.encode, self.clock, self.write_later)
        log.decision, log.lookup, log.outcomes = decision, lookup, outcomes
        return log

    def __call__(self, event: str, **fields: Any) -> None:
        outcomes = self.outcomes
        if outcomes is not None and event == "call":
            ms = fields.get("decision_ms")
            if ms is not None:
                _observe(self.decision, ms / 1000)
            ms = fields.get("lookup_ms")
            if ms is not None and 0 <= ms < 600_000:  # no lookup made: no figure
                _observe(self.lookup, ms / 1000)
            outcome = fields.get("outcome", "")
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        fields["event"] = event
        fields["level"] = "info"
        fields["timestamp"] = self.clock()
        later = self.write_later
        if later is not None:
            later(self.encode, fields)
        else:
            self.write(self.encode(fields))


def _observe(histogram: Any, value: float) -> None:
    """Histogram.observe (proxy/metrics.py), without a call into interpreted code."""
    histogram.counts[bisect_left(histogram.bounds, value)] += 1
    histogram.sum += value
