"""Calls on bindings made through the HTTP API, with the API inside `sip700 run` (worker 0 of
two), on the memory store (worker 1 follows the API's journal) and on the Redis store (worker
1 hears the invalidation channel).

Real processes: the proxy (`python -m proxy run`, workers: 2, api.listen set), SIPp callers and
callees on loopback, the raw-socket test caller of sipclient.py, redis-server (Redis runs).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.api.keys import hash_key
from tests.integration.apiprocs import KEYS, call_api, free_tcp_port, tenants, wait_http
from tests.integration.procs import (
    ProxyProcess,
    delete_redis_prefix,
    free_port,
    run_sipp,
    start_on_fresh_ports,
    write_config,
)
from tests.integration.sipclient import Endpoint, place_call
from tests.integration.test_call_flows import CallPlan, assert_all_succeeded, run_flow

pytestmark = pytest.mark.integration

X = "700100000000001"  # in shop1's pool (apiprocs.tenants)
A, B = "13800000001", "13700000009"  # B outside 139…: uac_expect_reject refuses 139 numbers


@pytest.fixture(params=["memory", "redis"])
def proxy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProxyProcess]:
    prefix = f"sip700test:{uuid.uuid4().hex[:12]}:"
    def configure() -> tuple[Path, dict, int, int, Path]:
        port, gateway_port, api_port = free_port(), free_port(), free_tcp_port()
        overrides = {"workers": 2, "api": {"listen": f"127.0.0.1:{api_port}"},
                     "tenants": tenants(), "operator_keys": [hash_key("s7k_op")],
                     "store": {"key_prefix": prefix}}
        path, config = write_config(tmp_path, port=port, gateway_port=gateway_port,
                                    bindings=[], overrides=overrides,
                                    redis_prefix=prefix if request.param == "redis" else None)
        return path, config, port, gateway_port, tmp_path / "proxy.log"

    process = start_on_fresh_ports(configure)
    process.api_url = f"http://{process.config['api']['listen']}"  # type: ignore[attr-defined]
    wait_http(f"{process.api_url}/healthz")  # type: ignore[attr-defined]
    yield process
    rc = process.stop()
    delete_redis_prefix(prefix)
    process.assert_clean_exit(rc)


def api(proxy: ProxyProcess, method: str, path: str, data: dict | None = None
        ) -> tuple[int, dict]:
    return call_api(proxy.api_url, KEYS["shop1"], method, path, data)  # type: ignore[attr-defined]


def create(proxy: ProxyProcess, **fields: object) -> dict:
    status, binding = api(proxy, "POST", "/v1/bindings", {
        "a": A, "b": B, "x": X, "ttl_s": 3600, "order_id": "order-1", **fields})
    assert status == 201, binding
    time.sleep(0.3)  # the memory store's other worker follows the journal every 100 ms
    return binding


def test_sipp_call_on_an_api_binding_and_one_way_refusal(proxy: ProxyProcess,
                                                         tmp_path: Path) -> None:
    create(proxy, direction="a_to_b", max_call_s=600)
    outcome = run_flow(proxy, tmp_path, caller="uac_basic.xml", callee="uas_basic.xml",
                       plans=[CallPlan(A, X, B, 1)], caller_extra=["-d", "100"])
    assert_all_succeeded(outcome, 1)
    refused = run_sipp("uac_expect_reject.xml", f"127.0.0.1:{proxy.port}", free_port(),
                       tmp_path, extra=["-key", "ruri", f"sip:{X}@127.0.0.1", "-key", "a", B,
                                        "-key", "status", "403 Direction Restricted"])
    assert refused.returncode == 0 and refused.successful == 1, str(refused)
    stats = proxy.stop_and_read_stats()
    assert stats.get("calls_routed") == 1 and stats.get("calls_direction_restricted") == 1


def test_calls_stop_within_a_second_of_delete(proxy: ProxyProcess) -> None:
    binding = create(proxy)
    caller, callee = Endpoint(), Endpoint()
    try:
        # the gateway of this proxy is a SIPp-free port: the raw callee answers there
        proxy_gateway = proxy.gateway_port
        callee.sock.close()
        import socket

        callee.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        callee.sock.bind(("127.0.0.1", proxy_gateway))
        for _ in range(4):  # both workers route it (and the Redis workers cache it)
            result = place_call(proxy.port, caller, callee, X, A)
            assert result.status == 200, result
        status, _ = api(proxy, "DELETE", f"/v1/bindings/{binding['id']}")
        assert status == 204
        deleted_at = time.monotonic()
        refused = 0
        while refused < 4:  # four refusals in a row: every worker has stopped routing it
            result = place_call(proxy.port, caller, callee, X, A, timeout=2)
            if result.status == 404:
                refused += 1
                continue
            refused = 0
            assert result.status == 200, result
            assert time.monotonic() - deleted_at < 1.0, "still routed 1 s after DELETE"
        print(f"last call routed after DELETE: within {time.monotonic() - deleted_at:.3f} s")
        assert time.monotonic() - deleted_at < 2.0
    finally:
        caller.close()
        callee.close()


def test_delete_never_drops_a_call_in_progress(proxy: ProxyProcess, tmp_path: Path) -> None:
    binding = create(proxy)
    result: dict = {}

    def long_call() -> None:  # ACK, then 3 s of conversation, then BYE through the proxy
        result["outcome"] = run_flow(proxy, tmp_path, caller="uac_basic.xml",
                                     callee="uas_basic.xml", plans=[CallPlan(A, X, B, 1)],
                                     caller_extra=["-d", "3000"])

    thread = threading.Thread(target=long_call)
    thread.start()
    time.sleep(1.5)
    status, _ = api(proxy, "DELETE", f"/v1/bindings/{binding['id']}")
    assert status == 204
    thread.join(timeout=60)
    assert_all_succeeded(result["outcome"], 1)  # BYE and its 200 crossed after the DELETE
    refused = run_sipp("uac_expect_reject.xml", f"127.0.0.1:{proxy.port}", free_port(),
                       tmp_path, extra=["-key", "ruri", f"sip:{X}@127.0.0.1", "-key", "a", A,
                                        "-key", "status", "404 No Binding"])
    assert refused.returncode == 0 and refused.successful == 1, str(refused)
