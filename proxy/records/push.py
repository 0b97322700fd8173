"""Per-tenant HTTP push of call records and call events, the way Alibaba and Huawei push theirs:
batched JSON arrays, signed, retried with backoff, at least once, dead-lettered after N failures.

The pusher reads the streams (records.stream, records.events_stream) through a consumer group
(records.push.group), so what it has not acknowledged is delivered again after a crash or a
restart (at least once: receivers de-duplicate on `record_id`, or on (`record_id`, `event`) for
events). Each tenant has its own queue and sender: a tenant whose endpoint is down does not hold
up the others. A batch that still fails after records.push.max_attempts goes, entry by entry, to
the dead-letter stream (records.dead_letter_stream) with the error, and is acknowledged.

Signature: header `X-Sip700-Signature: t=<unix seconds>,v1=<hex>`, where hex is
HMAC-SHA256(tenants[].records_secret, "<t>.<body>"); `X-Sip700-Kind: records | events`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import socket
import time
from dataclasses import dataclass
from typing import Any

import structlog

from proxy.records.model import for_json

log = structlog.get_logger("sip700.records.push")
MAX_QUEUED = 20_000  # entries read and not yet acknowledged, over all tenants


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


@dataclass(frozen=True)
class Target:
    tenant: str
    kind: str  # records | events
    url: str
    secret: str
    events: frozenset[str] = frozenset()


class RecordPusher:
    """Reads the records and events streams and pushes each tenant's entries to its URL."""

    def __init__(self, client: Any, targets: list[Target], *, records_stream: str,
                 events_stream: str, dead_letter_stream: str, group: str, consumer: str,
                 batch_size: int = 100, batch_wait_s: float = 0.2, timeout_s: float = 5.0,
                 max_attempts: int = 8, backoff_s: float = 0.5, max_backoff_s: float = 60.0
                 ) -> None:
        self.client = client
        self.targets = {(t.kind, t.tenant): t for t in targets}
        self.streams = {"records": records_stream, "events": events_stream}
        self.dead_letter_stream = dead_letter_stream
        self.group = group
        self.consumer = consumer
        self.batch_size = batch_size
        self.batch_wait_s = batch_wait_s
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.queues: dict[tuple[str, str], asyncio.Queue[tuple[str, dict[str, str]]]] = {}
        self.queued = 0
        self.stats: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._session: Any = None

    @classmethod
    def from_config(cls, cfg: Any) -> RecordPusher:
        import redis.asyncio as aioredis

        from proxy.records.writer import records_url

        targets = []
        for t in cfg.tenants:
            if t.records_url:
                targets.append(Target(t.id, "records", t.records_url, t.records_secret or ""))
            if t.events_url:
                targets.append(Target(t.id, "events", t.events_url, t.records_secret or "",
                                      frozenset(t.events)))
        r = cfg.records
        p = r.push
        client = aioredis.Redis.from_url(records_url(cfg), decode_responses=True,
                                         socket_timeout=5.0, socket_connect_timeout=2.0,
                                         client_name="sip700-push")
        return cls(client, targets, records_stream=r.stream, events_stream=r.events_stream,
                   dead_letter_stream=r.dead_letter_stream, group=p.group,
                   consumer=p.consumer or socket.gethostname(), batch_size=p.batch_size,
                   batch_wait_s=p.batch_wait_ms / 1000, timeout_s=p.timeout_s,
                   max_attempts=p.max_attempts, backoff_s=p.backoff_ms / 1000,
                   max_backoff_s=p.max_backoff_s)

    def _count(self, name: str, n: int = 1) -> None:
        self.stats[name] = self.stats.get(name, 0) + n

    def start(self) -> None:
        import aiohttp

        loop = asyncio.get_running_loop()
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        for target in self.targets.values():
            queue: asyncio.Queue[tuple[str, dict[str, str]]] = asyncio.Queue()
            self.queues[(target.kind, target.tenant)] = queue
            self._tasks.append(loop.create_task(self._send_loop(target, queue)))
        for kind in ("records", "events"):
            if any(k == kind for k, _ in self.targets):
                self._tasks.append(loop.create_task(self._read_loop(kind)))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._session is not None:
            await self._session.close()
        with contextlib.suppress(Exception):
            await self.client.aclose()

    # ---- reading ---------------------------------------------------------------------------
    async def _ensure_group(self, stream: str) -> None:
        try:
            await self.client.xgroup_create(stream, self.group, id="0", mkstream=True)
        except Exception as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _read_loop(self, kind: str) -> None:
        stream = self.streams[kind]
        pending = True  # first what this consumer was given and never acknowledged
        while True:
            try:
                await self._ensure_group(stream)
                while True:
                    if self.queued >= MAX_QUEUED:
                        await asyncio.sleep(0.05)
                        continue
                    found = await self.client.xreadgroup(
                        self.group, self.consumer, {stream: "0" if pending else ">"},
                        count=500, block=None if pending else 1000)
                    rows = found[0][1] if found else []
                    if pending and not rows:
                        pending = False
                        continue
                    await self._dispatch(kind, stream, rows)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._count("push_read_errors")
                log.warning("records_push_read_failed", stream=stream,
                            error=f"{type(exc).__name__}: {exc}")
                pending = True  # after a Redis restart, start from what is pending
                await asyncio.sleep(1.0)

    async def _dispatch(self, kind: str, stream: str, rows: list[Any]) -> None:
        unwanted = []
        for entry_id, fields in rows:
            target = self.targets.get((kind, fields.get("tenant", "")))
            if target is None or (kind == "events" and fields.get("event") not in
                                  target.events):
                unwanted.append(entry_id)
                continue
            self.queued += 1
            self.queues[(kind, target.tenant)].put_nowait((entry_id, fields))
        if unwanted:  # no endpoint for them: nothing to deliver
            await self.client.xack(stream, self.group, *unwanted)

    # ---- sending ---------------------------------------------------------------------------
    async def _send_loop(self, target: Target,
                         queue: asyncio.Queue[tuple[str, dict[str, str]]]) -> None:
        stream = self.streams[target.kind]
        while True:
            batch = [await queue.get()]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.batch_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), left))
                except TimeoutError:
                    break
            await self._deliver(target, stream, batch)
            self.queued -= len(batch)

    async def _deliver(self, target: Target, stream: str,
                       batch: list[tuple[str, dict[str, str]]]) -> None:
        ids = [entry_id for entry_id, _ in batch]
        body = json.dumps([for_json(fields) for _, fields in batch], ensure_ascii=False,
                          separators=(",", ":")).encode()
        delay = self.backoff_s
        error = ""
        for attempt in range(1, self.max_attempts + 1):
            stamp = int(time.time())
            try:
                async with self._session.post(target.url, data=body, headers={
                        "Content-Type": "application/json",
                        "X-Sip700-Kind": target.kind,
                        "X-Sip700-Signature": signature(target.secret, stamp, body)}) as resp:
                    await resp.read()
                    if 200 <= resp.status < 300:
                        await self._ack(stream, ids)
                        self._count(f"push_{target.kind}_delivered", len(batch))
                        return
                    error = f"HTTP {resp.status}"
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            self._count("push_failures")
            log.warning("records_push_failed", tenant=target.tenant, kind=target.kind,
                        attempt=attempt, entries=len(batch), error=error)
            if attempt < self.max_attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
        await self._dead_letter(target, stream, batch, error)

    async def _ack(self, stream: str, ids: list[str]) -> None:
        while True:  # an unacknowledged entry would be pushed again: keep trying
            try:
                await self.client.xack(stream, self.group, *ids)
                return
            except Exception:
                await asyncio.sleep(1.0)

    async def _dead_letter(self, target: Target, stream: str,
                           batch: list[tuple[str, dict[str, str]]], error: str) -> None:
        while True:
            try:
                async with self.client.pipeline(transaction=True) as pipe:
                    for entry_id, fields in batch:
                        pipe.xadd(self.dead_letter_stream, {
                            **fields, "dl_kind": target.kind, "dl_url": target.url,
                            "dl_error": error[:200], "dl_attempts": self.max_attempts,
                            "dl_entry": entry_id})
                    pipe.xack(stream, self.group, *[entry_id for entry_id, _ in batch])
                    await pipe.execute()
                break
            except Exception:
                await asyncio.sleep(1.0)
        self._count("push_dead_lettered", len(batch))
        log.error("records_push_dead_lettered", tenant=target.tenant, kind=target.kind,
                  entries=len(batch), error=error)
