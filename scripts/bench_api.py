#!/usr/bin/env python3
"""Binding API throughput: creates/s (each allocating X from the pool) and latency percentiles.

Starts `sip700 api` on the Redis store (its own key prefix, deleted at the end) with a tenant
whose pool holds --pool numbers, then drives POST /v1/bindings from --connections keep-alive
HTTP/1.1 connections on loopback, each sending its next request when the previous answer is
in. The client is a lean asyncio protocol (no HTTP library) so that the figure is the API's,
not the client's: both share this machine's cores.

    python3 scripts/bench_api.py [--creates 20000] [--connections 64] [--processes 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxy.api.keys import hash_key  # noqa: E402

KEY = "s7k_bench-key"


class _Client(asyncio.Protocol):
    """One keep-alive connection: send a request, wait for its whole response."""

    def __init__(self) -> None:
        self.buffer = b""
        self.waiter: asyncio.Future[int] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = self.buffer[:head_end].decode("latin-1")
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        if len(self.buffer) < head_end + 4 + length:
            return
        self.buffer = self.buffer[head_end + 4 + length:]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(int(head.split(" ", 2)[1]))

    async def request(self, data: bytes) -> int:
        self.waiter = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(data)
        return await self.waiter


def _request(port: int, body: dict) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    return (f"POST /v1/bindings HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


async def drive(port: int, creates: int, connections: int) -> tuple[float, list[float], dict]:
    loop = asyncio.get_running_loop()
    clients = []
    for _ in range(connections):
        _, client = await loop.create_connection(_Client, "127.0.0.1", port)
        clients.append(client)
    bodies = [_request(port, {"a": f"138{i:08d}", "b": f"139{i:08d}", "ttl_s": 3600,
                              "order_id": f"bench-{i}", "area": "010"})
              for i in range(creates)]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    next_index = 0

    async def worker(client: _Client) -> None:
        nonlocal next_index
        while next_index < creates:
            body = bodies[next_index]
            next_index += 1
            started = time.perf_counter()
            status = await client.request(body)
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in clients))
    elapsed = time.perf_counter() - started
    for client in clients:
        assert client.transport is not None
        client.transport.close()
    return elapsed, latencies, statuses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--creates", type=int, default=20000)
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--processes", type=int, default=2, help="API processes")
    parser.add_argument("--pool", type=int, default=2000, help="numbers in the tenant's pool")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()

    prefix = f"bench9:{uuid.uuid4().hex[:8]}:"
    workdir = Path(tempfile.mkdtemp(prefix="bench_api-"))
    port = 18700 + os.getpid() % 1000
    config = {
        "carrier": {"gateways": ["sip:127.0.0.1:5090"]},
        "store": {"backend": "redis", "redis_url": args.redis_url, "key_prefix": prefix},
        "api": {"listen": f"127.0.0.1:{port}"},
        "tenants": [{"id": "bench", "api_keys": [hash_key(KEY)], "max_pairs_per_x": 200,
                     "rate_limit_per_s": 1_000_000, "pools": [
                         {"range": f"700100000000001-{700100000000000 + args.pool}",
                          "area": "010"}]}],
        "logging": {"level": "warning"},
    }
    path = workdir / "api.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "api", "--config", str(path),
                             "--processes", str(args.processes)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        time.sleep(0.5)  # every API process is up
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        runner(drive(port, args.warmup, args.connections))
        elapsed, latencies, statuses = runner(drive(port, args.creates, args.connections))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        import redis

        client = redis.Redis.from_url(args.redis_url)
        keys = list(client.scan_iter(match=prefix + "*", count=10000))
        for i in range(0, len(keys), 5000):
            client.delete(*keys[i:i + 5000])
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1000

    print(f"{args.creates} creates with allocation over {args.connections} connections, "
          f"{args.processes} API process(es), pool {args.pool}: "
          f"{args.creates / elapsed:,.0f} creates/s; latency p50 {pct(0.5):.2f} ms, "
          f"p99 {pct(0.99):.2f} ms, max {latencies[-1] * 1000:.2f} ms; statuses {statuses}")
    return 0 if set(statuses) == {201} else 1


if __name__ == "__main__":
    sys.exit(main())
