#!/usr/bin/env python3
"""Binding-store figures: cache-hit lookups/s, Redis-miss lookups/s (p50/p99), import rate,
and Redis memory per binding.

    python3 scripts/bench_store.py                      # lookups + 200k-row import
    python3 scripts/bench_store.py --import-rows 1000000
    python3 scripts/bench_store.py --memory-rows 1000000 --skip-lookups --import-rows 0

Lookups and imports use the Redis at --redis-url under a unique key prefix, deleted at the end.
The memory figure comes from a private redis-server on a free port (so other clients' keys
do not blur it), started and killed here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.bindings.admin import import_file
from proxy.bindings.memory import MemoryStore
from proxy.bindings.model import AXB, Binding
from proxy.bindings.redis_store import RedisStore


def store_config(url: str, prefix: str) -> SimpleNamespace:
    return SimpleNamespace(
        backend="redis",
        redis_url=url,
        key_prefix=prefix,
        sentinel=None,
        cluster=None,
        timeout_ms=1000,
        cache=SimpleNamespace(max_entries=1_000_000, max_ttl_s=300.0, negative_ttl_s=1.0),
        circuit_breaker=SimpleNamespace(failure_threshold=5, open_s=1.0),
    )


def x_of(i: int, per_x: int) -> str:
    return f"7001{i // per_x:011d}"


def binding_of(i: int, per_x: int, ttl: float = 3600.0) -> Binding:
    return Binding(AXB, x_of(i, per_x), f"138{i:08d}", f"139{i:08d}", time.time() + ttl)


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:,.0f}/s"


def delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    batch: list[bytes] = []
    for key in client.scan_iter(match=prefix + "*", count=5000):
        batch.append(key)
        if len(batch) >= 5000:
            client.unlink(*batch)
            batch.clear()
    if batch:
        client.unlink(*batch)
    client.close()


def bench_memory_store_hits(rounds: int) -> None:
    store = MemoryStore()
    now = time.time()
    for i in range(10_000):
        store.bind_now(binding_of(i, 10), now)
    keys = [(x_of(i, 10), f"138{i:08d}") for i in range(0, 10_000, 7)]
    resolve = store.resolve_cached
    started = time.perf_counter()
    n = 0
    for _ in range(rounds):
        for x, caller in keys:
            resolve(x, caller, now)
        n += len(keys)
    elapsed = time.perf_counter() - started
    print(f"memory store resolve_cached: {rate(n, elapsed)} ({elapsed / n * 1e6:.2f} µs each)")


async def bench_redis(url: str, rows: int, concurrency: int) -> None:
    prefix = f"sip700bench:{uuid.uuid4().hex[:8]}:"
    store = RedisStore.from_config(store_config(url, prefix))
    try:
        await store.start()
        bindings = [binding_of(i, 10) for i in range(rows)]
        for i in range(0, rows, 1000):
            await store.bind_many(bindings[i : i + 1000])
        await asyncio.sleep(0.2)  # let our own invalidation messages pass

        # Misses, one at a time: every (x, caller) is new to the cache.
        latencies = []
        half = rows // 2
        started = time.perf_counter()
        for b in bindings[:half]:
            t0 = time.perf_counter()
            await store.resolve(b.x, b.a)
            latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - started
        latencies.sort()
        p50 = statistics.median(latencies) * 1e6
        p99 = latencies[int(len(latencies) * 0.99)] * 1e6
        print(f"redis miss, sequential: {rate(half, elapsed)}, p50 {p50:.0f} µs, p99 {p99:.0f} µs")

        # Misses, `concurrency` in flight (what many concurrent INVITEs look like).
        rest = bindings[half:]
        latencies = []
        queue = iter(rest)

        async def worker() -> None:
            for b in queue:
                t0 = time.perf_counter()
                await store.resolve(b.x, b.b)  # type: ignore[arg-type]
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        latencies.sort()
        print(
            f"redis miss, {concurrency} concurrent: {rate(len(rest), elapsed)}, "
            f"p50 {statistics.median(latencies) * 1e6:.0f} µs, "
            f"p99 {latencies[int(len(latencies) * 0.99)] * 1e6:.0f} µs"
        )

        # Hits: everything above is cached now.
        now = time.time()
        keys = [(b.x, b.a) for b in bindings[:half]]
        resolve = store.resolve_cached
        started = time.perf_counter()
        n = 0
        for _ in range(max(1, 2_000_000 // len(keys))):
            for x, caller in keys:
                resolve(x, caller, now)
            n += len(keys)
        elapsed = time.perf_counter() - started
        hits = sum(1 for x, c in keys if resolve(x, c, now) is not None)
        print(
            f"redis store cache hit (resolve_cached): {rate(n, elapsed)} "
            f"({elapsed / n * 1e6:.2f} µs each; {hits}/{len(keys)} keys cached)"
        )
    finally:
        await store.close()
        delete_prefix(url, prefix)


async def bench_lookup_paths(url: str, rows: int, per_run: int) -> None:
    """CPU per Redis miss: a task per lookup through resolve() (how the transport looked up
    before 2026-12-03, and still does without the lean connection), against lookup_batch (a
    loop pass's misses in one write), one at a time and 32 at a time; every key new to the
    cache. The CPU is this process's (Python, and its system calls), not Redis's."""
    prefix = f"sip700bench:{uuid.uuid4().hex[:8]}:"
    store = RedisStore.from_config(store_config(url, prefix))
    loop = asyncio.get_running_loop()
    try:
        await store.start()
        bindings = [binding_of(i, 1) for i in range(rows)]
        for i in range(0, rows, 1000):
            await store.bind_many(bindings[i : i + 1000])
        await asyncio.sleep(0.2)
        keys = iter([(b.x, b.a) for b in bindings] + [(b.x, b.b) for b in bindings])

        async def by_task(group: list[tuple[str, str]]) -> None:
            await asyncio.gather(*(loop.create_task(store.resolve(x, c)) for x, c in group))

        async def by_batch(group: list[tuple[str, str]]) -> None:
            done = loop.create_future()
            left = len(group)

            def arrived(results: list) -> None:
                nonlocal left
                left -= len(results)
                if not left:
                    done.set_result(None)

            answered, rest = store.lookup_batch([(i, x, c) for i, (x, c) in enumerate(group)],
                                                arrived)
            assert not answered and not rest, "every key is new and the connection is up"
            await done

        for size in (1, 32):
            for name, run in (("task per lookup", by_task), ("lookup_batch", by_batch)):
                n = per_run - per_run % size
                groups = [[next(keys) for _ in range(size)] for _ in range(n // size)]
                cpu, wall = time.process_time(), time.perf_counter()
                for group in groups:
                    await run(group)
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                print(f"redis miss, {size:>2} at a time, {name}: {cpu / n * 1e6:.1f} µs of CPU "
                      f"a lookup, {rate(n, wall)}")
    finally:
        await store.close()
        delete_prefix(url, prefix)


async def bench_import(url: str, rows: int, per_x: int) -> None:
    prefix = f"sip700bench:{uuid.uuid4().hex[:8]}:"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bindings.csv"
        with path.open("w") as handle:
            handle.write("type,x,a,b,ttl\n")
            for i in range(rows):
                handle.write(f"axb,{x_of(i, per_x)},138{i:08d},139{i:08d},3600\n")
        store = RedisStore.from_config(store_config(url, prefix))
        try:
            started = time.perf_counter()
            bound, problems = await import_file(store, path)
            elapsed = time.perf_counter() - started
            print(
                f"import {rows:,} rows ({per_x} per X): {bound:,} bound, {len(problems)} skipped "
                f"in {elapsed:.1f} s = {rate(bound, elapsed)}"
            )
        finally:
            await store.close()
            delete_prefix(url, prefix)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def bench_memory(rows: int, shapes: list[int]) -> None:
    server_bin = shutil.which("redis-server")
    if server_bin is None:
        print("memory: redis-server not installed")
        return
    for per_x in shapes:
        port = free_port()
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.Popen(
                [
                    server_bin,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    tmp,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                url = f"redis://127.0.0.1:{port}/0"
                raw = redis.Redis.from_url(url)
                for _ in range(100):
                    with contextlib.suppress(redis.ConnectionError):
                        raw.ping()
                        break
                    time.sleep(0.05)
                before = int(raw.info("memory")["used_memory"])
                store = RedisStore.from_config(store_config(url, "sip700:"))
                for i in range(0, rows, 2000):
                    batch = [binding_of(j, per_x) for j in range(i, min(rows, i + 2000))]
                    await store.bind_many(batch)
                await store.close()
                info = raw.info("memory")
                after = int(info["used_memory"])
                keys = raw.dbsize()
                print(
                    f"redis memory, {rows:,} bindings, {per_x} per X ({keys:,} keys): "
                    f"{(after - before) / rows:.0f} bytes/binding "
                    f"(used_memory +{(after - before) / 2**20:.0f} MiB)"
                )
                raw.close()
            finally:
                proc.kill()
                proc.wait()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--lookup-rows", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--import-rows", type=int, default=200_000)
    parser.add_argument("--import-per-x", type=int, default=10)
    parser.add_argument("--memory-rows", type=int, default=0)
    parser.add_argument("--memory-shapes", default="1,10,100", help="bindings per X")
    parser.add_argument("--skip-lookups", action="store_true")
    args = parser.parse_args()

    if not args.skip_lookups:
        bench_memory_store_hits(rounds=100)
        await bench_redis(args.redis_url, args.lookup_rows, args.concurrency)
        await bench_lookup_paths(args.redis_url, args.lookup_rows, args.lookup_rows // 5)
    if args.import_rows:
        await bench_import(args.redis_url, args.import_rows, args.import_per_x)
    if args.memory_rows:
        shapes = [int(s) for s in args.memory_shapes.split(",")]
        await bench_memory(args.memory_rows, shapes)


if __name__ == "__main__":
    asyncio.run(main())
