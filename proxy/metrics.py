"""Prometheus metrics, /healthz and /readyz, served from each worker's own event loop.

Nothing here costs on the per-message path: the core counts in a plain dict (an int add per
event), latencies are observed once per call into plain lists (no lock, no label lookup: one
event loop owns them), and everything turns into Prometheus families only when scraped. Every
series exists from the start (at 0), so a rate() or an alert has something to read before the
first event.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from proxy.calllog import JsonCallLog

# every counter the core and the transport keep, so that each series is there from the start
KNOWN_COUNTERS = (
    "acks_forwarded", "calls_routed", "calls_no_binding", "calls_not_a_party",
    "calls_no_caller_number", "calls_store_unavailable", "calls_unreadable_body",
    "calls_internal_error", "dropped_unroutable_ack", "forwarded_stateless",
    "internal_errors", "invite_lifetime_exceeded", "invites_retired", "late_2xx_forwarded",
    "leaks_scrubbed", "log_records_dropped", "lookup_deadline_expired", "malformed",
    "oversize_dropped", "rejected_bad_token", "rejected_body", "rejected_dialog_expired",
    "rejected_draining", "rejected_next_hop", "rejected_no_dialog", "rejected_not_middle_number",
    "rejected_refer", "rejected_token_call_id", "rejected_untrusted", "relay_dropped",
    "relay_errors", "relayed", "responses_dropped", "retransmissions_absorbed", "send_errors",
    "tcp_output_overflow", "tcp_paused", "tcp_pending_dropped", "tcp_refused", "timer_c_fired",
    "udp_errors", "calls_policy_refused", "bulk_caller", "policy_unavailable",
    "policy_webhook_failures", "records_made", "records_written", "records_spooled",
    "records_lost_spool_full", "calls_shed", "overload_entered", "udp_receive_drops",
    # maximum call duration (proxy/calltime.py)
    "calls_limited", "calls_ended_max_duration", "proxy_byes_sent", "proxy_byes_answered",
    "proxy_byes_refused", "proxy_bye_timeouts", "proxy_bye_unroutable", "rejected_call_ended",
    # flood protection (proxy/flood.py)
    "flood_blocked", "flood_sources_blocked",
    # one worker while the load is low (proxy/steering.py)
    "handed_off",
)
# counters the core keeps as "<family>:<label value>": one labelled family each
LABELLED_COUNTERS = {"policy_refused": ("rule", "calls refused by the anti-fraud policy, by "
                                                "rule")}
# the outcomes of the call log (`outcome` of each `call` line)
CALL_OUTCOMES = ("routed", "no binding", "not a party", "no caller number", "store unavailable",
                 "unreadable body", "internal error")
# seconds; the proxy's own decision time is sub-millisecond when all is well
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
GC_PAUSE_LOG_S = 0.05  # a collection longer than this is logged (`gc_pause`)


class Histogram:
    """A Prometheus histogram for one event loop: a bisect and two adds per observation."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        buckets = []
        total = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=self.sum)


