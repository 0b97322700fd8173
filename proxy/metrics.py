"""Prometheus metrics and a health endpoint, served from the proxy's own event loop.

The core counts in a plain dict (an int add per event, nothing on the hot path); this module
turns the dict into Prometheus counters only when scraped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# name → (label name, [(label value, gauge value)])
LabelledGauges = Callable[[], dict[str, tuple[str, list[tuple[str, int]]]]]


class CoreCollector(Collector):
    """Exposes `core.stats` as `sip700_<name>_total` and live state as gauges."""

    def __init__(self, stats: Callable[[], dict[str, int]], gauges: Callable[[], dict[str, int]],
                 labelled: LabelledGauges | None = None):
        self._stats = stats
        self._gauges = gauges
        self._labelled = labelled

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        for name, value in sorted(self._stats().items()):
            yield CounterMetricFamily(f"sip700_{name}", f"sip700 {name.replace('_', ' ')}",
                                      value=value)
        for name, value in sorted(self._gauges().items()):
            yield GaugeMetricFamily(f"sip700_{name}", f"sip700 {name.replace('_', ' ')}",
                                    value=value)
        if self._labelled is not None:
            for name, (label, series) in sorted(self._labelled().items()):
                family = GaugeMetricFamily(f"sip700_{name}", f"sip700 {name.replace('_', ' ')}",
                                           labels=[label])
                for key, value in series:
                    family.add_metric([key], value)
                yield family


async def serve_metrics(host: str, port: int, registry: CollectorRegistry,
                        healthy: Callable[[], bool]) -> asyncio.base_events.Server:
    """GET /metrics (Prometheus text format) and GET /health (200 ok / 503)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b"/"
            if path.startswith(b"/metrics"):
                status, body = b"200 OK", generate_latest(registry)
                ctype = b"text/plain; version=0.0.4"
            elif path.startswith(b"/health"):
                ok = healthy()
                status = b"200 OK" if ok else b"503 Service Unavailable"
                body, ctype = (b"ok\n" if ok else b"unhealthy\n"), b"text/plain"
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

    return await asyncio.start_server(handle, host, port)
