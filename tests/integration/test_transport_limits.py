"""Untrusted input cannot exhaust the proxy, and TCP works with several workers.

Real processes: the proxy (`python -m proxy run`; memory store unless a test says otherwise),
SIPp callers and callees (scripts/sipp/), plain Python TCP/UDP sockets on loopback (many
connections, a peer that never reads, a flood of requests) and a proxy whose stdout is a pipe
nobody reads.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.sip.message import build_response, parse_message
from tests.integration.procs import (
    ROOT,
    ProxyProcess,
    free_port,
    run_sipp,
    server_counts,
    sipp_server,
    start_proxy,
    wait_tcp_listening,
    wait_udp_bound,
    write_config,
)
from tests.integration.sipclient import Endpoint, invite
from tests.integration.test_privacy_headers import (
    CALLEE,
    CALLER,
    FORMS,
    A,
    B,
    X,
    assert_private_call,
    callee_keys,
    caller_keys,
)

StartProxy = Callable[..., ProxyProcess]
_seq = itertools.count(1)


@pytest.fixture
def memory_proxy(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Factory: a proxy on the memory store with `overrides`; stopped after the test."""
    started: list[ProxyProcess] = []

    def start(overrides: dict, gateway_port: int | None = None) -> ProxyProcess:
        port, gw = free_port(), gateway_port or free_port()
        cfg_dir = tmp_path / f"proxy-{port}"
        cfg_dir.mkdir()
        path, config = write_config(cfg_dir, port=port, gateway_port=gw, overrides=overrides)
        proxy = start_proxy(path, port, gw, cfg_dir / "proxy.log", config)
        started.append(proxy)
        wait_tcp_listening(port)  # start_proxy waits for the UDP port only
        return proxy

    yield start
    for proxy in started:
        proxy.assert_clean_exit(proxy.stop())


