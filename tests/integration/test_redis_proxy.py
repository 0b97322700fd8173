"""The proxy on the Redis store, as operators run it: several instances, Redis trouble.

Real processes: redis-server (the machine's, or one the test starts on its own port), two
`python -m proxy run` instances, the `sip700` admin CLI, and SIP over UDP on loopback.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.sip.message import parse_message
from tests.integration.procs import (
    ROOT,
    ProxyProcess,
    delete_redis_prefix,
    free_port,
    start_proxy,
    start_redis_server,
    write_config,
)
from tests.integration.sipclient import Endpoint, invite, place_call

X1, A1, B1 = "700100000000001", "13800000001", "13900000001"
X2, A2, B2 = "700100000000002", "13800000002", "13900000002"
BINDINGS = [
    {"type": "axb", "x": X1, "a": A1, "b": B1, "ttl": 3600},
    {"type": "axb", "x": X2, "a": A2, "b": B2, "ttl": 3600},
]


@pytest.fixture
def endpoints() -> Iterator[tuple[Endpoint, Endpoint]]:
    caller, callee = Endpoint(), Endpoint()
    yield caller, callee
    caller.close()
    callee.close()


@pytest.fixture
def prefix() -> Iterator[str]:
    p = f"sip700test:{uuid.uuid4().hex[:12]}:"
    yield p
    delete_redis_prefix(p)


def _proxy(tmp: Path, name: str, gateway_port: int, prefix: str, bindings: list[dict],
           overrides: dict | None = None) -> ProxyProcess:
    d = tmp / name
    d.mkdir()
    port = free_port()
    path, config = write_config(d, port=port, gateway_port=gateway_port, bindings=bindings,
                                redis_prefix=prefix, overrides=overrides)
    return start_proxy(path, port, gateway_port, d / "proxy.log", config)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=30, check=False)


def test_unbind_reaches_every_instance_within_a_second(
    tmp_path: Path, endpoints: tuple[Endpoint, Endpoint], prefix: str
) -> None:
    caller, callee = endpoints
    one = _proxy(tmp_path, "one", callee.port, prefix, BINDINGS)
    two = _proxy(tmp_path, "two", callee.port, prefix, [])
    try:
        for proxy in (one, two):  # both instances route (and now cache) the binding
            result = place_call(proxy.port, caller, callee, X1, A1)
            assert result.status == 200, result
            assert result.callee_saw[0].uri.user == B1
        done = _cli("unbind", "--x", X1, "--number", A1, "--config", str(one.config_path))
        assert done.returncode == 0, done.stderr
        unbound_at = time.monotonic()
        delays = {}
        for name, proxy in (("one", one), ("two", two)):
            while True:
                result = place_call(proxy.port, caller, callee, X1, A1, timeout=2)
                if result.status == 404:
                    delays[name] = time.monotonic() - unbound_at
                    break
                assert result.status == 200, result
                assert time.monotonic() - unbound_at < 1.0, f"{name} still routes after 1 s"
                time.sleep(0.02)
        print(f"invalidation delay after unbind: {delays}")
        assert all(d <= 1.0 for d in delays.values()), delays
        # the other binding on the same store is untouched
        assert place_call(two.port, caller, callee, X2, A2).status == 200
    finally:
        one.stop()
        two.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[dict]:
    """A redis-server this test owns (killed and restarted by the test)."""
    assert shutil.which("redis-server"), "redis-server missing: scripts/test installs it"
    port = free_port()
    state: dict = {"port": port, "proc": None}

    def start() -> None:
        state["proc"] = start_redis_server(port, tmp_path, "--appendonly", "no")

    state["start"] = start
    start()
    yield state
    proc = state["proc"]
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def test_redis_killed_mid_traffic_and_restarted(
    tmp_path: Path, endpoints: tuple[Endpoint, Endpoint], own_redis: dict
) -> None:
    caller, callee = endpoints
    url = f"redis://127.0.0.1:{own_redis['port']}/0"
    # one worker: what is cached is this process's cache (each worker has its own)
    overrides = {"store": {"redis_url": url, "timeout_ms": 200, "retry_after_s": 7},
                 "workers": 1}
    proxy = _proxy(tmp_path, "p", callee.port, "sip700test:kill:", BINDINGS, overrides)
    try:
        assert place_call(proxy.port, caller, callee, X1, A1).status == 200  # now cached

        own_redis["proc"].send_signal(signal.SIGKILL)
        own_redis["proc"].wait()

        # a binding in the cache keeps routing
        cached = place_call(proxy.port, caller, callee, X1, A1)
        assert cached.status == 200 and cached.callee_saw[0].uri.user == B1
        # a lookup that needs Redis gets 503 + Retry-After quickly instead of hanging
        miss = place_call(proxy.port, caller, callee, X2, A2)
        assert miss.status == 503, miss
        assert miss.seconds < 1.0, miss.seconds
        assert miss.responses[-1].header("retry-after") == "7"
        assert not miss.callee_saw
        # with the breaker open, further misses are answered at once
        quick = [place_call(proxy.port, caller, callee, X2, A2) for _ in range(5)]
        assert all(r.status == 503 for r in quick)
        print(f"503 latency with Redis down: first {miss.seconds * 1000:.1f} ms, then "
              f"{max(r.seconds for r in quick) * 1000:.1f} ms max")

        own_redis["start"]()  # an empty Redis (it keeps nothing on disk): reload the bindings
        done = _cli("bindings", "import", str(tmp_path / "p" / "bindings.yaml"),
                    "--config", str(proxy.config_path))
        assert done.returncode == 0, done.stdout + done.stderr
        deadline = time.monotonic() + 15
        while True:  # service comes back by itself: no restart, no admin action on the proxy
            result = place_call(proxy.port, caller, callee, X2, A2, timeout=2)
            if result.status == 200:
                assert result.callee_saw[0].uri.user == B2
                break
            assert result.status == 503, result
            assert time.monotonic() < deadline, "the proxy did not recover"
            time.sleep(0.2)
        log = "\n".join(proxy.log_lines())
        assert "Traceback" not in log
    finally:
        proxy.stop()


def test_a_frozen_redis_costs_a_new_call_its_timeout_not_the_lookup_deadline(
    tmp_path: Path, endpoints: tuple[Endpoint, Endpoint], own_redis: dict
) -> None:
    """Lookups go to Redis a loop pass at a time (RedisStore.lookup_batch): a Redis that is
    connected but silent (SIGSTOP) ends a batch at store.timeout_ms with 503, well before
    store.lookup_deadline_ms, while cached bindings route; it answers again once resumed."""
    caller, callee = endpoints
    url = f"redis://127.0.0.1:{own_redis['port']}/0"
    overrides = {"store": {"redis_url": url, "timeout_ms": 150, "retry_after_s": 5,
                           "lookup_deadline_ms": 5000,
                           "circuit_breaker": {"failure_threshold": 100}},
                 "workers": 1}
    proxy = _proxy(tmp_path, "p", callee.port, "sip700test:frozen:", BINDINGS, overrides)
    process = own_redis["proc"]
    try:
        assert place_call(proxy.port, caller, callee, X1, A1).status == 200  # now cached
        process.send_signal(signal.SIGSTOP)
        try:
            cached = place_call(proxy.port, caller, callee, X1, A1)
            assert cached.status == 200 and cached.callee_saw[0].uri.user == B1
            for _ in range(3):  # the breaker stays closed (threshold 100): each one waits
                miss = place_call(proxy.port, caller, callee, X2, A2)
                assert miss.status == 503, miss
                assert 0.1 < miss.seconds < 1.5, miss.seconds
                assert miss.responses[-1].header("retry-after") == "5"
                assert not miss.callee_saw
        finally:
            process.send_signal(signal.SIGCONT)
        back = place_call(proxy.port, caller, callee, X2, A2)
        assert back.status == 200 and back.callee_saw[0].uri.user == B2
        assert "Traceback" not in "\n".join(proxy.log_lines())
    finally:
        proxy.stop()


def test_the_misses_of_one_loop_pass_go_to_redis_in_one_batch(
    tmp_path: Path, endpoints: tuple[Endpoint, Endpoint], prefix: str
) -> None:
    """Twenty INVITEs waiting in the socket when the worker wakes are read in one loop pass:
    their twenty cache misses reach Redis as one batch (not one write each), and every call is
    routed to its own callee."""
    caller, callee = endpoints
    pairs = {f"138000001{i:02d}": f"139000001{i:02d}" for i in range(20)}
    bindings = [{"type": "axb", "x": X1, "a": a, "b": b, "ttl": 3600} for a, b in pairs.items()]
    proxy = _proxy(tmp_path, "p", callee.port, prefix, bindings,
                   # unanswered: not waited for; the stop is no overload (the first tick
                   # after it would see 200 ms of loop lag and shed the waiting calls)
                   {"workers": 1, "shutdown": {"drain_s": 1}, "overload": {"enabled": False}})
    try:
        [worker] = proxy.worker_pids()
        expected = {}
        os.kill(worker, signal.SIGSTOP)
        try:
            for a, b in pairs.items():
                data, call_id = invite(caller.port, proxy.port, X1, a)
                caller.sock.sendto(data, ("127.0.0.1", proxy.port))
                expected[call_id] = b
            time.sleep(0.2)
        finally:
            os.kill(worker, signal.SIGCONT)
        seen: dict[str, str] = {}
        callee.sock.settimeout(5)
        while len(seen) < len(expected):
            msg = parse_message(callee.sock.recvfrom(65535)[0])
            if msg.method == "INVITE":
                seen[msg.header("x-test-id") or ""] = msg.uri.user or ""
        assert seen == expected
    finally:
        stats = proxy.stop_and_read_stats()
    assert stats.get("lookups_batched") == 20, stats
    assert 1 <= stats.get("lookup_batches", 0) <= 3, stats  # one a datagram before: 20
