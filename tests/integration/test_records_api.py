"""Call records and call events of bindings made through the binding API, and the records a
support console shows: `sip700 run` with the API in worker 0 of two, on the memory store
(worker 1 follows the API's journal) and on the Redis store.

Real processes: the proxy (`python -m proxy run`, workers: 2, api.listen and records on),
SIPp callers and callees on loopback, the machine's Redis (records, events, audit and the Redis
store under a key prefix of the test's own, deleted afterwards), an HTTP receiver for the
tenant's call events in a thread of the test.
"""

from __future__ import annotations

import hashlib
import hmac
import http.cookiejar
import json
import threading
import time
import typing
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis

from proxy.api.keys import hash_key
from proxy.numbers import mask_number
from proxy.records.model import parse_iso
from tests.integration.apiprocs import KEYS, OPERATOR_KEY, free_tcp_port, tenants, wait_http
from tests.integration.procs import (
    REDIS_URL,
    ProxyProcess,
    delete_redis_prefix,
    free_port,
    start_proxy,
    write_config,
)
from tests.integration.test_call_flows import CallPlan, assert_all_succeeded, run_flow
from tests.integration.test_records import records_overrides

pytestmark = pytest.mark.integration

X = "700100000000001"  # in shop1's pool (apiprocs.tenants)
A, B = "13800000001", "13700000009"
STRANGER = "13600000001"
SECRET = "events-secret-0123456789"


