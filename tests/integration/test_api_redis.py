"""The binding API against real Redis, over real HTTP.

Real processes: the shared redis-server (each test under its own key prefix, deleted after),
two `python -m proxy api` instances sharing it, the `sip700 audit` CLI; clients are aiohttp
sessions with many connections.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import redis

from tests.integration.apiprocs import (
    KEYS,
    OPERATOR_KEY,
    ApiProcess,
    api_config,
    bearer,
    free_tcp_port,
    start_api,
)
from tests.integration.procs import REDIS_URL, ROOT, delete_redis_prefix

pytestmark = pytest.mark.integration


@pytest.fixture
def prefix() -> Iterator[str]:
    value = f"sip700test:{uuid.uuid4().hex[:12]}:"
    yield value
    delete_redis_prefix(value)


@pytest.fixture
def apis(tmp_path: Path, prefix: str) -> Iterator[list[ApiProcess]]:
    """Two API instances on one Redis (the way they scale out)."""
    started = []
    for _ in range(2):
        port = free_tcp_port()
        path = api_config(tmp_path, prefix, port=port)
        started.append(start_api(path, port, tmp_path / f"api-{port}.log"))
    yield started
    for api in started:
        assert api.stop() in (0, -15)
        assert "Traceback" not in api.log_text(), api.log_text()[-3000:]


def body(**fields: object) -> dict:
    base = {"type": "axb", "ttl_s": 3600, "order_id": f"o-{uuid.uuid4().hex[:8]}"}
    base.update(fields)
    return base


async def post(session: aiohttp.ClientSession, url: str, tenant: str, data: object
               ) -> tuple[int, dict]:
    async with session.post(f"{url}/v1/bindings", json=data, headers=bearer(tenant)) as r:
        return r.status, await r.json()


def mobile(n: int) -> str:
    return f"138{n:08d}"


async def test_1000_concurrent_allocations_never_cross_and_409_exactly(
    apis: list[ApiProcess], prefix: str
) -> None:
    """Pool of 20, max_pairs_per_x 40; 40 'hot' numbers each in 25 requests (as A in some, as
    B in others) with a fresh partner each time. A number can sit on each X once, so each hot
    number gets exactly 20 bindings whatever the order: 800 created, 200 refused with 409,
    and every X ends with exactly 40 pairs."""
    requests = []
    partner = 0
    for hot in range(40):
        for k in range(25):
            partner += 1
            a, b = mobile(hot), f"139{partner:08d}"
            if k % 2:
                a, b = b, a
            requests.append(body(a=a, b=b, area="010", area_match="strict"))
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector) as session:
        results = await asyncio.gather(*(
            post(session, apis[i % 2].url, "shop1", data) for i, data in enumerate(requests)))
    statuses = Counter(status for status, _ in results)
    assert statuses == {201: 800, 409: 200}, statuses
    assert all(r["error"] == "no_free_x" for s, r in results if s == 409)
    created = [r for s, r in results if s == 201]
    pairs = Counter((r["x"], n) for r in created for n in (r["a"], r["b"]))
    assert max(pairs.values()) == 1, [p for p, c in pairs.items() if c > 1][:5]
    per_x = Counter(r["x"] for r in created)
    assert len(per_x) == 20 and set(per_x.values()) == {40}, per_x
    # what Redis holds agrees: 40 live pairs on each X, each hot number once per X
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        for x in per_x:
            fields = client.hgetall(f"{prefix}{{{x}}}")
            parties = [f for f in fields if not f.startswith("m:")]
            assert len(parties) == 80 and len(set(parties)) == 80
        failures = [e for _, e in client.xrange(f"{prefix}audit", count=100000)
                    if e["action"] == "allocation_failed"]
        assert len(failures) == 200
    finally:
        client.close()


async def test_idempotent_replays_get_the_same_binding(apis: list[ApiProcess]) -> None:
    data = body(a=mobile(1), b=mobile(2), request_id="req-42")
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(post(session, apis[i % 2].url, "shop1", data)
                                         for i in range(20)))
        statuses = Counter(status for status, _ in results)
        assert statuses == {201: 1, 200: 19}, statuses
        assert len({r["id"] for _, r in results}) == 1
        # the same request_id of another tenant is another request
        status, other = await post(session, apis[0].url, "shop2", data)
        assert status == 201 and other["id"] != results[0][1]["id"]


async def test_other_tenants_ids_answer_404_and_never_show(apis: list[ApiProcess]) -> None:
    url = apis[0].url
    async with aiohttp.ClientSession() as session:
        status, mine = await post(session, url, "shop1", body(a=mobile(3), b=mobile(4)))
        assert status == 201
        path = f"{url}/v1/bindings/{mine['id']}"
        for method, data in (("GET", None), ("PATCH", {"ttl_s": 600}), ("DELETE", None)):
            async with session.request(method, path, json=data, headers=bearer("shop2")) as r:
                assert r.status == 404, (method, await r.text())
                assert (await r.json())["error"] == "not_found"
        async with session.get(f"{url}/v1/bindings/{'0' * 32}", headers=bearer("shop1")) as r:
            assert r.status == 404  # the same answer as for a missing id
        async with session.get(f"{url}/v1/bindings", params={"number": mobile(3)},
                               headers=bearer("shop2")) as r:
            assert (await r.json())["bindings"] == []
        # x of another tenant's pool cannot be asked for
        status, err = await post(session, url, "shop2",
                                 body(a=mobile(5), b=mobile(6), x=mine["x"]))
        assert (status, err["field"]) == (422, "x")
        # the operator sees every tenant, and changes nothing
        async with session.get(path, headers=bearer("operator")) as r:
            assert r.status == 200 and (await r.json())["tenant"] == "shop1"
        async with session.delete(path, headers=bearer("operator")) as r:
            assert r.status == 403
        async with session.get(path, headers=bearer("shop1")) as r:
            assert r.status == 200


@pytest.mark.parametrize(("data", "status", "field"), [
    ({"a": "13800000001", "b": "13900000001", "ttl_s": 3600, "colour": 1}, 422, "colour"),
    ({"a": "12345", "b": "13900000001", "ttl_s": 3600}, 422, "a"),
    ({"a": "70010000000000", "b": "13900000001", "ttl_s": 3600}, 422, "a"),
    ({"a": "13800000001", "b": "13800000001", "ttl_s": 3600}, 422, "b"),
    ({"a": "13800000001", "b": "13900000001", "ttl_s": 59}, 422, "ttl_s"),
    ({"a": "13800000001", "b": "13900000001", "ttl_s": 2592001}, 422, "ttl_s"),
    ({"a": "13800000001", "b": "13900000001"}, 422, "ttl_s"),
    ({"a": "13800000001", "b": "13900000001", "ttl_s": "3600"}, 422, "ttl_s"),
    ({"a": "13800000001", "ttl_s": 3600}, 422, "b"),
    ({"a": "13800000001", "b": "13900000001", "ttl_s": 3600, "direction": "up"}, 422,
     "direction"),
    ({"a": "13800000001", "b": "13900000001", "ttl_s": 3600, "x": "700999000000001"}, 422,
     "x"),
])
async def test_validation_errors_name_the_field(apis: list[ApiProcess], data: dict,
                                                status: int, field: str) -> None:
    if field != "order_id":
        data = {"order_id": "o-1", **data}
    async with aiohttp.ClientSession() as session:
        got, answer = await post(session, apis[0].url, "shop1", data)
    assert (got, answer["field"]) == (status, field), answer
    assert set(answer) == {"error", "field", "message"}


async def test_request_errors(apis: list[ApiProcess]) -> None:
    url = f"{apis[0].url}/v1/bindings"
    async with aiohttp.ClientSession() as session:
        ok = body(a=mobile(7), b=mobile(8))
        async with session.post(url, json=ok) as r:
            assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        async with session.post(url, json=ok, headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        async with session.post(url, data=b"{not json", headers={
                **bearer("shop1"), "Content-Type": "application/json"}) as r:
            assert (r.status, (await r.json())["error"]) == (400, "invalid_json")
        async with session.post(url, data=b"a=1", headers=bearer("shop1")) as r:
            assert r.status == 415
        no_order = {k: v for k, v in ok.items() if k != "order_id"}
        status, answer = await post(session, apis[0].url, "shop1", no_order)
        assert (status, answer["field"]) == (422, "order_id")
        async with session.post(url, data=b"x" * 20000, headers={
                **bearer("shop1"), "Content-Type": "application/json"}) as r:
            assert r.status == 413


async def test_rate_limit_answers_429_with_retry_after(apis: list[ApiProcess]) -> None:
    async with aiohttp.ClientSession() as session:
        statuses = []
        for _ in range(12):
            async with session.get(f"{apis[0].url}/v1/bindings", params={"order_id": "x"},
                                   headers=bearer("slow")) as r:
                statuses.append(r.status)
                if r.status == 429:
                    assert int(r.headers["Retry-After"]) >= 1
                    assert (await r.json())["error"] == "rate_limited"
    assert statuses[:5] == [200] * 5 and 429 in statuses


async def test_area_strict_and_fallback(apis: list[ApiProcess]) -> None:
    """Area 021 of shop1 has 5 numbers: a sixth binding of the same A fails in strict mode and
    falls back to area 010 otherwise."""
    url = apis[0].url
    async with aiohttp.ClientSession() as session:
        xs = set()
        for i in range(5):
            status, r = await post(session, url, "shop1", body(
                a=mobile(9), b=f"139{i:08d}", area="021", area_match="strict"))
            assert status == 201 and r["x"].startswith("7001000009"), r
            xs.add(r["x"])
        assert len(xs) == 5
        status, r = await post(session, url, "shop1", body(
            a=mobile(9), b=mobile(99), area="021", area_match="strict"))
        assert (status, r["error"], r["field"]) == (409, "no_free_x", "area")
        assert "021" in r["message"]
        status, r = await post(session, url, "shop1", body(
            a=mobile(9), b=mobile(99), area="021", area_match="fallback"))
        assert status == 201 and r["x"].startswith("70010000000"), r


async def test_patch_and_delete_with_their_audit_trail(
    apis: list[ApiProcess], prefix: str, tmp_path: Path
) -> None:
    url = apis[0].url
    async with aiohttp.ClientSession() as session:
        status, r = await post(session, url, "shop1", body(a=mobile(10), b=mobile(11),
                                                           direction="a_to_b", out_id="o1"))
        assert status == 201
        path = f"{url}/v1/bindings/{r['id']}"
        async with session.patch(path, json={"b": "+86 139-0000-0011", "ttl_s": 120,
                                             "direction": "both", "out_id": "o2"},
                                 headers={**bearer("shop1"), "X-Request-Id": "fix-1"}) as resp:
            assert resp.status == 200
            changed = await resp.json()
        assert (changed["b"], changed["direction"], changed["out_id"]) == (
            "13900000011", "both", "o2")
        async with session.patch(path, json={}, headers=bearer("shop1")) as resp:
            assert resp.status == 422
        # B taken on X by another binding: PATCH refused, nothing changed
        status, other = await post(session, url, "shop1", body(a=mobile(12), b=mobile(13),
                                                               x=r["x"]))
        assert status == 201
        async with session.patch(path, json={"b": mobile(13)}, headers=bearer("shop1")) as resp:
            assert resp.status == 409
        async with session.get(f"{url}/v1/bindings", params={"x": r["x"]},
                               headers=bearer("shop1")) as resp:
            assert {b["id"] for b in (await resp.json())["bindings"]} == {r["id"], other["id"]}
        async with session.delete(path, headers=bearer("shop1")) as resp:
            assert resp.status == 204
        async with session.delete(path, headers=bearer("shop1")) as resp:
            assert resp.status == 404
        async with session.get(f"{url}/v1/bindings", params={"number": mobile(10)},
                               headers=bearer("shop1")) as resp:
            assert (await resp.json())["bindings"] == []
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "audit", "query", "--config",
         str(tmp_path / f"api-{apis[0].port}.yaml"), "--binding", r["id"]],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    entries = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["action"] for e in entries] == ["create", "update", "update_failed", "delete"]
    create, update, _, delete = entries
    assert create["before"] is None and create["after"]["id"] == r["id"]
    assert update["before"]["b"] == mobile(11) and update["after"]["b"] == "13900000011"
    assert update["rid"] == "fix-1" and update["src"] == "127.0.0.1"
    assert delete["after"] is None and delete["before"]["b"] == "13900000011"
    assert all(e["key"] == create["key"] and len(e["key"]) == 12 for e in entries)
    raw = redis.Redis.from_url(REDIS_URL).xrange(f"{prefix}audit")
    assert not any(KEYS["shop1"].encode() in str(fields).encode() for _, fields in raw)
    assert OPERATOR_KEY not in done.stdout
    tail = subprocess.run(
        [sys.executable, "-m", "proxy", "audit", "tail", "-n", "3", "--config",
         str(tmp_path / f"api-{apis[0].port}.yaml")],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    assert tail.returncode == 0 and len(tail.stdout.splitlines()) == 3


async def test_openapi_and_health(apis: list[ApiProcess]) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{apis[0].url}/v1/openapi.json") as r:
            doc = await r.json()
        assert doc["components"]["schemas"]["CreateBinding"]["additionalProperties"] is False
        assert set(doc["paths"]) >= {"/v1/bindings", "/v1/bindings/{id}"}
        for path in ("/healthz", "/readyz"):
            async with session.get(apis[1].url + path) as r:
                assert r.status == 200


def test_allocation_takes_back_numbers_whose_bindings_expired(prefix: str) -> None:
    """The create script at a later `now`: a number full at T is free again once its binding
    expired, and the 409 before that is exact (pool of one number, one pair per X)."""
    from proxy.api import redis_scripts

    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        sync = client.register_script(redis_scripts.SYNC_POOL)
        for step in ("start", "+", "=v1"):
            extra = ["700100000000001"] if step == "+" else []
            sync(args=[prefix, 0, "t", "010", step, *extra])
        create = client.register_script(redis_scripts.CREATE)
        t = 1_900_000_000_000

        def attempt(now: int, n: int, kind: str = "axb") -> list:
            return create(args=[
                prefix, now, "t", "", f"{n:032x}", kind, f"138{n:08d}",
                "" if kind == "axn" else f"139{n:08d}", now + 60_000, "", "010", 1,
                "b||{}", '{"x":"","n":' + str(n) + '}', "", f"{prefix}audit", "0-0", "", 10**9,
                "k", "s", f"{prefix}invalidate", "o", 10**9])

        assert attempt(t, 1)[0] == 1
        assert attempt(t + 59_000, 2) == [0, "no_free_x"]
        assert attempt(t + 59_000, 3, "axn") == [0, "no_free_x"]
        taken = attempt(t + 60_001, 4)
        assert taken[0] == 1 and json.loads(taken[1])["x"] == "700100000000001"
        assert attempt(t + 120_002, 5, "axn")[0] == 1  # empty again: an AXN takes it
        assert attempt(t + 120_003, 6) == [0, "no_free_x"]  # and nothing shares an AXN's X
    finally:
        client.close()


@pytest.mark.parametrize("raw", [
    b"POST /v1/bindings HTTP/1.1\r\nHost: x\r\nContent-Length: Re[HV\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 13800005678x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-" + b"a" * 9000 + b": 1\r\n\r\n",
], ids=["content-length", "content-length-number", "header-too-long"])
def test_a_malformed_http_request_gets_400_and_one_log_line_without_a_traceback(
        apis: list[ApiProcess], raw: bytes) -> None:
    import socket

    api = apis[0]
    with socket.create_connection(("127.0.0.1", api.port), timeout=5) as conn:
        conn.sendall(raw)
        answer = conn.recv(4096)
    assert answer.split(b"\r\n", 1)[0].split(b" ")[1] == b"400", answer[:80]
    with urllib.request.urlopen(f"{api.url}/healthz", timeout=5) as response:  # still up
        assert response.status == 200
    lines = [json.loads(line) for line in api.log_text().splitlines()
             if line.startswith("{") and '"api_bad_http"' in line]
    assert len(lines) == 1 and lines[0]["status"] == 400 and lines[0]["reason"]
    assert lines[0]["remote"] == "127.0.0.1"
    assert "13800005678" not in api.log_text()  # a number quoted by the reason is masked
