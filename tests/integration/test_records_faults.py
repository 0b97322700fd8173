"""Call records under faults: the proxy restarted with calls up, Redis stopped during 200 calls,
a tenant's HTTP endpoint failing then recovering.

Real processes: the proxy (`python -m proxy run`, two workers, on the memory and on the Redis
store), SIPp callers and callees, a redis-server this test owns (stopped and started again:
never the machine's), an HTTP receiver in a thread of the test.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import signal
import subprocess
import threading
import time
import typing
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis

from proxy.records.model import parse_iso
from tests.integration.procs import (
    REDIS_URL,
    ProxyProcess,
    delete_redis_prefix,
    free_port,
    server_counts,
    sipp_args,
    sipp_server,
    start_proxy,
    start_redis_server,
    write_config,
)
from tests.integration.test_call_flows import (
    A1,
    B1,
    X1,
    CallPlan,
    assert_all_succeeded,
    run_flow,
    write_plans,
)
from tests.integration.test_records import BINDINGS, records_overrides

pytestmark = pytest.mark.integration


def wait_records(client: redis.Redis, stream: str, n: int, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = [fields for _id, fields in client.xrange(stream)]
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


@pytest.fixture
def prefix() -> Iterator[str]:
    value = f"sip700test:recf:{uuid.uuid4().hex[:10]}:"
    yield value
    delete_redis_prefix(value)


# ---- the proxy restarted with calls up --------------------------------------------------------

def test_calls_up_across_a_restart_get_complete_records(
        start_sip700: Callable[..., ProxyProcess], tmp_path: Path, prefix: str) -> None:
    """Five calls answered by one proxy process are hung up through the next one (same port,
    same privacy.dialog_key): each gets one record with its answer time and the BYE's release,
    completed from the call's Redis hash."""
    overrides = {**records_overrides(prefix, tmp_path), "workers": 2}
    proxy = start_sip700(bindings=BINDINGS, overrides=overrides)
    plans = [CallPlan(A1, X1, B1, i) for i in range(1, 6)]
    caller_csv, callee_csv = write_plans(tmp_path, plans)
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    with sipp_server("uas_basic.xml", proxy.gateway_port, tmp_path, calls=5, csv=callee_csv,
                     extra=["-infindex", "callee.csv", "0", "-recv_timeout", "20000"]):
        port = free_port()
        args = sipp_args("uac_basic.xml", remote=f"127.0.0.1:{proxy.port}", local_port=port,
                         calls=5, rate=20, csv=caller_csv, workdir=tmp_path,
                         extra=["-d", "8000", "-recv_timeout", "30000"])
        # the hold outlasts the restart (the Redis store's bindings import included): the
        # BYEs reach a proxy that is up
        caller = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while len(list(client.scan_iter(f"{prefix}call:*"))) < 5:  # all five answered
            assert time.monotonic() < deadline, "the calls were not answered"
            time.sleep(0.05)
        first_pid = proxy.proc.pid
        assert proxy.stop() in (0, -15)
        assert not client.xrange(f"{prefix}records"), "a record before any call ended"
        restarted = start_sip700(port=proxy.port, gateway_port=proxy.gateway_port,
                                 bindings=BINDINGS, overrides=overrides)
        assert restarted.proc.pid != first_pid
        assert caller.poll() is None, "the calls ended before the restart"
        rc = caller.wait(timeout=40)
    assert server_counts("uac_basic.xml", port, tmp_path) == (5, 0), rc
    recs = wait_records(client, f"{prefix}records", 5, 15)
    time.sleep(0.5)
    recs = [f for _id, f in client.xrange(f"{prefix}records")]
    assert len(recs) == 5 and len({r["record_id"] for r in recs}) == 5, recs
    for rec in recs:
        assert (rec["release_dir"], rec["sip_status"], rec["binding_id"]) == (
            "caller", "200", "b1" * 16), rec
        assert parse_iso(rec["answer_at"]) < parse_iso(rec["release_at"])
        assert 7 <= int(rec["talk_s"]) <= 10, rec
    assert not list(client.scan_iter(f"{prefix}call:*")), "live-call hashes left behind"
    client.close()


# ---- Redis stopped during 200 calls -------------------------------------------------------------

@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[dict]:
    """A redis-server this test owns, with an append-only file in tmp_path so what it took
    before it was stopped is still there when it starts again."""
    assert shutil.which("redis-server") is not None
    port = free_port()
    state: dict = {"port": port, "proc": None, "url": f"redis://127.0.0.1:{port}/0"}
    data = tmp_path / "redis-data"
    data.mkdir()

    def start() -> None:
        state["proc"] = start_redis_server(port, data, "--appendonly", "yes",
                                           "--appendfsync", "always")

    def stop() -> None:
        proc = state["proc"]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    state["start"], state["stop"] = start, stop
    start()
    yield state
    if state["proc"].poll() is None:
        stop()