def options(local: tuple[str, int], transport: str = "TCP") -> bytes:
    """OPTIONS sip:127.0.0.1 (the proxy itself: it answers 200 to a trusted peer)."""
    n = next(_seq)
    return (f"OPTIONS sip:127.0.0.1 SIP/2.0\r\n"
            f"Via: SIP/2.0/{transport} {local[0]}:{local[1]};branch=z9hG4bKlim{n}x{os.getpid()}\r\n"
            f"From: <sip:probe@{local[0]}>;tag=p{n}\r\nTo: <sip:127.0.0.1>\r\n"
            f"Call-ID: limits-{n}-{os.getpid()}@test\r\nCSeq: 1 OPTIONS\r\n"
            f"Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode()


def tcp_connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    return sock


def options_status(sock: socket.socket) -> str:
    """Send OPTIONS on a connection; the status line of the answer ('' when it was closed)."""
    try:
        sock.sendall(options(sock.getsockname()))
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                return ""
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        return ""
    return data.split(b"\r\n", 1)[0].decode()


def closed_by_peer(sock: socket.socket, timeout: float = 3.0) -> bool:
    """Whether the other end closed (or reset) this connection within `timeout`."""
    sock.settimeout(timeout)
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def udp_call(proxy_port: int, caller: Endpoint, callee: Endpoint, timeout: float = 5.0
             ) -> tuple[int, float]:
    """A → X → B over UDP; the callee answers 200 to the INVITE it gets (whatever Call-ID the
    proxy gives the callee leg). Returns the caller's final status (0: none) and how long."""
    data, call_id = invite(caller.port, proxy_port, "700100000000001", "13800000001")
    started = time.monotonic()
    caller.sock.sendto(data, ("127.0.0.1", proxy_port))
    deadline = started + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([caller.sock, callee.sock], [], [], left)
        for sock in ready:
            packet, addr = sock.recvfrom(65535)
            msg = parse_message(packet)
            if sock is callee.sock:
                if msg.is_request and msg.method == "INVITE":
                    ok = build_response(msg, 200, "OK", to_tag="callee", headers=[
                        ("Contact", f"<sip:callee@127.0.0.1:{callee.port}>")])
                    rr = [row for name, row in msg.rows if name == "record-route"]
                    ok.rows[1:1] = [("record-route", row) for row in rr]
                    callee.sock.sendto(ok.serialize(), addr)
            elif msg.call_id == call_id and msg.status >= 200:
                return msg.status, time.monotonic() - started
    return 0, time.monotonic() - started


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# ---- TCP connection caps ----------------------------------------------------------------------

def test_per_source_cap_closes_the_extra_connections(memory_proxy: Callable[..., ProxyProcess]
                                                     ) -> None:
    """Cap 5 per source: of 8 connections from 127.0.0.1 the last 3 are closed at once, the
    first 5 keep working; once one of them closes, a new one is accepted."""
    proxy = memory_proxy({"workers": 1, "transport": {"tcp_max_connections_per_source": 5}})
    conns = []
    for _ in range(8):
        conns.append(tcp_connect(proxy.port))
        time.sleep(0.05)  # accepted in the order they connect
    try:
        assert all(closed_by_peer(c) for c in conns[5:])
        for c in conns[:5]:
            assert options_status(c) == "SIP/2.0 200 OK"
        conns[0].close()
        time.sleep(0.2)
        conns[0] = tcp_connect(proxy.port)
        assert options_status(conns[0]) == "SIP/2.0 200 OK"
    finally:
        for c in conns:
            c.close()
    stats = proxy.stop_and_read_stats()
    assert stats.get("tcp_refused") == 3, stats
    assert any('"tcp_refused"' in ln for ln in proxy.log_lines())


def test_total_cap_closes_connections_from_any_source(memory_proxy: Callable[..., ProxyProcess]
                                                      ) -> None:
    """Cap 4 in all: 2 connections from each of 127.0.0.2, .3, .4 — the last two are closed."""
    proxy = memory_proxy({"workers": 1, "trusted_peers": ["127.0.0.0/8"],
                          "transport": {"tcp_max_connections": 4}})
    conns = []
    for source in ("127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3", "127.0.0.4",
                   "127.0.0.4"):
        conns.append(tcp_connect(proxy.port, source))
        time.sleep(0.05)
    try:
        assert all(closed_by_peer(c) for c in conns[4:])
        assert [options_status(c) for c in conns[:4]] == ["SIP/2.0 200 OK"] * 4
    finally:
        for c in conns:
            c.close()
    assert proxy.stop_and_read_stats().get("tcp_refused") == 2


def test_peer_that_never_reads_is_paused_and_closed_while_calls_go_on(
    memory_proxy: Callable[..., ProxyProcess]
) -> None:
    """A TCP peer floods OPTIONS and never reads the answers: the proxy stops reading from it
    and closes it when its output passes tcp_max_output_bytes; memory stays flat and a UDP call
    placed meanwhile completes at once."""
    callee, caller = Endpoint(), Endpoint()
    # the flood is the peer's problem, not an overload of this proxy: shedding (overload.*)
    # must not decide this test on a slow machine
    proxy = memory_proxy({"workers": 1, "logging": {"level": "info"},
                          "transport": {"tcp_max_output_bytes": 65536},
                          "overload": {"max_loop_lag_ms": 5000}},
                         gateway_port=callee.port)
    try:
        before = rss_kib(proxy.proc.pid)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # reads nothing anyway
        sock.connect(("127.0.0.1", proxy.port))
        request = options(sock.getsockname()) * 50
        sock.settimeout(2)
        sent, closed = 0, False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                sock.sendall(request)  # blocks (time-out) once the proxy stops reading
                sent += len(request)
            except TimeoutError:
                break
            except (ConnectionResetError, BrokenPipeError):
                closed = True
                break
        assert time.monotonic() < deadline, f"the proxy kept reading: {sent} bytes taken"
        status, seconds = udp_call(proxy.port, caller, callee)
        assert status == 200 and seconds < 1.0, (status, seconds)
        grown = rss_kib(proxy.proc.pid) - before
        assert grown < 20_000, f"the proxy grew by {grown} KiB"
        sock.close()
    finally:
        caller.close()
        callee.close()
    stats = proxy.stop_and_read_stats()
    assert stats.get("tcp_paused", 0) + stats.get("tcp_output_overflow", 0) >= 1, stats
    assert closed or stats.get("tcp_paused"), stats


# ---- logging never blocks ---------------------------------------------------------------------

def test_stdout_nobody_reads_does_not_stall_the_proxy(tmp_path: Path) -> None:
    """stdout is a pipe nobody reads, debug logging, 8,000 refused requests (a log line each):
    the proxy still answers a call at once, counts the records it had to drop (metrics and the
    stopping line), and every line it wrote is whole JSON."""
    callee, caller = Endpoint(), Endpoint()
    port, mport = free_port(), free_port(socket.SOCK_STREAM)
    # overload control off: 8,000 datagrams at once fill the receive queue (or overflow it)
    # while a slow machine works through them, and new calls are rightly shed meanwhile
    # (overload.max_receive_queue_kb, tested in test_failover.py); the subject here is stdout
    path, _ = write_config(tmp_path, port=port, gateway_port=callee.port, overrides={
        "workers": 1, "metrics": {"listen": f"127.0.0.1:{mport}"},
        "overload": {"enabled": False}})
    err = (tmp_path / "stderr.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", str(path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=err)
    try:
        wait_udp_bound(port)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.2", 0))  # untrusted: each request is refused and logged
            for i in range(8000):
                s.sendto(options(s.getsockname(), "UDP"), ("127.0.0.1", port))
                if i % 200 == 0:
                    time.sleep(0.01)  # within the proxy's socket buffer
        time.sleep(0.5)
        status, seconds = udp_call(port, caller, callee)
        assert status == 200 and seconds < 1.0, (status, seconds)
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        dropped = [ln for ln in metrics.splitlines()
                   if ln.startswith("sip700_log_records_dropped_total ")]
        assert dropped and float(dropped[0].split()[1]) > 0, metrics[-2000:]
    finally:
        caller.close()
        callee.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)  # reading now lets it finish its lines
        err.close()
    lines = out.decode().splitlines()
    records = [json.loads(ln) for ln in lines]  # a cut record would not parse
    stopping = [r for r in records if r.get("event") == "stopping"]
    assert stopping and stopping[0]["stats"].get("log_records_dropped", 0) > 0, stopping
    assert proc.returncode in (0, -15), (tmp_path / "stderr.log").read_text()


# ---- TCP with several workers -----------------------------------------------------------------

@pytest.mark.parametrize(("caller_transport", "callee_transport"), [("t1", "u1"), ("u1", "t1")])
def test_two_workers_tcp_and_udp_legs_complete_every_call(
    start_sip700: StartProxy, tmp_path: Path, caller_transport: str, callee_transport: str
) -> None:
    """workers: 2, one leg TCP and the other UDP: 100 of 100 calls complete on both legs.

    The callee's responses reach whichever worker the kernel picks; they must find the worker
    whose branch they carry (the one holding the INVITE's transaction and the TCP connection).
    """
    gw = free_port()
    gateway = f"sip:127.0.0.1:{gw}" + (";transport=tcp" if callee_transport == "t1" else "")
    proxy = start_sip700(gateway_port=gw,
                         overrides={"workers": 2, "carrier": {"gateways": [gateway]},
                                    "logging": {"level": "info"}})
    wait_tcp_listening(proxy.port)  # start_sip700 waits for the UDP port only
    calls = 100
    with sipp_server(CALLEE, gw, tmp_path, calls=calls, transport=callee_transport,
                     extra=[*callee_keys(B, X), "-recv_timeout", "10000"]) as server:
        result = run_sipp(CALLER, f"127.0.0.1:{proxy.port}", free_port(), tmp_path,
                          calls=calls, rate=50, transport=caller_transport,
                          extra=[*caller_keys(*FORMS["national"], A, X), "-recv_timeout",
                                 "10000"], timeout=120)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=20)  # it stops by itself after `calls` calls
    assert_private_call(result, server_counts(CALLEE, gw, tmp_path), tmp_path, calls=calls)