class WorkerMetrics:
    """What one worker measures besides the core's counters."""

    def __init__(self) -> None:
        self.decision = Histogram(LATENCY_BUCKETS)  # INVITE in → forwarded or refused
        self.lookup = Histogram(LATENCY_BUCKETS)  # binding lookup, cache hits included
        self.store_resolve = Histogram(LATENCY_BUCKETS)  # lookups the store had to answer
        self.loop_lag = Histogram(LAG_BUCKETS)
        self.gc_pause = Histogram(LAG_BUCKETS)  # each cyclic-collector pass, every generation
        self.outcomes: dict[str, int] = dict.fromkeys(CALL_OUTCOMES, 0)
        self._gc_started = 0.0
        self._gc_log: Callable[..., None] | None = None
        self._gc_long_s = GC_PAUSE_LOG_S

    def watch_gc(self, log: Callable[..., None], long_s: float = GC_PAUSE_LOG_S) -> None:
        """Time every pass of the cyclic collector (a pause of the whole loop): a histogram,
        and a `gc_pause` log line for a long one, so a latency spike can be told from one."""
        self._gc_log = log
        self._gc_long_s = long_s
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def unwatch_gc(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        pause = time.perf_counter() - self._gc_started
        self.gc_pause.observe(pause)
        if pause >= self._gc_long_s and self._gc_log is not None:
            self._gc_log("gc_pause", ms=round(pause * 1000, 1),
                         generation=info.get("generation"), collected=info.get("collected"))

    def call_log(self, log: Callable[..., None]) -> Callable[..., None]:
        """Wrap the core's log function: each `call` line also feeds the histograms."""
        if isinstance(log, JsonCallLog):  # the JSON call log does it itself, compiled
            return log.observed(self.decision, self.lookup, self.outcomes)
        decision, lookup, outcomes = self.decision.observe, self.lookup.observe, self.outcomes

        def observed(event: str, **fields: Any) -> None:
            if event == "call":
                ms = fields.get("decision_ms")
                if ms is not None:
                    decision(ms / 1000)
                ms = fields.get("lookup_ms")
                if ms is not None and 0 <= ms < 600_000:  # no lookup made: no figure
                    lookup(ms / 1000)
                outcome = fields.get("outcome", "")
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
            log(event, **fields)

        return observed

    async def watch_loop_lag(self, every: float = 0.25) -> None:
        """How late the event loop wakes up: what every message waits on top of its work."""
        while True:
            start = time.monotonic()
            await asyncio.sleep(every)
            self.loop_lag.observe(max(0.0, time.monotonic() - start - every))


class MeteredStore:
    """The store, with the time of every lookup it had to answer itself (a cache miss on the
    Redis store) observed; the synchronous cache path is the store's own method, untouched."""

    def __init__(self, store: Any, histogram: Histogram) -> None:
        self._store = store
        self._histogram = histogram
        self.resolve_cached = store.resolve_cached
        if hasattr(store, "lookup_batch"):  # the transport asks for it with getattr
            self.lookup_batch = self._lookup_batch

    def _lookup_batch(self, requests: list[Any], done: Callable[[list[Any]], None]
                      ) -> tuple[list[Any], list[Any]]:
        """The store's lookup_batch, each answer observed with the batch's time."""
        start = time.monotonic()
        histogram = self._histogram

        def timed(results: list[Any]) -> None:
            elapsed = time.monotonic() - start
            for _ in results:
                histogram.observe(elapsed)
            done(results)

        answered, left = self._store.lookup_batch(requests, timed)
        for _ in answered:  # the breaker's verdicts, or a hit under the normalised number
            histogram.observe(time.monotonic() - start)
        return answered, left

    async def resolve(self, x: str, caller: str) -> Any:
        start = time.monotonic()
        try:
            return await self._store.resolve(x, caller)
        finally:
            self._histogram.observe(time.monotonic() - start)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def store_gauges(store: Any) -> dict[str, float]:
    """Store, cache and circuit-breaker state, for whichever backend this is."""
    inner = getattr(store, "_store", store)
    gauges: dict[str, float] = {}
    breaker = getattr(inner, "breaker", None)
    cache = getattr(inner, "cache", None)
    if breaker is None:  # the memory store: always reachable
        gauges["store_up"] = 1
        try:
            gauges["bindings_loaded"] = len(inner)
        except TypeError:
            pass
        return gauges
    state = getattr(breaker.state, "value", str(breaker.state))
    gauges["store_circuit_open"] = 1 if state == "open" else 0
    gauges["store_circuit_half_open"] = 1 if state == "half_open" else 0
    channel_up = bool(getattr(cache, "trusted", False))
    gauges["store_invalidation_channel_up"] = 1 if channel_up else 0
    gauges["store_up"] = 1 if channel_up and state == "closed" else 0
    if cache is not None:
        gauges["store_cache_entries"] = len(cache)
    return gauges


class WorkerCollector(Collector):
    """Exposes a worker: the core's counters, live state, latency histograms, store state."""

    def __init__(self, stats: Callable[[], dict[str, int]],
                 gauges: Callable[[], dict[str, float]],
                 metrics: WorkerMetrics | None = None,
                 gateways: Callable[[], list[tuple[str, bool]]] | None = None) -> None:
        self._stats = stats
        self._gauges = gauges
        self._metrics = metrics
        self._gateways = gateways

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily
                                  | HistogramMetricFamily]:
        stats = dict.fromkeys(KNOWN_COUNTERS, 0)
        stats.update(self._stats())
        labelled = {family: CounterMetricFamily(f"sip700_{family}", doc, labels=[label])
                    for family, (label, doc) in LABELLED_COUNTERS.items()}
        for name, value in sorted(stats.items()):
            family, sep, label = name.partition(":")
            if sep:
                if family in labelled:
                    labelled[family].add_metric([label], value)
                continue
            yield CounterMetricFamily(f"sip700_{name}", f"sip700 {name.replace('_', ' ')}",
                                      value=value)
        yield from labelled.values()
        for name, value in sorted(self._gauges().items()):
            yield GaugeMetricFamily(f"sip700_{name}", f"sip700 {name.replace('_', ' ')}",
                                    value=value)
        m = self._metrics
        if m is not None:
            calls = CounterMetricFamily("sip700_calls", "initial INVITEs by outcome",
                                        labels=["outcome"])
            for outcome, value in sorted(m.outcomes.items()):
                calls.add_metric([outcome.replace(" ", "_")], value)
            yield calls
            yield m.decision.family("sip700_call_decision_seconds",
                                    "INVITE received to forwarded or refused, per call")
            yield m.lookup.family("sip700_binding_lookup_seconds",
                                  "binding lookup (cache hits included), per call")
            yield m.store_resolve.family("sip700_store_resolve_seconds",
                                         "lookups the store answered itself (cache misses)")
            yield m.loop_lag.family("sip700_event_loop_lag_seconds",
                                    "how late the event loop wakes up (sampled every 0.25 s)")
            yield m.gc_pause.family("sip700_gc_pause_seconds",
                                    "each pass of Python's cyclic garbage collector")
        if self._gateways is not None:
            up = GaugeMetricFamily("sip700_gateway_up", "1 unless the gateway is marked down "
                                   "after a failure", labels=["gateway"])
            for gateway, ok in self._gateways():
                up.add_metric([gateway], 1 if ok else 0)
            yield up