class EventReceiver(BaseHTTPRequestHandler):
    """shop1's events_url: keeps every pushed event and what was wrong with its request."""

    received: typing.ClassVar[list[dict]] = []
    problems: typing.ClassVar[list[str]] = []
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        stamp, mac = (part.split("=", 1)[1] for part in
                      self.headers["X-Sip700-Signature"].split(","))
        want = hmac.new(SECRET.encode(), f"{stamp}.".encode() + body, hashlib.sha256)
        with self.lock:
            if not hmac.compare_digest(mac, want.hexdigest()):
                self.problems.append("bad signature")
            if self.headers["X-Sip700-Kind"] != "events":
                self.problems.append(f"kind {self.headers['X-Sip700-Kind']}")
            self.received.extend(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(params=["memory", "redis"])
def proxy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProxyProcess]:
    """The proxy with the API (shop1 pushes its start/answer/end events; operators may reveal
    a call record's numbers in the console)."""
    prefix = f"sip700test:recapi:{uuid.uuid4().hex[:10]}:"
    server = ThreadingHTTPServer(("127.0.0.1", 0), EventReceiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    tenant_list = tenants()
    tenant_list[0].update(events_url=f"http://127.0.0.1:{server.server_address[1]}/events",
                          records_secret=SECRET, events=["start", "answer", "end"])
    port, gateway_port, api_port = free_port(), free_port(), free_tcp_port()
    overrides = {"workers": 2,
                 "api": {"listen": f"127.0.0.1:{api_port}",
                         "console_reveal_records": "operators"},
                 "tenants": tenant_list, "operator_keys": [hash_key(OPERATOR_KEY)],
                 "store": {"key_prefix": prefix},
                 # on a busy test machine the API's work can lag the loop of worker 0: no call
                 # of these tests is to be shed
                 "overload": {"enabled": False},
                 **records_overrides(f"{prefix}rec:", tmp_path,
                                     push={"batch_wait_ms": 50, "backoff_ms": 100})}
    path, config = write_config(tmp_path, port=port, gateway_port=gateway_port, bindings=[],
                                overrides=overrides,
                                redis_prefix=prefix if request.param == "redis" else None)
    process = start_proxy(path, port, gateway_port, tmp_path / "proxy.log", config)
    process.api_url = f"http://127.0.0.1:{api_port}"  # type: ignore[attr-defined]
    process.prefix = prefix  # type: ignore[attr-defined]
    try:
        wait_http(f"{process.api_url}/healthz")  # type: ignore[attr-defined]
        yield process
    finally:
        rc = process.stop()
        server.shutdown()
        EventReceiver.received, EventReceiver.problems = [], []
        delete_redis_prefix(prefix)
    process.assert_clean_exit(rc)


def create_binding(proxy: ProxyProcess) -> dict:
    request = urllib.request.Request(
        proxy.api_url + "/v1/bindings", method="POST",  # type: ignore[attr-defined]
        data=json.dumps({"a": A, "b": B, "x": X, "ttl_s": 3600, "order_id": "order-9",
                         "out_id": "out-9", "user_data": "ud 9"}).encode(),
        headers={"Authorization": f"Bearer {KEYS['shop1']}",
                 "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201
        binding = json.load(response)
    time.sleep(0.3)  # the memory store's other worker follows the journal every 100 ms
    return binding


def stream(proxy: ProxyProcess, name: str, n: int, timeout: float = 10.0
           ) -> list[tuple[str, dict]]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            rows = client.xrange(f"{proxy.prefix}rec:{name}")  # type: ignore[attr-defined]
            if len(rows) >= n or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)
    finally:
        client.close()


def test_records_and_events_of_an_api_binding(proxy: ProxyProcess, tmp_path: Path) -> None:
    """Twelve answered calls both ways on one API binding, spread over both workers: every
    record carries the binding's id, tenant, out_id, order_id and user_data; each call gives
    start, ring, answer, end in the events stream, and shop1's endpoint gets the three kinds it
    asked for, signed."""
    binding = create_binding(proxy)
    plans = [CallPlan(A, X, B, i) for i in range(1, 9)] + [
        CallPlan(B, X, A, i) for i in range(9, 13)]
    outcome = run_flow(proxy, tmp_path, caller="uac_basic.xml", callee="uas_basic.xml",
                       plans=plans, rate=10, caller_extra=["-d", "100"], trace_messages=False)
    assert_all_succeeded(outcome, 12)
    records = [f for _id, f in stream(proxy, "records", 12)]
    assert len(records) == 12, records
    for rec in records:
        assert (rec["binding_id"], rec["tenant"], rec["out_id"], rec["order_id"],
                rec["user_data"]) == (binding["id"], "shop1", "out-9", "order-9", "ud 9"), rec
        assert rec["x"] == X and rec["sip_status"] == "200" and "refusal" not in rec
        assert (rec["caller"], rec["callee"]) == ((A, B) if rec["direction"] == "a_to_b"
                                                  else (B, A)), rec
    assert sorted(r["direction"] for r in records) == ["a_to_b"] * 8 + ["b_to_a"] * 4
    # both workers carried calls: worker 1 learnt the binding from the journal or from Redis
    assert {r["instance"].rsplit("/", 1)[1] for r in records} == {"0", "1"}, records

    events = [f for _id, f in stream(proxy, "events", 48)]
    by_call: dict[str, list[dict]] = {}
    for event in events:
        by_call.setdefault(event["record_id"], []).append(event)
    assert set(by_call) == {r["record_id"] for r in records}
    for record_id, evs in by_call.items():
        assert [e["event"] for e in evs] == ["start", "ring", "answer", "end"], evs
        stamps = [parse_iso(e["at"]) for e in evs]
        assert stamps == sorted(stamps), evs
        assert all((e["binding_id"], e["tenant"], e["out_id"], e["order_id"]) == (
            binding["id"], "shop1", "out-9", "order-9") for e in evs)
        rec = next(r for r in records if r["record_id"] == record_id)
        assert evs[-1]["at"] == rec["release_at"] and evs[2]["at"] == rec["answer_at"]

    deadline = time.monotonic() + 15
    while len({(e["record_id"], e["event"]) for e in EventReceiver.received}) < 36:
        assert time.monotonic() < deadline, len(EventReceiver.received)
        time.sleep(0.1)
    pushed = {(e["record_id"], e["event"]) for e in EventReceiver.received}
    assert pushed == {(rid, kind) for rid in by_call for kind in ("start", "answer", "end")}
    assert not EventReceiver.problems, EventReceiver.problems


class Console:
    """A browser's session with the support console: a cookie jar and form posts."""

    def __init__(self, base: str, key: str) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        status, page = self.post("/console/login", key=key)
        assert status == 200 and "Log out" in page, page

    def _open(self, request: urllib.request.Request) -> tuple[int, str]:
        try:
            with self.opener.open(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def get(self, path: str, **query: str) -> tuple[int, str]:
        url = f"{self.base}{path}?{urllib.parse.urlencode(query)}"
        return self._open(urllib.request.Request(url))

    def post(self, path: str, **form: str) -> tuple[int, str]:
        return self._open(urllib.request.Request(
            self.base + path, data=urllib.parse.urlencode(form).encode(), method="POST"))


def audit_reveals(proxy: ProxyProcess) -> list[dict]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        return [f for _id, f in client.xrange(f"{proxy.prefix}audit")  # type: ignore[attr-defined]
                if f["action"] == "reveal_record"]
    finally:
        client.close()


def test_console_shows_a_numbers_records_masked_and_reveals_only_with_permission(
        proxy: ProxyProcess, tmp_path: Path) -> None:
    binding = create_binding(proxy)
    outcome = run_flow(proxy, tmp_path, caller="uac_basic.xml", callee="uas_basic.xml",
                       plans=[CallPlan(A, X, B, 1)], caller_extra=["-d", "100"])
    assert_all_succeeded(outcome, 1)
    outcome = run_flow(proxy, tmp_path, caller="uac_not_party.xml", callee="uas_basic.xml",
                       plans=[CallPlan(STRANGER, X, B, 2)], callee_calls=0)
    assert outcome.caller.returncode == 0, str(outcome)
    rows = stream(proxy, "records", 2)
    assert len(rows) == 2, rows
    answered_entry = next(eid for eid, f in rows if f.get("refusal") is None)
    base = proxy.api_url  # type: ignore[attr-defined]

    # shop1 sees its own record (not the stranger's refusal, which has no tenant), masked,
    # and may not reveal it
    shop1 = Console(base, KEYS["shop1"])
    status, page = shop1.get("/console/search", kind="x", q=X)
    assert status == 200 and "<p id='records-count'>1 record(s)</p>" in page, page
    assert mask_number(A) in page and mask_number(B) in page
    assert A not in page and B not in page and STRANGER not in page
    assert "reveal-record" not in page
    status, page = shop1.post("/console/records/reveal", entry=answered_entry)
    assert status == 403 and A not in page and B not in page
    status, page = shop1.get("/console/search", kind="number", q=B)
    found = page[page.index("<p id='count'>"):]  # after the search box, which echoes it
    assert "<p id='records-count'>1 record(s)</p>" in found and B not in found

    # another tenant sees none of them
    status, page = Console(base, KEYS["shop2"]).get("/console/search", kind="number", q=A)
    assert status == 200 and "<p id='records-count'>0 record(s)</p>" in page
    assert not audit_reveals(proxy)

    # the operator sees both, masked, and may reveal one: audited before the numbers show
    operator = Console(base, OPERATOR_KEY)
    status, page = operator.get("/console/search", kind="x", q=X)
    assert "<p id='records-count'>2 record(s)</p>" in page and page.count("reveal-record") == 2
    assert A not in page and B not in page and STRANGER not in page
    assert mask_number(STRANGER) in page
    status, page = operator.post("/console/records/reveal", entry=answered_entry)
    assert status == 200 and "id='revealed'" in page, page
    assert f"<td class='caller'>{A}</td>" in page and f"<td class='callee'>{B}</td>" in page
    (reveal,) = audit_reveals(proxy)
    assert reveal["id"] == binding["id"] and reveal["tenant"] == "shop1"
    assert reveal["record_id"] == rows[[eid for eid, _ in rows].index(answered_entry)][1][
        "record_id"]
    assert reveal["key"] and OPERATOR_KEY not in json.dumps(reveal)
    # the reveal shows in the binding's history
    status, page = operator.get(f"/console/bindings/{binding['id']}")
    assert "reveal_record" in page
    # an entry that is not there, or junk, reveals nothing
    assert operator.post("/console/records/reveal", entry="1-0")[0] == 404
    assert operator.post("/console/records/reveal", entry="x'><b>")[0] == 404
    assert len(audit_reveals(proxy)) == 1
