"""The shell's side of call records: what the tracker produced, written to Redis in batches,
with a local spool when Redis cannot take them.

One pass every `records.flush_ms` (never per message): the tracker's ops since the last pass go
in one MULTI/EXEC — XADD of each record (one stream field per record field) and event, HSET +
EXPIRE of each answered call's record so far, DEL of each ended call's — plus a SET of the
batch's mark, so a replayed batch whose first write did reach Redis is recognised and skipped.
A BYE this process does not hold (`release` op) is resolved first: HGETALL + DEL of the call's
hash in one transaction (so only one BYE gets it), finished into a record that joins the batch.

Redis down (an error, a timeout): the batch is appended to the spool file (one JSON line per
batch, fsync'd, bounded by records.spool_max_mb) and the writer checks Redis again every second;
once it answers, the spool is replayed in order, batch by batch, each skipped if its mark is
there, and removed. A process that starts with a spool replays it the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import structlog

from proxy.records.tracker import CallTracker, finish

log = structlog.get_logger("sip700.records")

RELEASE_RETRIES = (1.0, 2.0, 4.0, 8.0, 15.0)  # a BYE whose call's hash is not (yet) in Redis
DAY_MS = 86_400_000


def instance_name(cfg: Any, index: int) -> str:
    return f"{cfg.records.instance or socket.gethostname()}/{index}"


def records_url(cfg: Any) -> str:
    return cfg.records.redis_url or cfg.store.redis_url


def key_prefix(cfg: Any) -> str:
    return cfg.records.key_prefix or cfg.store.key_prefix


def live_key(prefix: str, key: str) -> str:
    return f"{prefix}call:{key}"


def event_tenants(cfg: Any) -> frozenset[str]:
    return frozenset(t.id for t in cfg.tenants if t.events_url)


class Spool:
    """Batches Redis could not take, in a file: appended, read back in order, removed."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        path.parent.mkdir(parents=True, exist_ok=True)

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def append(self, batch_id: str, ops: list[tuple[Any, ...]]) -> bool:
        """False when the spool is full (the batch is lost, and counted)."""
        line = json.dumps({"id": batch_id, "ops": ops}, separators=(",", ":"),
                          ensure_ascii=False).encode() + b"\n"
        if self.size() + len(line) > self.max_bytes:
            return False
        with self.path.open("ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        return True

    def batches(self) -> list[tuple[str, list[list[Any]]]]:
        if not self.path.exists():
            return []
        out = []
        for raw in self.path.read_bytes().splitlines():
            try:
                item = json.loads(raw)
            except ValueError:
                continue  # a line cut by a crash mid-write: its batch was never acknowledged
            out.append((item["id"], item["ops"]))
        return out

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class RecordWriter:
    """Writes a worker's records, events and live calls to Redis; spools when it cannot."""

    def __init__(self, tracker: CallTracker, client: Any, *, stream: str, events_stream: str,
                 prefix: str, spool: Spool, flush_s: float = 0.05,
                 retention_days: int = 90, max_len: int | None = None,
                 events_max_len: int = 1_000_000, live_ttl_s: int = 43200 + 3600,
                 dedupe_window_s: int = 3600, batch_prefix: str = "") -> None:
        self.tracker = tracker
        self.client = client
        self.stream = stream
        self.events_stream = events_stream
        self.prefix = prefix
        self.spool = spool
        self.flush_s = flush_s
        self.retention_ms = retention_days * DAY_MS
        self.max_len = max_len
        self.events_max_len = events_max_len
        self.live_ttl_s = live_ttl_s
        self.dedupe_window_s = dedupe_window_s
        self._batch_prefix = batch_prefix or (
            f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}")
        self._claim = client.register_script(CLAIM_SCRIPT)
        self._seq = 0
        self.redis_ok = True
        self._retry_at = 0.0
        self._retries: list[tuple[float, int, tuple[Any, ...]]] = []  # due, attempt, op
        self._task: asyncio.Task[None] | None = None
        self._lost_logged_at = -1e9  # the spool-full log line: at most one per 10 s
        self._lost_unlogged = 0
        self.stats = tracker.stats

    def _count(self, name: str, n: int = 1) -> None:
        self.stats[name] = self.stats.get(name, 0) + n

    def gauges(self) -> dict[str, float]:
        """For the metrics endpoint: the spool's size (0 while Redis takes every batch), whether
        Redis took the last batch, and the records waiting for the next flush."""
        return {"records_spool_bytes": self.spool.size(),
                "records_redis_up": int(self.redis_ok),
                "records_pending": len(self.tracker.out)}

    def start(self) -> None:
        if self.spool.size():
            self.redis_ok = False  # replay what an earlier run left before anything new
            self._count("records_spool_found")
            log.warning("records_spool_found", path=str(self.spool.path),
                        bytes=self.spool.size())
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Write what is left (or spool it) and stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(final=True), 3.0)
        if self.tracker.out:  # Redis did not answer in time: nothing is lost
            self._spool(self._take())
        with contextlib.suppress(Exception):
            await self.client.aclose()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("records_flush_failed")

    def _take(self) -> list[tuple[Any, ...]]:
        ops, self.tracker.out = self.tracker.out, []
        now = time.monotonic()
        if self._retries and (self._retries[0][0] <= now):
            due = [r for r in self._retries if r[0] <= now]
            self._retries = [r for r in self._retries if r[0] > now]
            ops = [r[2] for r in due] + ops
        return ops

    async def flush(self, final: bool = False) -> None:
        """One pass: the spool first (when Redis is back), then what the tracker made."""
        self.tracker.expire(time.monotonic())
        self.tracker.offset = time.time() - time.monotonic()  # the wall clock may be stepped
        if not self.redis_ok:
            if not final and time.monotonic() < self._retry_at:
                if self.tracker.out:
                    self._spool(self._take())
                return
            if not await self._replay():
                self._retry_at = time.monotonic() + 1.0
                if self.tracker.out:
                    self._spool(self._take())
                return
        ops = self._take()
        if not ops:
            return
        batch_id = self._new_batch_id()
        try:
            ops = await self._resolve(ops)
            await self._write(batch_id, ops)
        except Exception as exc:
            self._down(exc)
            # the same id: if this write did reach Redis (its reply was lost), the replay
            # finds the batch's mark and skips it
            self._spool(ops, batch_id)

    def _new_batch_id(self) -> str:
        self._seq += 1
        return f"{self._batch_prefix}:{self._seq}"

    def _down(self, exc: Exception) -> None:
        if self.redis_ok:
            log.error("records_redis_unavailable", error=f"{type(exc).__name__}: {exc}",
                      spool=str(self.spool.path))
        self.redis_ok = False
        self._retry_at = time.monotonic() + 1.0
        self._count("records_redis_errors")

    def _spool(self, ops: list[tuple[Any, ...]], batch_id: str | None = None) -> None:
        if not ops:
            return
        if self.spool.append(batch_id or self._new_batch_id(), [list(op) for op in ops]):
            self._count("records_spooled", sum(1 for op in ops if op[0] == "record"))
        else:
            lost = sum(1 for op in ops if op[0] == "record")
            self._count("records_lost_spool_full", lost)
            self._lost_unlogged += lost
            now = time.monotonic()
            if now >= self._lost_logged_at + 10.0:  # one line per 10 s, not one per batch
                self._lost_logged_at = now
                log.error("records_spool_full", path=str(self.spool.path),
                          records_lost=self._lost_unlogged, max_bytes=self.spool.max_bytes)
                self._lost_unlogged = 0

    async def _replay(self) -> bool:
        """Write the spool back to Redis; True when it is empty afterwards."""
        batches = self.spool.batches()
        done = 0
        try:
            await self.client.ping()
            for batch_id, ops in batches:
                if await self.client.exists(self._mark(batch_id)):
                    self._count("records_spool_batches_skipped")
                else:
                    await self._write(batch_id, await self._resolve([tuple(op) for op in ops]))
                done += 1
        except Exception:
            self._count("records_redis_errors")
            if done:  # what was written is not written twice
                self._rewrite_spool(batches[done:])
            return False
        self.spool.clear()
        if batches:
            self._count("records_spool_replayed", sum(
                1 for _id, ops in batches for op in ops if op[0] == "record"))
            log.info("records_spool_replayed", batches=len(batches))
        if not self.redis_ok:
            log.info("records_redis_back")
        self.redis_ok = True
        return True

    def _rewrite_spool(self, rest: list[tuple[str, list[list[Any]]]]) -> None:
        tmp = self.spool.path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            for batch_id, ops in rest:
                f.write(json.dumps({"id": batch_id, "ops": ops}, separators=(",", ":"),
                                   ensure_ascii=False).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.spool.path)

    def _mark(self, batch_id: str) -> str:
        return f"{self.prefix}records:batch:{batch_id}"

    async def _write(self, batch_id: str, ops: list[tuple[Any, ...]]) -> None:
        if not ops:
            return
        now_ms = int(time.time() * 1000)
        minid = f"{max(0, now_ms - self.retention_ms)}-0"
        async with self.client.pipeline(transaction=True) as pipe:
            for op in ops:
                kind = op[0]
                if kind == "record":
                    if self.max_len:
                        pipe.xadd(self.stream, op[1], maxlen=self.max_len, approximate=True)
                    else:
                        pipe.xadd(self.stream, op[1], minid=minid, approximate=True)
                elif kind == "event":
                    pipe.xadd(self.events_stream, op[1], maxlen=self.events_max_len,
                              approximate=True)
                elif kind == "open":
                    key = live_key(self.prefix, op[1])
                    pipe.hset(key, mapping=op[2])
                    pipe.expire(key, self.live_ttl_s)
                elif kind == "close":
                    pipe.delete(live_key(self.prefix, op[1]))
            pipe.set(self._mark(batch_id), 1, ex=self.dedupe_window_s)
            await pipe.execute()
        self._count("records_written", sum(1 for op in ops if op[0] == "record"))

    async def _resolve(self, ops: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """`ops` with each `release` (a BYE for a call answered elsewhere, or before a
        restart) replaced by the call's record and the DEL of its hash. The hash is claimed
        first (CLAIM_SCRIPT): of two BYEs for one call, one makes the record; a claim whose
        reply was lost is claimed again by the same op. A hash not there yet is tried again
        later (RELEASE_RETRIES)."""
        releases = [op for op in ops if op[0] == "release"]
        if not releases:
            return ops
        async with self.client.pipeline(transaction=False) as pipe:
            for op in releases:
                token = f"{op[2]['release_at']}:{op[2]['release_dir']}"
                await self._claim(keys=[live_key(self.prefix, op[1])], args=[token],
                                  client=pipe)
            replies = await pipe.execute()
        out = [op for op in ops if op[0] != "release"]
        now = time.monotonic()
        for op, reply in zip(releases, replies, strict=True):
            if isinstance(reply, list):
                fields = dict(zip(reply[::2], reply[1::2], strict=True))
                fields.pop("_r", None)
                record = finish(fields, op[2])
                out.append(("record", record))
                out.append(("close", op[1]))
                event = self.tracker.end_event(record)
                if event is not None:  # as when the call ends where it was answered
                    out.append(event)
                self._count("records_made")
                continue
            if reply == 1:  # another BYE of this call made its record
                self._count("records_bye_repeated")
                continue
            attempt = op[3] if len(op) > 3 else 0
            if attempt < len(RELEASE_RETRIES):
                self._retries.append((now + RELEASE_RETRIES[attempt], attempt + 1,
                                      (*op[:3], attempt + 1)))
                self._retries.sort(key=lambda r: r[0])
            else:
                self._count("records_release_unmatched")
                log.warning("records_release_unmatched", call=op[1])
        return out


# KEYS: a live call's hash. ARGV: the release's token. 0: no such call; 1: claimed by another
# release; else the hash's fields (claimed by this one).
CLAIM_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSETNX', KEYS[1], '_r', ARGV[1])
if redis.call('HGET', KEYS[1], '_r') ~= ARGV[1] then return 1 end
return redis.call('HGETALL', KEYS[1])
"""


def build_writer(cfg: Any, tracker: CallTracker, index: int) -> RecordWriter:
    """The writer of worker `index`, from `records:` (its own spool file)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(records_url(cfg), decode_responses=True,
                                     socket_timeout=2.0, socket_connect_timeout=1.0,
                                     client_name="sip700-records")
    r = cfg.records
    spool = Spool(Path(r.spool_dir) / f"spool-{index}.jsonl", r.spool_max_mb << 20)
    return RecordWriter(
        tracker, client, stream=r.stream, events_stream=r.events_stream,
        prefix=key_prefix(cfg), spool=spool, flush_s=r.flush_ms / 1000,
        retention_days=r.retention_days, max_len=r.max_len, events_max_len=r.events_max_len,
        live_ttl_s=int(cfg.privacy.max_dialog_s) + 3600, dedupe_window_s=r.dedupe_window_s)
