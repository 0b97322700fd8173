"""The lean lookup connection against the machine's real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid

import redis

from proxy.bindings.model import Outcome, make_binding
from proxy.bindings.redis_lookup import LeanConnection, lean_target
from proxy.bindings.redis_store import RedisStore
from tests.integration.procs import REDIS_URL, delete_redis_prefix


class _StoreCfg:
    def __init__(self, prefix: str) -> None:
        self.redis_url = REDIS_URL
        self.key_prefix = prefix
        self.sentinel = None
        self.cluster = None
        self.timeout_ms = 500


def test_target_only_for_standalone_plain_redis() -> None:
    assert lean_target("redis://:pw@10.0.0.1:6380/3", None, None) == {
        "host": "10.0.0.1", "port": 6380, "db": 3, "username": None, "password": "pw"}
    assert lean_target("unix:///run/redis.sock?db=2", None, None)["path"] == "/run/redis.sock"
    assert lean_target("rediss://h:6379/0", None, None) is None
    assert lean_target("redis://h:6379/0", object(), None) is None


async def test_pipelined_replies_reach_their_callers_in_order() -> None:
    conn = LeanConnection(lean_target(REDIS_URL, None, None))
    key = f"sip700test:{uuid.uuid4().hex}"
    try:
        replies = await asyncio.gather(*(conn.call("ECHO", f"{key}-{i}") for i in range(200)))
        assert replies == [f"{key}-{i}".encode() for i in range(200)]
    finally:
        conn.close()


async def test_store_resolves_through_it_and_survives_a_script_flush() -> None:
    prefix = f"sip700test:{uuid.uuid4().hex[:12]}:"
    store = RedisStore.from_config(_StoreCfg(prefix))
    try:
        assert store.lean is not None
        await store.start(wait_s=2)
        await store.bind(make_binding("axb", "700100000000001", "13800000001", "13900000001",
                                      60, time.time()))
        answer = await store._fetch("700100000000001", "13800000001")
        assert (answer.outcome, answer.callee) == (Outcome.ROUTE, "13900000001")
        redis.Redis.from_url(REDIS_URL).script_flush()  # as a restarted Redis would be
        again = await store._fetch("700100000000001", "13900000001")
        assert (again.outcome, again.callee) == (Outcome.ROUTE, "13800000001")
        assert (await store._fetch("700100000000001", "13700000000")).outcome is Outcome.NOT_PARTY
    finally:
        await store.close()
        delete_redis_prefix(prefix)
