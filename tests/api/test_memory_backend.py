"""The API on the memory store, in-process (aiohttp's test server): allocation, replays,
tenant isolation, and that the store routes what the API made (one-way, DELETE)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from proxy.api.app import build_app
from proxy.api.journal import Journal, JournalFollower
from proxy.api.keys import hash_key
from proxy.api.memory_backend import MemoryBackend
from proxy.api.pools import Pools
from proxy.bindings.memory import MemoryStore
from proxy.bindings.model import Outcome
from proxy.config import load_config

K1, K2 = "s7k_one", "s7k_two"


def config(tmp_path: Path, cap: int = 2):
    (tmp_path / "b.yaml").write_text("bindings: []\n")
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump({
        "carrier": {"gateways": ["sip:127.0.0.1:5090"]},
        "store": {"backend": "memory", "bindings_file": "b.yaml"},
        "api": {"listen": "127.0.0.1:8700", "require_order_id": False},
        "tenants": [
            {"id": "t1", "api_keys": [hash_key(K1)], "max_pairs_per_x": cap,
             "pools": [{"range": "700100000000001-700100000000003", "area": "010"}]},
            {"id": "t2", "api_keys": [hash_key(K2)],
             "pools": [{"numbers": ["700200000000001"]}]}]}))
    return load_config(path)


@pytest.fixture
async def client(tmp_path: Path):
    cfg = config(tmp_path)
    store = MemoryStore()
    backend = MemoryBackend(cfg, Pools(cfg), store, audit=None,
                            journal=Journal(tmp_path / "journal"))
    async with TestClient(TestServer(build_app(cfg, backend, None))) as c:
        c.store = store
        c.journal_path = tmp_path / "journal"
        yield c


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


async def test_allocation_fills_the_pool_exactly_then_409(client) -> None:
    """3 numbers × max_pairs_per_x 2 = 6 pairs for distinct parties; a party can take each X
    once, so a fourth binding of the same A is refused even with room left."""
    made = []
    for i in range(6):
        r = await client.post("/v1/bindings", headers=auth(K1), json={
            "a": f"1380000000{i}", "b": f"1390000000{i}", "ttl_s": 600})
        assert r.status == 201, await r.text()
        made.append(await r.json())
    assert sorted(b["x"] for b in made).count("700100000000001") == 2
    r = await client.post("/v1/bindings", headers=auth(K1), json={
        "a": "13700000000", "b": "13600000000", "ttl_s": 600})
    assert r.status == 409 and (await r.json())["error"] == "no_free_x"
    r = await client.delete(f"/v1/bindings/{made[0]['id']}", headers=auth(K1))
    assert r.status == 204
    r = await client.post("/v1/bindings", headers=auth(K1), json={
        "a": "13700000000", "b": "13600000000", "ttl_s": 600})
    assert r.status == 201 and (await r.json())["x"] == made[0]["x"]


async def test_store_routes_what_the_api_made_and_followers_agree(client) -> None:
    r = await client.post("/v1/bindings", headers=auth(K1), json={
        "a": "13800000001", "b": "13900000001", "ttl_s": 600, "direction": "a_to_b",
        "max_call_s": 120, "request_id": "r-1"})
    binding = await r.json()
    again = await client.post("/v1/bindings", headers=auth(K1), json={
        "a": "13800000001", "b": "13900000001", "ttl_s": 600, "direction": "a_to_b",
        "max_call_s": 120, "request_id": "r-1"})
    assert (r.status, again.status) == (201, 200) and (await again.json())["id"] == binding["id"]
    now = time.time()
    answer = client.store.resolve_cached(binding["x"], "13800000001", now)
    assert (answer.outcome, answer.callee, answer.binding_id, answer.max_call_s) == (
        Outcome.ROUTE, "13900000001", binding["id"], 120)
    assert client.store.resolve_cached(binding["x"], "13900000001", now).outcome is (
        Outcome.DIRECTION_RESTRICTED)
    other = MemoryStore()  # another worker, following the journal
    follower = JournalFollower(Journal(client.journal_path), other)
    follower.catch_up(now)
    assert other.resolve_cached(binding["x"], "13800000001", now).callee == "13900000001"
    r = await client.get(f"/v1/bindings/{binding['id']}", headers=auth(K2))
    assert r.status == 404
    r = await client.patch(f"/v1/bindings/{binding['id']}", headers=auth(K1),
                           json={"direction": "both"})
    assert r.status == 200
    follower.catch_up(time.time())
    assert other.resolve_cached(binding["x"], "13900000001", time.time()).outcome is (
        Outcome.ROUTE)
    r = await client.delete(f"/v1/bindings/{binding['id']}", headers=auth(K1))
    assert r.status == 204
    follower.catch_up(time.time())
    for store in (client.store, other):
        assert store.resolve_cached(binding["x"], "13800000001", time.time()).outcome is (
            Outcome.NO_BINDING)


async def test_a_bug_answers_500_as_json_and_the_next_request_works(client, monkeypatch) -> None:
    from proxy.api.app import APP_STATE

    backend = client.server.app[APP_STATE].backend
    original = backend.find

    async def broken(*args, **kwargs):
        raise RuntimeError("13800000001")  # a number in the message must not reach the log

    monkeypatch.setattr(backend, "find", broken)
    r = await client.get("/v1/bindings", params={"number": "13800000001"}, headers=auth(K1))
    assert (r.status, (await r.json())["error"]) == (500, "internal_error")
    monkeypatch.setattr(backend, "find", original)
    r = await client.get("/v1/bindings", params={"number": "13800000001"}, headers=auth(K1))
    assert r.status == 200


async def test_a_binding_may_carry_its_own_time_window(client) -> None:
    r = await client.post("/v1/bindings", headers=auth(K1), json={
        "a": "13800000002", "b": "13900000002", "ttl_s": 600,
        "time_window": "08:00-22:00 Asia/Shanghai"})
    assert r.status == 201, await r.text()
    binding = await r.json()
    assert binding["time_window"] == "08:00-22:00 Asia/Shanghai"
    answer = client.store.resolve_cached(binding["x"], "13800000002", time.time())
    assert answer.time_window == "08:00-22:00 Asia/Shanghai"  # what the core checks
    for bad in ("8-22", "08:00-22:00 Nowhere/Land", "08:00-08:00"):
        r = await client.post("/v1/bindings", headers=auth(K1), json={
            "a": "13800000003", "b": "13900000003", "ttl_s": 600, "time_window": bad})
        assert r.status == 422, bad  # the API's answer to a well-formed body with a bad field
        assert "time_window" in await r.text()
