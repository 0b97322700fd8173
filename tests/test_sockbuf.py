"""Socket buffers on this kernel: the size asked for, or the cap and a warning naming the fix.

Real sockets, real kernel limits (net.core.rmem_max / wmem_max); the unprivileged case runs in
a child that gives up root, since CI runs as root with CAP_NET_ADMIN."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from proxy.sockbuf import size_buffer

ROOT = Path(__file__).resolve().parents[1]


def _sysctl(name: str) -> int:
    return int(Path(f"/proc/sys/net/core/{name}").read_text())


def _can_pass_the_cap() -> bool:
    """CAP_NET_ADMIN (bit 12) in this process's effective set."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 12 & 1)
    return False


@pytest.mark.parametrize(("kind", "cap"), [("receive", "rmem_max"), ("send", "wmem_max")])
def test_a_size_under_the_cap_is_granted_as_asked(kind: str, cap: str) -> None:
    size = min(_sysctl(cap), 64 * 1024)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, capture_logs() as logs:
        assert size_buffer(sock, kind, size) == size
    assert logs == []


@pytest.mark.parametrize(("kind", "cap"), [("receive", "rmem_max"), ("send", "wmem_max")])
def test_a_size_over_the_cap_is_granted_with_cap_net_admin_else_capped_and_said(
        kind: str, cap: str) -> None:
    size = _sysctl(cap) * 4
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, capture_logs() as logs:
        granted = size_buffer(sock, kind, size, address="udp:127.0.0.1:5060")
    if _can_pass_the_cap():
        assert granted == size and logs == []
    else:
        assert granted == _sysctl(cap)
        assert logs[0]["event"] == "udp_buffer_capped"


def _unprivileged(kind: str, size: int) -> tuple[int, list[dict[str, object]]]:
    """size_buffer in a child process without CAP_NET_ADMIN (it turns nobody when root)."""
    code = (
        "import json, os, socket\n"
        "from structlog.testing import capture_logs\n"
        "from proxy.sockbuf import size_buffer\n"
        "if os.geteuid() == 0:\n"
        "    os.setuid(65534)  # nobody: root's capabilities go with it\n"
        "with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, capture_logs() as logs:\n"
        f"    granted = size_buffer(s, {kind!r}, {size}, address='udp:127.0.0.1:5060')\n"
        "print(json.dumps([granted, logs]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    granted, logs = json.loads(out.stdout)
    return granted, logs


@pytest.mark.parametrize(("kind", "cap", "key"), [
    ("receive", "rmem_max", "transport.udp_rcvbuf_bytes"),
    ("send", "wmem_max", "transport.udp_sndbuf_bytes")])
def test_without_cap_net_admin_the_cap_holds_and_the_warning_names_key_and_sysctl(
        kind: str, cap: str, key: str) -> None:
    limit = _sysctl(cap)
    granted, logs = _unprivileged(kind, limit * 4)
    assert granted == limit
    [entry] = logs
    assert entry["event"] == "udp_buffer_capped" and entry["log_level"] == "warning"
    assert entry["buffer"] == kind and entry["key"] == key
    assert entry["asked_bytes"] == limit * 4 and entry["granted_bytes"] == limit
    assert entry["address"] == "udp:127.0.0.1:5060"
    assert f"net.core.{cap}" in str(entry["reason"])
