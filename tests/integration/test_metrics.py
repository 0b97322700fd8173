"""Metrics and health over HTTP from a running proxy (real process, real sockets)."""

from __future__ import annotations

import socket
import urllib.request

from tests.integration.procs import free_port


def _invite(via_port: int, x: str, caller: str, branch: str) -> bytes:
    return (
        f"INVITE sip:{x}@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{via_port};branch=z9hG4bK{branch}\r\n"
        f"From: <sip:{caller}@127.0.0.1>;tag=t{branch}\r\n"
        f"To: <sip:{x}@127.0.0.1>\r\nCall-ID: {branch}@test\r\nCSeq: 1 INVITE\r\n"
        f"Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def test_metrics_count_decisions_and_health_answers(start_sip700) -> None:
    mport = free_port(socket.SOCK_STREAM)
    proxy = start_sip700(overrides={"metrics": {"listen": f"127.0.0.1:{mport}"}, "workers": 1})
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(3)
        # a middle number nobody is bound to: 404 (at once, so no 100 Trying is owed)
        s.sendto(_invite(s.getsockname()[1], "700199999999999", "13800000001", "m1"),
                 ("127.0.0.1", proxy.port))
        statuses = set()
        while 404 not in statuses:
            data, _ = s.recvfrom(65535)
            statuses.add(int(data.split(b" ", 2)[1]))
        assert statuses == {404}
    body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=3).read().decode()
    assert "sip700_calls_no_binding_total 1.0" in body
    assert "sip700_server_transactions" in body
    health = urllib.request.urlopen(f"http://127.0.0.1:{mport}/health", timeout=3)
    assert health.status == 200 and health.read() == b"ok\n"
