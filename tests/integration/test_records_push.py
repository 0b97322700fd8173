"""The HTTP pusher of records and events (proxy/records/push.py) on its own: the machine's Redis
(streams under a key prefix of the test's own, deleted afterwards) and real HTTP endpoints in the
test's event loop (aiohttp). No proxy: the streams are filled the way the writer fills them.

What the SIPp tests cannot reach in reasonable time: a tenant whose endpoint never recovers
(dead-letter stream after max_attempts, acknowledged, the other tenant unaffected) and the
per-tenant choice of events.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from proxy.records.push import RecordPusher, Target, signature
from tests.integration.procs import REDIS_URL, redis_prefix_client

pytestmark = pytest.mark.integration
SECRET = "push-secret-0123456789"


@pytest.fixture
async def streams() -> AsyncIterator[tuple[aioredis.Redis, str]]:
    async with redis_prefix_client("push") as pair:
        yield pair


async def endpoint(status: int) -> tuple[web.AppRunner, str, list[tuple[dict, bytes]]]:
    """An HTTP endpoint answering `status` to every POST; keeps (headers, body) of each."""
    got: list[tuple[dict, bytes]] = []

    async def handle(request: web.Request) -> web.Response:
        got.append((dict(request.headers), await request.read()))
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/push", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/push", got


def pusher(client: aioredis.Redis, prefix: str, targets: list[Target],
           max_attempts: int = 3) -> RecordPusher:
    return RecordPusher(
        aioredis.Redis.from_url(REDIS_URL, decode_responses=True), targets,
        records_stream=f"{prefix}records", events_stream=f"{prefix}events",
        dead_letter_stream=f"{prefix}dead", group="push", consumer="test", batch_size=10,
        batch_wait_s=0.05, timeout_s=2.0, max_attempts=max_attempts, backoff_s=0.02,
        max_backoff_s=0.05)


async def wait_for(condition: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0
                   ) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        met = condition()
        if not isinstance(met, bool):
            met = await met
        if met:
            return
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_endpoint_that_never_recovers_dead_letters_and_spares_the_other_tenant(
        streams: tuple[aioredis.Redis, str]) -> None:
    client, prefix = streams
    failing, failing_url, failing_got = await endpoint(500)
    working, working_url, working_got = await endpoint(200)
    ids = {}
    for n, tenant in enumerate(("shop1", "shop2", "shop1", "nobody")):
        ids[n] = await client.xadd(f"{prefix}records", {
            "record_id": f"r{n}", "tenant": tenant, "caller": "13800000001",
            "sip_status": "200", "talk_s": "3"})
    p = pusher(client, prefix, [Target("shop1", "records", failing_url, SECRET),
                                Target("shop2", "records", working_url, SECRET)])
    p.start()
    try:
        async def dead_lettered() -> bool:
            return await client.xlen(f"{prefix}dead") >= 2
        await wait_for(dead_lettered)
        await wait_for(lambda: bool(working_got))
        # everything read is acknowledged: shop1's as dead letters, nobody's as undeliverable
        async def all_acked() -> bool:
            return (await client.xpending(f"{prefix}records", "push"))["pending"] == 0
        await wait_for(all_acked)
    finally:
        await p.close()
        await failing.cleanup()
        await working.cleanup()
    dead = [f for _id, f in await client.xrange(f"{prefix}dead")]
    assert sorted(d["record_id"] for d in dead) == ["r0", "r2"]
    assert {(d["dl_kind"], d["dl_url"], d["dl_error"], d["dl_attempts"]) for d in dead} == {
        ("records", failing_url, "HTTP 500", "3")}
    assert sorted(d["dl_entry"] for d in dead) == sorted((ids[0], ids[2]))
    assert len(failing_got) == 3  # one batch, tried max_attempts times
    (headers, body), = working_got
    assert [r["record_id"] for r in json.loads(body)] == ["r1"]
    assert json.loads(body)[0]["talk_s"] == 3  # numbers back as numbers
    stamp = int(headers["X-Sip700-Signature"].split(",")[0].removeprefix("t="))
    assert headers["X-Sip700-Signature"] == signature(SECRET, stamp, body)
    assert p.stats["push_dead_lettered"] == 2 and p.stats["push_records_delivered"] == 1


async def test_each_tenant_gets_the_events_it_chose(streams: tuple[aioredis.Redis, str]) -> None:
    client, prefix = streams
    runner, url, got = await endpoint(200)
    for event in ("start", "ring", "answer", "end"):
        await client.xadd(f"{prefix}events", {"record_id": "r1", "tenant": "shop1",
                                              "event": event, "at": "2026-12-02T00:00:00.000Z"})
    p = pusher(client, prefix, [Target("shop1", "events", url, SECRET,
                                       frozenset({"answer", "end"}))])
    p.start()
    try:
        async def all_acked() -> bool:
            info = await client.xinfo_groups(f"{prefix}events")
            return bool(info) and info[0]["pending"] == 0 and info[0]["entries-read"] == 4
        await wait_for(all_acked)
        await wait_for(lambda: bool(got))
    finally:
        await p.close()
        await runner.cleanup()
    pushed = [e for _headers, body in got for e in json.loads(body)]
    assert [e["event"] for e in pushed] == ["answer", "end"]
    assert all(h["X-Sip700-Kind"] == "events" for h, _ in got)