# kept for callers of the earlier name
CoreCollector = WorkerCollector


async def serve_metrics(host: str, port: int, registry: CollectorRegistry,
                        ready: Callable[[], tuple[bool, dict[str, Any]]],
                        *, reuse_port: bool = True) -> asyncio.base_events.Server:
    """GET /metrics (Prometheus text), /healthz (the process answers), /readyz (200 when it
    should get calls, 503 with the reasons otherwise; JSON); /health is /readyz's old name.

    SO_REUSEPORT: an instance taking over binds the same port while the old one drains.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b"/"
            path = path.split(b"?", 1)[0]
            if path == b"/metrics":
                status, body = b"200 OK", generate_latest(registry)
                ctype = b"text/plain; version=0.0.4"
            elif path == b"/healthz":
                status, body, ctype = b"200 OK", b"ok\n", b"text/plain"
            elif path in (b"/readyz", b"/health"):
                ok, detail = ready()
                status = b"200 OK" if ok else b"503 Service Unavailable"
                if path == b"/health":  # the old endpoint's plain answer
                    body, ctype = (b"ok\n" if ok else b"unhealthy\n"), b"text/plain"
                else:
                    body = (json.dumps({"ready": ok, **detail}) + "\n").encode()
                    ctype = b"application/json"
            else:
                status, body, ctype = b"404 Not Found", b"not found\n", b"text/plain"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype
                         + b"\r\nContent-Length: " + str(len(body)).encode()
                         + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError,
                asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, reuse_port=reuse_port)