def test_redis_stopped_during_200_calls_loses_and_duplicates_no_record(
        start_sip700: Callable[..., ProxyProcess], tmp_path: Path, own_redis: dict,
        prefix: str) -> None:
    overrides = records_overrides(prefix, tmp_path, redis_url=own_redis["url"])
    overrides["workers"] = 2
    # 50 calls/s on a busy 2-core test machine can lag the loop: none of the 200 is to be shed
    overrides["overload"] = {"enabled": False}
    proxy = start_sip700(bindings=BINDINGS, overrides=overrides)
    plans = [CallPlan(A1, X1, B1, i) for i in range(1, 201)]
    stopper = threading.Timer(1.0, own_redis["stop"])
    stopper.start()
    restarter = threading.Timer(4.0, own_redis["start"])
    restarter.start()
    try:
        outcome = run_flow(proxy, tmp_path, caller="uac_basic.xml", callee="uas_basic.xml",
                           plans=plans, rate=50, caller_extra=["-d", "200"],
                           trace_messages=False, timeout=120)
    finally:
        stopper.join()
        restarter.join()
    assert_all_succeeded(outcome, 200)
    client = redis.Redis.from_url(own_redis["url"], decode_responses=True)
    recs = wait_records(client, f"{prefix}records", 200, 20)
    time.sleep(1.0)  # anything more would be a duplicate
    recs = [f for _id, f in client.xrange(f"{prefix}records")]
    ids = [r["record_id"] for r in recs]
    assert len(set(ids)) == 200, f"{len(set(ids))} distinct records"
    assert len(ids) == 200, f"{len(ids) - len(set(ids))} duplicates"
    assert all(r["release_dir"] == "caller" and r["sip_status"] == "200" for r in recs)
    stats = proxy.stop_and_read_stats()
    assert stats.get("records_spooled", 0) > 0, stats  # the outage did happen mid-traffic
    assert stats.get("records_spool_replayed", 0) >= stats["records_spooled"], stats
    assert not list((tmp_path / "spool").glob("*.jsonl")), "spool left behind"
    print(f"records spooled during the outage: {stats['records_spooled']}")
    client.close()


def test_binding_store_down_gives_store_unavailable_records(
        tmp_path: Path, own_redis: dict, prefix: str) -> None:
    """The Redis store (a redis-server of this test) stopped: a call on a binding no worker has
    cached is refused 503 by the proxy, and its record, written to the machine's Redis (records
    live apart from the store), says `store_unavailable`. Redis store only: the memory store
    cannot be unavailable."""
    from tests.integration.test_records import expect_reject

    port, gateway_port = free_port(), free_port()
    overrides = {**records_overrides(prefix, tmp_path), "workers": 1,
                 "store": {"redis_url": own_redis["url"], "timeout_ms": 200}}
    path, config = write_config(tmp_path, port=port, gateway_port=gateway_port,
                                bindings=BINDINGS, overrides=overrides, redis_prefix=prefix)
    proxy = start_proxy(path, port, gateway_port, tmp_path / "proxy.log", config)
    try:
        own_redis["stop"]()
        expect_reject(proxy, tmp_path, X1, A1, "503 Binding Store Unavailable")
        client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
        (rec,) = wait_records(client, f"{prefix}records", 1, 10)
        client.close()
    finally:
        rc = proxy.stop()
    proxy.assert_clean_exit(rc)
    assert (rec["refusal"], rec["sip_status"], rec["direction"], rec["release_dir"],
            rec["caller"], rec["x"], rec["q850_cause"]) == (
        "store_unavailable", "503", "refused", "proxy", A1, X1, "41"), rec
    assert "callee" not in rec and "forwarded_at" not in rec and "binding_id" not in rec


# ---- an HTTP endpoint that fails, then recovers -------------------------------------------------

SECRET = "test-secret-0123456789"


class Receiver(BaseHTTPRequestHandler):
    """Fails every push while `failing` is set; keeps what it accepted, checking the HMAC."""

    failing = True
    received: typing.ClassVar[list[dict]] = []
    refused = 0
    bad_signatures = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        cls = type(self)
        stamp, mac = (part.split("=", 1)[1] for part in
                      self.headers["X-Sip700-Signature"].split(","))
        want = hmac.new(SECRET.encode(), f"{stamp}.".encode() + body, hashlib.sha256)
        with cls.lock:
            if not hmac.compare_digest(mac, want.hexdigest()):
                cls.bad_signatures += 1
            if cls.failing:
                cls.refused += 1
                self.send_response(503)
                self.end_headers()
                return
            cls.received.extend(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_http_push_that_fails_then_recovers_gets_every_record(
        start_sip700: Callable[..., ProxyProcess], tmp_path: Path, prefix: str) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/records"
    overrides = records_overrides(prefix, tmp_path, push={
        "backoff_ms": 100, "max_backoff_s": 0.5, "max_attempts": 100, "batch_size": 7})
    overrides["tenants"] = [{"id": "shop1", "records_url": url, "records_secret": SECRET}]
    proxy = start_sip700(bindings=BINDINGS, overrides=overrides)
    try:
        plans = [CallPlan(A1, X1, B1, i) for i in range(1, 21)]
        outcome = run_flow(proxy, tmp_path, caller="uac_basic.xml", callee="uas_basic.xml",
                           plans=plans, rate=20, caller_extra=["-d", "100"],
                           trace_messages=False)
        assert_all_succeeded(outcome, 20)
        time.sleep(1.5)
        assert Receiver.refused > 0 and not Receiver.received
        Receiver.failing = False  # the endpoint recovers
        deadline = time.monotonic() + 20
        while len({r["record_id"] for r in Receiver.received}) < 20:
            assert time.monotonic() < deadline, len(Receiver.received)
            time.sleep(0.1)
        client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
        stored = {f["record_id"] for _id, f in client.xrange(f"{prefix}records")}
        client.close()
        pushed = {r["record_id"]: r for r in Receiver.received}  # de-duplicated by record_id
        assert set(pushed) == stored and len(stored) == 20
        rec = next(iter(pushed.values()))
        assert rec["caller"] == A1 and rec["callee"] == B1 and rec["tenant"] == "shop1"
        assert isinstance(rec["sip_status"], int) and isinstance(rec["talk_s"], int)
        assert Receiver.bad_signatures == 0
        print(f"push: {Receiver.refused} refused, {len(Receiver.received)} received, "
              f"{len(pushed)} distinct")
    finally:
        server.shutdown()
        Receiver.failing, Receiver.received, Receiver.refused = True, [], 0
