"""The records writer (proxy/records/writer.py) in the test's event loop, against the machine's
Redis (streams under a key prefix of the test's own, deleted afterwards) or a port where no
Redis listens: retention of the records stream, and a spool that stays within its bound and is
replayed by the next process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from proxy.records.tracker import CallTracker
from proxy.records.writer import RecordWriter, Spool
from tests.integration.procs import REDIS_URL, free_port, redis_prefix_client

pytestmark = pytest.mark.integration


@pytest.fixture
async def redis_prefix() -> AsyncIterator[tuple[aioredis.Redis, str]]:
    async with redis_prefix_client("writer") as pair:
        yield pair


def writer(url: str, prefix: str, spool: Spool, **kw: object) -> RecordWriter:
    client = aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=1.0,
                                     socket_connect_timeout=1.0)
    return RecordWriter(CallTracker("test/0"), client, stream=f"{prefix}records",
                        events_stream=f"{prefix}events", prefix=prefix, spool=spool, **kw)


def record(n: int) -> tuple[str, dict[str, str]]:
    return ("record", {"record_id": f"{n:032x}", "caller": "13800000001", "sip_status": "200"})


async def test_records_stream_is_trimmed_by_length_or_by_age(
        redis_prefix: tuple[aioredis.Redis, str], tmp_path: Path) -> None:
    client, prefix = redis_prefix
    by_len = writer(REDIS_URL, prefix + "len:", Spool(tmp_path / "a.jsonl", 1 << 20),
                    max_len=100)
    for batch in range(10):
        by_len.tracker.out.extend(record(batch * 100 + i) for i in range(100))
        await by_len.flush()
    assert by_len.stats["records_written"] == 1000
    assert await client.xlen(f"{prefix}len:records") <= 200  # MAXLEN ~ 100: whole nodes go

    # by age: 150 entries from 1970 (explicit ids), then today's records trim them (MINID ~)
    stream = f"{prefix}age:records"
    for i in range(1, 151):
        await client.xadd(stream, {"old": "1"}, id=f"1-{i}")
    by_age = writer(REDIS_URL, prefix + "age:", Spool(tmp_path / "b.jsonl", 1 << 20),
                    retention_days=1)
    by_age.tracker.out.extend(record(i) for i in range(10))
    await by_age.flush()
    old = [eid for eid, _ in await client.xrange(stream) if eid.startswith("1-")]
    assert len(old) < 150 and await client.xlen(stream) < 160
    await by_len.close()
    await by_age.close()


async def test_spool_stays_within_its_bound_and_the_next_process_replays_it(
        redis_prefix: tuple[aioredis.Redis, str], tmp_path: Path) -> None:
    client, prefix = redis_prefix
    spool_path = tmp_path / "spool-0.jsonl"
    down = writer(f"redis://127.0.0.1:{free_port()}/0", prefix, Spool(spool_path, 4096))
    with capture_logs() as logs:
        for i in range(200):  # one batch per record: a ~130-byte line each
            down.tracker.out.append(record(i))
            down._retry_at = 0.0  # no 1 s wait between attempts in a test
            await down.flush()
    kept = down.stats["records_spooled"]
    assert 0 < kept < 200 and down.stats["records_lost_spool_full"] == 200 - kept
    # every lost record counted, but one log line (at most one per 10 s), not one per batch
    full = [line for line in logs if line["event"] == "records_spool_full"]
    assert len(full) == 1 and full[0]["records_lost"] == 1
    assert spool_path.stat().st_size <= 4096
    await down.close()

    # the next process on the same spool, with Redis there: replays it first, then the file goes
    up = writer(REDIS_URL, prefix, Spool(spool_path, 4096), flush_s=60.0)
    up.start()  # finds the spool (its own flush loop waits a minute: this test flushes)
    assert up.stats["records_spool_found"] == 1
    up.tracker.out.append(record(999))
    await up.flush()
    ids = [f["record_id"] for _id, f in await client.xrange(f"{prefix}records")]
    assert len(ids) == kept + 1 and len(set(ids)) == kept + 1
    assert ids[-1] == f"{999:032x}"  # the spool first, in order
    assert not spool_path.exists() and up.stats["records_spool_replayed"] == kept
    await up.close()


async def test_a_call_completed_from_its_redis_hash_gets_its_end_event(
        redis_prefix: tuple[aioredis.Redis, str], tmp_path: Path) -> None:
    """A BYE for a call answered by another process (or before a restart) makes the record
    from the call's Redis hash, and the tenant's `end` event with it."""
    client, prefix = redis_prefix
    answered_here = writer(REDIS_URL, prefix, Spool(tmp_path / "a.jsonl", 1 << 20))
    answered_here.tracker.event_tenants = frozenset({"shop1"})
    fields = {"record_id": "ab" * 16, "call_id": "c-1", "tenant": "shop1", "x": "700100000000001",
              "caller": "13800000001", "callee": "13900000001", "direction": "a_to_b",
              "invite_at": "2026-12-02T00:00:00.000Z", "forwarded_at": "2026-12-02T00:00:00.010Z",
              "answer_at": "2026-12-02T00:00:01.000Z", "sip_status": "200",
              "instance": "test/0"}
    answered_here.tracker.out.append(("open", "k1", fields))
    await answered_here.flush()
    await answered_here.close()

    released_here = writer(REDIS_URL, prefix, Spool(tmp_path / "b.jsonl", 1 << 20))
    released_here.tracker.event_tenants = frozenset({"shop1"})
    release_at = 1_796_169_605.5  # 2026-12-02T00:00:05.500Z
    released_here.tracker.out.append(("release", "k1", {
        "release_at": release_at, "release_dir": "callee", "q850_cause": None}))
    await released_here.flush()
    await released_here.close()
    (rec,) = [f for _id, f in await client.xrange(f"{prefix}records")]
    assert (rec["record_id"], rec["release_dir"], rec["talk_s"]) == ("ab" * 16, "callee", "5")
    (end,) = [f for _id, f in await client.xrange(f"{prefix}events")]
    assert (end["event"], end["record_id"], end["at"]) == ("end", "ab" * 16,
                                                           rec["release_at"])
    assert not await client.exists(f"{prefix}call:k1")
