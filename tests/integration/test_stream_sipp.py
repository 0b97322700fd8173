"""Full calls through a proxy listening on TCP only, and on TLS only, with real SIPp on both
legs.

Real processes: the proxy (`python -m proxy run`, memory store, `workers: 2`), a SIPp callee
on the gateway's port and a SIPp caller, both `-t t1` (one TCP connection each), running the
re-INVITE scenarios of scripts/sipp/ (INVITE, ACK, a re-INVITE from each side, BYE from the
caller — uac_reinvite/uas_reinvite — or from the callee — uac_reinvite_callee_bye/
uas_reinvite_callee_bye), which check every translation on both sides.

TLS: Debian's sipp is built without OpenSSL (`-t l1` answers "To use a TLS transport you must
compile SIPp with OpenSSL"), so for the TLS-only proxy the caller's SIPp talks TCP to a socat
next to it that speaks TLS with the proxy: socat presents the peer certificate of a test CA
made in the test and verifies the proxy's, the proxy requires and verifies socat's. TLS on both
legs, and the wire itself, are checked with Python sockets in test_stream_legs.py.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.procs import (
    ProxyProcess,
    free_port,
    run_sipp,
    server_counts,
    sipp_server,
    start_proxy,
    wait_tcp_listening,
    write_config,
)
from tests.integration.test_call_flows import COMMON_SIPP, CallPlan, write_plans
from tests.tlsca import LoopbackPki, make_test_pki

X1, A1, B1 = "700100000000001", "13800000001", "13900000001"
X2, A2, B2 = "700100000000002", "13800000002", "13900000002"
PLANS = [CallPlan(A1, X1, B1, 1), CallPlan(B2, X2, A2, 2), CallPlan(A2, X2, B2, 3),
         CallPlan(B1, X1, A1, 4)]
SCENARIOS = {"caller": ("uac_reinvite.xml", "uas_reinvite.xml"),
             "callee": ("uac_reinvite_callee_bye.xml", "uas_reinvite_callee_bye.xml")}


def start(tmp_path: Path, started: list[ProxyProcess], *, listen: str, gateway: str,
          overrides: dict | None = None) -> ProxyProcess:
    port = free_port()
    cfg_dir = tmp_path / f"proxy-{port}"
    cfg_dir.mkdir()
    path, config = write_config(cfg_dir, port=port, gateway_port=0, overrides={
        "workers": 2, "listen": [f"{listen}:127.0.0.1:{port}"],
        "carrier": {"gateways": [gateway]}, "logging": {"level": "info"}, **(overrides or {})})
    proxy = start_proxy(path, port, 0, cfg_dir / "proxy.log", config)
    started.append(proxy)
    wait_tcp_listening(port)
    return proxy


def sipp_calls(workdir: Path, hangup: str, *, caller_to: int, callee_port: int) -> None:
    """Run the scenario pair for `hangup` over TCP on both legs: the callee SIPp on
    `callee_port`, the caller SIPp towards `caller_to`; assert both legs' outcome."""
    caller_xml, callee_xml = SCENARIOS[hangup]
    caller_csv, callee_csv = write_plans(workdir, PLANS)
    calls = len(PLANS)
    with sipp_server(callee_xml, callee_port, workdir, calls=calls, csv=callee_csv,
                     transport="t1", extra=["-infindex", "callee.csv", "0", *COMMON_SIPP]
                     ) as server:
        result = run_sipp(caller_xml, f"127.0.0.1:{caller_to}", free_port(), workdir,
                          calls=calls, rate=5, csv=caller_csv, transport="t1",
                          extra=[*COMMON_SIPP, "-d", "100"], timeout=90)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=20)
    ok, failed = server_counts(callee_xml, callee_port, workdir)
    assert result.returncode == 0 and result.successful == calls and result.failed == 0, \
        str(result)
    assert (ok, failed) == (calls, 0), (ok, failed, str(result))


@pytest.mark.parametrize("hangup", ["caller", "callee"])
def test_sipp_tcp_only_listener_full_calls(tmp_path: Path, proxies: list[ProxyProcess],
                                           hangup: str) -> None:
    """listen: tcp only, a TCP gateway, SIPp -t t1 on both legs, two workers: every call
    completes on both legs — INVITE, ACK, both re-INVITEs, the BYE — and SIPp's checks of the
    translation pass."""
    gw = free_port()
    proxy = start(tmp_path, proxies, listen="tcp",
                  gateway=f"sip:127.0.0.1:{gw};transport=tcp")
    sipp_calls(tmp_path, hangup, caller_to=proxy.port, callee_port=gw)
    stats = proxy.stop_and_read_stats()
    assert stats.get("calls_routed") == len(PLANS), stats


@contextlib.contextmanager
def socat(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["socat", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LoopbackPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize("hangup", ["caller", "callee"])
def test_sipp_tls_only_listener_full_calls_through_socat(
    tmp_path: Path, proxies: list[ProxyProcess], pki: LoopbackPki, hangup: str
) -> None:
    """listen: tls only, verify_clients: required, everything signed by the test CA; the
    caller's SIPp (TCP) reaches the proxy through socat (TLS, with the test CA's peer
    certificate), the gateway is SIPp over TCP: every call completes on both legs, with the
    caller's re-INVITE and BYE down the TLS connection socat opened, and the double
    Record-Route (tls / tcp) followed by both SIPps.

    The gateway leg is TCP here, not TLS through a second socat: the callee SIPp's Contact names
    its own TCP port behind socat, which no TLS connection can reach (a real TLS gateway's
    Contact names its TLS address). TLS on both legs is test_stream_legs.py's, with Python
    sockets."""
    if shutil.which("socat") is None:
        pytest.fail("socat is not installed: run scripts/test, which installs it")
    gw, tls_in = free_port(), free_port()
    proxy = start(tmp_path, proxies, listen="tls",
                  gateway=f"sip:127.0.0.1:{gw};transport=tcp",
                  overrides={"transport": {"tls": {
                      "certificate_file": str(pki.proxy.cert),
                      "private_key_file": str(pki.proxy.key), "ca_file": str(pki.ca),
                      "verify_clients": "required"}}})
    peer = f"cert={pki.peer.cert},key={pki.peer.key},cafile={pki.ca}"
    with socat(f"TCP-LISTEN:{tls_in},bind=127.0.0.1,reuseaddr,fork",
               f"OPENSSL:127.0.0.1:{proxy.port},{peer},verify=1,commonname=127.0.0.1"):
        wait_tcp_listening(tls_in)
        sipp_calls(tmp_path, hangup, caller_to=tls_in, callee_port=gw)
    stats = proxy.stop_and_read_stats()
    assert stats.get("calls_routed") == len(PLANS), stats
    assert not stats.get("tls_handshake_failed"), stats
