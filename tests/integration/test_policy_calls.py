"""The anti-fraud call policy with real processes: the proxy (`python -m proxy run`, two
workers, memory store with tenant bindings), SIPp callers and callees on loopback, the
machine's Redis (counters, leases, blocklists, records, audit, under a prefix of each test's
own), `sip700 block` and the binding API for the blocklists, and an aiohttp server on
loopback as a tenant's decision webhook."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import redis
from aiohttp import web

from proxy.api.keys import hash_key
from proxy.sip.message import parse_message
from tests.integration.apiprocs import call_api, free_tcp_port, wait_http
from tests.integration.procs import (
    REDIS_URL,
    ROOT,
    ProxyProcess,
    delete_redis_prefix,
    free_port,
    run_sipp,
    sipp_args,
    sipp_server,
    start_proxy,
    write_config,
)
from tests.integration.sipclient import invite
from tests.integration.test_call_flows import (
    COMMON_SIPP,
    CallPlan,
    assert_all_succeeded,
    assert_no_number_logged,
    run_flow,
    write_plans,
)

pytestmark = pytest.mark.integration

X1, A1, B1 = "700100000000001", "13800000001", "13900000001"
X2, A2, B2 = "700100000000002", "13800000002", "13900000002"
X3, B3 = "700100000000003", "13900000003"  # A1 again: a second callee for the bulk detector
X4, A4, B4 = "700100000000004", "13800000004", "13900000004"  # one way: a_to_b
X5, A5, B5 = "700100000000005", "13800000005", "13700000005"  # tenant shop2
OVERRIDE = "13900000077"  # the webhook's callee override
TENANT_KEY = "s7k_policy-test-shop1"
BINDINGS = [
    {"type": "axb", "x": X1, "a": A1, "b": B1, "ttl": 3600, "tenant": "shop1"},
    {"type": "axb", "x": X2, "a": A2, "b": B2, "ttl": 3600, "tenant": "shop1"},
    {"type": "axb", "x": X3, "a": A1, "b": B3, "ttl": 3600, "tenant": "shop1"},
    {"type": "axb", "x": X4, "a": A4, "b": B4, "ttl": 3600, "tenant": "shop1",
     "direction": "a_to_b"},
    {"type": "axb", "x": X5, "a": A5, "b": B5, "ttl": 3600, "tenant": "shop2"},
]
ALL_NUMBERS = [A1, B1, A2, B2, B3, A4, B4, A5, B5]


StartProxy = Callable[..., ProxyProcess]


@pytest.fixture
def start_policy_proxy(tmp_path: Path) -> Iterator[StartProxy]:
    """Factory: a proxy with `policy` and tenants shop1 / shop2 (their policies given)."""
    prefix = f"sip700test:{uuid.uuid4().hex[:12]}:"
    started: list[ProxyProcess] = []

    def start(policy: dict, shop1: dict | None = None, shop2: dict | None = None, *,
              api: bool = False, records: bool = False, policy_prefix: str | None = None,
              name: str = "p", extra: dict | None = None) -> ProxyProcess:
        port, gateway_port = free_port(), free_port()
        cfg_dir = tmp_path / f"{name}-{port}"
        cfg_dir.mkdir()
        tenants = [{"id": "shop1", "api_keys": [hash_key(TENANT_KEY)],
                    **({"policy": shop1} if shop1 else {})},
                   {"id": "shop2", **({"policy": shop2} if shop2 else {})}]
        overrides: dict = {"workers": 2, "tenants": tenants, "store": {"key_prefix": prefix},
                           "policy": {"key_prefix": policy_prefix or f"{prefix}policy:",
                                      "redis_url": REDIS_URL, **policy}, **(extra or {})}
        if api:
            api_port = free_tcp_port()
            overrides["api"] = {"listen": f"127.0.0.1:{api_port}"}
        if records:
            overrides["records"] = {"enabled": True, "stream": f"{prefix}records",
                                    "events_stream": f"{prefix}events",
                                    "dead_letter_stream": f"{prefix}dead",
                                    "key_prefix": prefix, "redis_url": REDIS_URL,
                                    "spool_dir": str(cfg_dir / "spool")}
        path, config = write_config(cfg_dir, port=port, gateway_port=gateway_port,
                                    bindings=BINDINGS, overrides=overrides)
        proxy = start_proxy(path, port, gateway_port, cfg_dir / "proxy.log", config)
        proxy.prefix = prefix  # type: ignore[attr-defined]
        if api:
            proxy.api_url = f"http://127.0.0.1:{api_port}"  # type: ignore[attr-defined]
            wait_http(f"{proxy.api_url}/healthz")  # type: ignore[attr-defined]
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        rc = proxy.stop()
        proxy.assert_clean_exit(rc)
    delete_redis_prefix(prefix)


def refused(proxy: ProxyProcess, workdir: Path, x: str, caller: str, status: str) -> None:
    """A SIPp caller whose INVITE must get exactly `status` (and no 139… number back)."""
    result = run_sipp("uac_expect_reject.xml", f"127.0.0.1:{proxy.port}", free_port(), workdir,
                      extra=["-key", "ruri", f"sip:{x}@127.0.0.1", "-key", "a", caller,
                             "-key", "status", status, *COMMON_SIPP])
    assert result.returncode == 0 and result.successful == 1, str(result)


def connects(proxy: ProxyProcess, workdir: Path, *plans: CallPlan) -> None:
    outcome = run_flow(proxy, workdir, caller="uac_basic.xml", callee="uas_basic.xml",
                       plans=list(plans), caller_extra=["-d", "50"])
    assert_all_succeeded(outcome, len(plans))


def stats(proxy: ProxyProcess) -> dict[str, int]:
    return proxy.stop_and_read_stats()


# ---- frequency caps ------------------------------------------------------------------------
def test_the_call_after_the_cap_is_refused_with_its_code_and_recorded(
        start_policy_proxy: StartProxy, tmp_path: Path) -> None:
    proxy = start_policy_proxy({"rate_limits": [
        {"name": "caller-per-minute", "per": "caller", "max_calls": 3, "window_s": 60,
         "code": 480, "reason": "Over Limit"}]}, records=True)
    connects(proxy, tmp_path, *(CallPlan(A1, X1, B1, i) for i in range(1, 4)))
    refused(proxy, tmp_path, X1, A1, "480 Over Limit")
    refused(proxy, tmp_path, X3, A1, "480 Over Limit")  # the caller's cap, whichever X
    connects(proxy, tmp_path, CallPlan(A2, X2, B2, 9))  # another caller: its own window
    prefix = proxy.prefix  # type: ignore[attr-defined]
    counters = stats(proxy)
    assert counters.get("policy_refused:caller-per-minute") == 2, counters
    assert counters.get("calls_routed") == 4
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        rows = [fields for _, fields in client.xrange(f"{prefix}records")]
    finally:
        client.close()
    refusals = [r for r in rows if r.get("refusal")]
    assert [(r["refusal"], r["sip_status"], r["tenant"]) for r in refusals] == [
        ("policy:caller-per-minute", "480", "shop1")] * 2
    assert_no_number_logged(proxy, ALL_NUMBERS)
    assert any('"policy_refused"' in ln and "caller-per-minute" in ln
               for ln in proxy.log_lines())


def test_caps_hold_across_two_proxies_sharing_redis(start_policy_proxy: StartProxy,
                                                   tmp_path: Path) -> None:
    shared = f"sip700test:{uuid.uuid4().hex[:12]}:policy:"
    policy = {"rate_limits": [{"name": "x-per-day", "per": "x", "max_calls": 4,
                               "window_s": 86400, "code": 403, "reason": "Over Limit"}]}
    try:
        one = start_policy_proxy(policy, policy_prefix=shared, name="one")
        two = start_policy_proxy(policy, policy_prefix=shared, name="two")
        for i, proxy in enumerate((one, two, one, two)):
            connects(proxy, tmp_path, CallPlan(A1, X1, B1, 10 + i))
        refused(one, tmp_path, X1, A1, "403 Over Limit")
        refused(two, tmp_path, X1, A1, "403 Over Limit")
        connects(two, tmp_path, CallPlan(A2, X2, B2, 20))  # another X: its own cap
        routed = stats(one).get("calls_routed", 0) + stats(two).get("calls_routed", 0)
        assert routed == 5  # 4 on X1 in total (not 4 each), 1 on X2
    finally:
        delete_redis_prefix(shared)


def test_concurrent_calls_per_x_are_capped_and_released_at_the_end(
        start_policy_proxy: StartProxy, tmp_path: Path) -> None:
    proxy = start_policy_proxy({"concurrency": [{"name": "x-at-once", "per": "x",
                                                 "max_calls": 1, "code": 480,
                                                 "reason": "X Busy"}]})
    caller_csv, callee_csv = write_plans(tmp_path, [CallPlan(A5, X5, B5, 1)])
    gw = proxy.gateway_port
    with sipp_server("uas_basic.xml", gw, tmp_path, calls=1, csv=callee_csv,
                     extra=["-infindex", "callee.csv", "0", *COMMON_SIPP]) as server:
        long_call = subprocess.Popen(
            sipp_args("uac_basic.xml", remote=f"127.0.0.1:{proxy.port}",
                      local_port=free_port(), calls=1, csv=caller_csv, workdir=tmp_path,
                      extra=["-d", "3000", *COMMON_SIPP]),
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.2)  # answered, talking
        refused(proxy, tmp_path, X5, A5, "480 X Busy")
        assert long_call.wait(timeout=20) == 0
        assert server.wait(timeout=20) == 0
    time.sleep(0.3)  # the BYE's release reaches Redis
    connects(proxy, tmp_path, CallPlan(A5, X5, B5, 2))
    assert stats(proxy).get("policy_refused:x-at-once") == 1


def test_the_calls_of_one_loop_pass_reach_the_policy_in_one_batch(
        start_policy_proxy: StartProxy) -> None:
    """Twenty INVITEs waiting when the workers wake are read one loop pass a worker: the
    policy step gets each worker's share at once (one write of counters to Redis), not one
    call at a time, and every call is decided and routed."""
    proxy = start_policy_proxy(
        {"rate_limits": [{"name": "caller-per-minute", "per": "caller", "max_calls": 100,
                          "window_s": 60}]},
        # the calls are left unanswered: not waited for; the workers' stop is no overload (the
        # first tick after it would see 200 ms of loop lag and shed the waiting calls)
        extra={"shutdown": {"drain_s": 1}, "overload": {"enabled": False}})
    workers = proxy.worker_pids()
    assert len(workers) == 2
    gateway = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gateway.bind(("127.0.0.1", proxy.gateway_port))
    gateway.settimeout(5)
    caller = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    caller.bind(("127.0.0.1", 0))
    try:
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        try:
            sent = set()
            for _ in range(20):
                data, call_id = invite(caller.getsockname()[1], proxy.port, X1, A1)
                caller.sendto(data, ("127.0.0.1", proxy.port))
                sent.add(call_id)
            time.sleep(0.2)
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
        routed = set()
        while routed != sent:
            msg = parse_message(gateway.recvfrom(65535)[0])
            if msg.method == "INVITE":
                assert msg.uri.user == B1
                routed.add(msg.header("x-test-id"))
    finally:
        gateway.close()
        caller.close()
    counters = stats(proxy)
    assert counters.get("calls_routed") == 20, counters
    assert 1 <= counters.get("policy_batches", 0) <= 4, counters  # one a call before: 20


# ---- blocklists ------------------------------------------------------------------------------
def block_cli(proxy: ProxyProcess, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "proxy", "block", *args, "--config",
                           str(proxy.config_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def api(proxy: ProxyProcess, method: str, path: str, data: dict | None = None
        ) -> tuple[int, dict]:
    return call_api(proxy.api_url, TENANT_KEY, method, path, data)  # type: ignore[attr-defined]


def test_blocklisted_caller_callee_and_x_are_refused_and_removal_takes_effect(
        start_policy_proxy: StartProxy, tmp_path: Path) -> None:
    proxy = start_policy_proxy({"enabled": True, "blocklist": {"prefixes": ["1880"]},
                                "refusal": {"code": 403, "reason": "Blocked"}}, api=True)
    connects(proxy, tmp_path, CallPlan(A1, X1, B1, 1))
    assert "added" in block_cli(proxy, "add", "caller", A1)  # global, from the CLI
    time.sleep(1.0)  # every worker polls the list version at least once a second
    refused(proxy, tmp_path, X1, A1, "403 Blocked")
    status, body = api(proxy, "POST", "/v1/blocklist", {"kind": "callee", "value": B2})
    assert status == 201 and body == {"tenant": "shop1", "entry": f"callee:{B2}"}
    status, body = api(proxy, "POST", "/v1/blocklist", {"kind": "x", "value": X4})
    assert status == 201
    status, body = api(proxy, "POST", "/v1/blocklist", {"kind": "x", "value": X4,
                                                        "tenant": "shop2"})
    assert status == 403 and body["field"] == "tenant"
    assert api(proxy, "POST", "/v1/blocklist", {"kind": "caller", "value": "abc"})[0] == 422
    time.sleep(1.0)
    refused(proxy, tmp_path, X2, A2, "403 Blocked")  # callee B2 on shop1's list
    refused(proxy, tmp_path, X4, A4, "403 Blocked")  # X4 on shop1's list
    assert api(proxy, "GET", "/v1/blocklist") == (200, {"tenant": "shop1", "entries": [
        f"callee:{B2}", f"x:{X4}"]})
    assert api(proxy, "DELETE", f"/v1/blocklist/callee/{B2}")[0] == 204
    assert api(proxy, "DELETE", f"/v1/blocklist/callee/{B2}")[0] == 404
    assert "removed" in block_cli(proxy, "remove", "caller", A1)
    assert block_cli(proxy, "list").strip() == ""
    time.sleep(1.0)
    connects(proxy, tmp_path, CallPlan(A1, X1, B1, 2), CallPlan(A2, X2, B2, 3))
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        audit = [f["action"] for _, f in client.xrange(
            f"{proxy.prefix}audit")]  # type: ignore[attr-defined]
    finally:
        client.close()
    assert audit.count("block_add") == 3 and audit.count("block_remove") == 2
    counters = stats(proxy)
    assert counters.get("policy_refused:blocklist") == 3


# ---- time windows and direction ------------------------------------------------------------
def test_outside_the_time_window_is_refused_and_one_way_binding_refuses_the_other_way(
        start_policy_proxy: StartProxy, tmp_path: Path) -> None:
    now = datetime.now(ZoneInfo("Asia/Shanghai"))
    start, end = now + timedelta(hours=2), now + timedelta(hours=3)
    closed = {"start": start.strftime("%H:%M"), "end": end.strftime("%H:%M"),
              "tz": "Asia/Shanghai", "code": 480, "reason": "Outside Hours"}
    open_now = {"start": (now - timedelta(hours=1)).strftime("%H:%M"),
                "end": (now + timedelta(hours=1)).strftime("%H:%M"), "tz": "Asia/Shanghai"}
    proxy = start_policy_proxy({"time_window": closed}, shop2={"time_window": open_now})
    refused(proxy, tmp_path, X1, A1, "480 Outside Hours")  # shop1: the global window
    connects(proxy, tmp_path, CallPlan(A5, X5, B5, 1))  # shop2's own window is open
    refused(proxy, tmp_path, X4, B4.replace("139", "137"), "403 Not A Party Of This Binding")
    counters = stats(proxy)
    assert counters.get("policy_refused:time_window") == 1


def test_one_way_binding_refuses_the_other_direction_with_policy_on(
        start_policy_proxy: StartProxy, tmp_path: Path) -> None:
    proxy = start_policy_proxy({"enabled": True})
    connects(proxy, tmp_path, CallPlan(A4, X4, B4, 1))
    # B4 (139…) calling back: uac_expect_reject refuses any 139 number in the answer, so the
    # raw check is the proxy's counter and the 403 status
    from tests.integration.sipclient import Endpoint, place_call

    caller, callee = Endpoint(), Endpoint()
    try:
        result = place_call(proxy.port, caller, callee, X4, B4)
    finally:
        caller.close()
        callee.close()
    assert result.status == 403 and not result.callee_saw
    assert stats(proxy).get("calls_direction_restricted") == 1


# ---- bulk calling ----------------------------------------------------------------------------
def test_bulk_detector_trips_on_the_next_distinct_callee(start_policy_proxy: StartProxy,
                                                         tmp_path: Path) -> None:
    proxy = start_policy_proxy({"bulk": {"max_distinct_callees": 1, "window_s": 600,
                                         "code": 403, "reason": "Bulk Calling"}})
    connects(proxy, tmp_path, CallPlan(A1, X1, B1, 1), CallPlan(A1, X1, B1, 2))
    refused(proxy, tmp_path, X3, A1, "403 Bulk Calling")  # a second callee (B3) via X3
    counters = stats(proxy)
    assert counters.get("policy_refused:bulk") == 1 and counters.get("bulk_caller") == 1
    assert any('"bulk_caller"' in ln for ln in proxy.log_lines())
    assert_no_number_logged(proxy, ALL_NUMBERS)


# ---- the decision webhook --------------------------------------------------------------------
class Webhook:
    """A tenant's decision endpoint on loopback (aiohttp, in a thread of its own)."""

    def __init__(self) -> None:
        self.port = free_tcp_port()
        self.asked: list[dict] = []
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.asked.append(body)
        caller = body["caller"]
        if caller == A1:
            return web.json_response({"action": "connect"})
        if caller == A2:
            return web.json_response({"action": "refuse", "code": 603,
                                      "reason": "Declined By Platform"})
        if caller == A4:
            return web.json_response({"action": "connect", "callee": OVERRIDE,
                                      "max_call_s": 60})
        await asyncio.sleep(1.0)  # A5: too slow, the fallback decides
        return web.json_response({"action": "refuse"})

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/decide", self.handle)
        runner = self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def test_webhook_connect_refuse_override_timeout_and_endpoint_down(
        start_policy_proxy: StartProxy, tmp_path: Path) -> None:
    hook = Webhook()
    try:
        proxy = start_policy_proxy(
            {}, shop1={"webhook": {"url": f"http://127.0.0.1:{hook.port}/decide",
                                   "timeout_ms": 300, "fallback": "connect"}},
            shop2={"webhook": {"url": f"http://127.0.0.1:{free_tcp_port()}/down",
                               "fallback": "refuse", "code": 503,
                               "reason": "Platform Unreachable"}})
        connects(proxy, tmp_path, CallPlan(A1, X1, B1, 1))  # connect
        refused(proxy, tmp_path, X2, A2, "603 Declined By Platform")  # refuse
        connects(proxy, tmp_path, CallPlan(A4, X4, OVERRIDE, 2))  # callee override
        refused(proxy, tmp_path, X5, A5, "503 Platform Unreachable")  # endpoint down
        # too slow: the fallback (connect) after 300 ms, not the late refusal
        started = time.monotonic()
        hook_slow = start_policy_proxy(
            {}, shop2={"webhook": {"url": f"http://127.0.0.1:{hook.port}/decide",
                                   "timeout_ms": 300, "fallback": "connect"}}, name="slow")
        connects(hook_slow, tmp_path, CallPlan(A5, X5, B5, 3))
        assert time.monotonic() - started < 10
        asked = {body["caller"]: body for body in hook.asked}
        assert asked[A1]["x"] == X1 and asked[A1]["callee"] == B1
        assert asked[A1]["tenant"] == "shop1" and A5 in asked
        counters = stats(proxy)
        assert counters.get("policy_refused:webhook") == 2
        assert counters.get("policy_webhook_failures") == 1
        assert stats(hook_slow).get("policy_webhook_failures") == 1
    finally:
        hook.close()


def test_a_bindings_own_time_window_refuses_outside_it_with_no_policy_configured(
        proxies: list[ProxyProcess], tmp_path: Path) -> None:
    """time_window on a binding (bindings file here; the API takes the same field) is checked
    by the core on its lookup: no policy section, no Redis for it."""
    now = datetime.now(ZoneInfo("Europe/Berlin"))
    closed = f"{(now + timedelta(hours=2)):%H:%M}-{(now + timedelta(hours=3)):%H:%M} Europe/Berlin"
    open_now = f"{(now - timedelta(hours=1)):%H:%M}-{(now + timedelta(hours=1)):%H:%M}"
    open_now += " Europe/Berlin"
    port, gateway_port = free_port(), free_port()
    path, config = write_config(tmp_path, port=port, gateway_port=gateway_port, bindings=[
        {"type": "axb", "x": X1, "a": A1, "b": B1, "ttl": 3600, "time_window": closed},
        {"type": "axb", "x": X2, "a": A2, "b": B2, "ttl": 3600, "time_window": open_now}],
        overrides={"policy": {"refusal": {"code": 480, "reason": "Outside Hours"}}})
    proxy = start_proxy(path, port, gateway_port, tmp_path / "proxy.log", config)
    proxies.append(proxy)
    refused(proxy, tmp_path, X1, A1, "480 Outside Hours")
    connects(proxy, tmp_path, CallPlan(A2, X2, B2, 1))
    assert stats(proxy).get("policy_refused:time_window") == 1
