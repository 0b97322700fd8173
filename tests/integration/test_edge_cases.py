"""Security and robustness at the edges: untrusted peers, wrong numbers, torture messages, junk,
TCP, a proxy restart in mid-call, a tampered dialog token.

Real processes: the proxy (`python -m proxy run`, memory store), SIPp callers and callees
(scripts/sipp/), and plain Python UDP/TCP sockets on loopback for the messages SIPp cannot send.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import re
import selectors
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.privacy import DialogRule, DialogSealer
from tests.integration.procs import (
    ROOT,
    ProxyProcess,
    free_port,
    run_sipp,
    server_counts,
    sipp_args,
    sipp_server,
)
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

REJECT = "uac_expect_reject.xml"
RFC4475 = ROOT / "tests" / "data" / "rfc4475"


def sipp_stat(workdir: Path, scenario: str, port: int, column: str) -> int:
    """A cumulative counter from a finished SIPp's -trace_stat file (e.g. TotalCallCreated)."""
    lines = (workdir / f"{scenario}.{port}.stat.csv").read_text().splitlines()
    header, last = lines[0].split(";"), lines[-1].split(";")
    return int(dict(zip(header, last, strict=False))[column])


def reject_keys(ruri: str, status: str, caller: str = A) -> list[str]:
    """SIPp -key arguments of uac_expect_reject.xml."""
    return ["-key", "ruri", ruri, "-key", "a", caller, "-key", "status", status]


def normal_call(proxy: ProxyProcess, workdir: Path, transport: str = "u1",
                hold_ms: int = 0) -> None:
    """One A → X → B call through `proxy` with every privacy check; asserts both legs."""
    with sipp_server(CALLEE, proxy.gateway_port, workdir, transport=transport,
                     extra=callee_keys(B, X)):
        result = run_sipp(CALLER, f"127.0.0.1:{proxy.port}", free_port(), workdir,
                          transport=transport,
                          extra=[*caller_keys(*FORMS["national"], A, X), "-d", str(hold_ms)])
        time.sleep(0.2)
    assert_private_call(result, server_counts(CALLEE, proxy.gateway_port, workdir), workdir)


def stop_and_read_stats(proxy: ProxyProcess) -> dict[str, int]:
    """Stop the proxy; its counters (summed over its workers)."""
    stats = proxy.stop_and_read_stats()
    assert proxy.proc.returncode in (0, -15)
    return stats


# ---- untrusted peers, numbers that are not middle numbers -------------------------------------

def test_untrusted_source_gets_403_and_reaches_nobody(
    start_sip700: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    """A caller on 127.0.0.2 (trusted_peers is 127.0.0.1/32): 403, the carrier leg gets nothing."""
    proxy = start_sip700()
    with sipp_server(CALLEE, proxy.gateway_port, tmp_path, extra=callee_keys(B, X)):
        result = run_sipp(REJECT, f"127.0.0.1:{proxy.port}", free_port(host="127.0.0.2"),
                          tmp_path, local_ip="127.0.0.2",
                          extra=reject_keys(f"sip:{X}@127.0.0.1", "403 Untrusted Peer"))
        time.sleep(0.3)  # would anything have been forwarded, it has arrived by now
    assert result.returncode == 0 and result.successful == 1, result
    assert server_counts(CALLEE, proxy.gateway_port, tmp_path) == (0, 0)
    assert sipp_stat(tmp_path, CALLEE, proxy.gateway_port, "TotalCallCreated") == 0
    assert sipp_stat(tmp_path, CALLEE, proxy.gateway_port, "OutOfCallMsgs(C)") == 0
    assert any("untrusted peer" in ln for ln in proxy.log_lines())


@pytest.mark.parametrize(("overrides", "status"), [
    ({}, "404 Not A Middle Number"),
    ({"responses": {"not_middle_number": {"code": 484, "reason": "Dial A 700 Number"}}},
     "484 Dial A 700 Number"),
])
def test_request_uri_not_a_middle_number(
    start_sip700: Callable[..., ProxyProcess], tmp_path: Path, overrides: dict, status: str
) -> None:
    """A landline, a 14-digit 700 number, a 17-digit one: refused with the configured reply."""
    proxy = start_sip700(overrides=overrides)
    with sipp_server(CALLEE, proxy.gateway_port, tmp_path, extra=callee_keys(B, X)):
        for ruri in ("sip:01012345678@127.0.0.1", "sip:70010000000000@127.0.0.1",
                     "tel:+86-700-1000-0000-00011"):
            result = run_sipp(REJECT, f"127.0.0.1:{proxy.port}", free_port(), tmp_path,
                              extra=reject_keys(ruri, status))
            assert result.returncode == 0 and result.successful == 1, f"{ruri}: {result}"
        time.sleep(0.2)
    assert sipp_stat(tmp_path, CALLEE, proxy.gateway_port, "TotalCallCreated") == 0


# ---- malformed input over real sockets ---------------------------------------------------------

# RFC 4475 messages → the status codes RFC 4475 allows (None: no answer). Where the RFC lets a
# liberal proxy accept the message, accepting it ends in 404 (no Request-URI here is a 700 number).
TORTURE_EXPECTED: dict[str, set[int | None]] = {
    # invalid (RFC 4475 §3.1.2)
    "clerr.dat": {400}, "ncl.dat": {400}, "scalar02.dat": {400}, "quotbal.dat": {400, 404},
    "ltgtruri.dat": {400, 404}, "lwsruri.dat": {400, 404}, "lwsstart.dat": {400, 404},
    "trws.dat": {400, 404}, "escruri.dat": {400, 404}, "baddate.dat": {404},
    "regbadct.dat": {400, 404}, "badaspec.dat": {400, 404}, "baddn.dat": {400, 404},
    "badvers.dat": {505}, "mismatch01.dat": {400}, "mismatch02.dat": {400, 501},
    # badinv01's only Via is unreadable: 400 if the proxy answers the source address, else drop
    "badinv01.dat": {400, None},
    # semantic (§3.2, §3.3)
    "badbranch.dat": {400, 404}, "insuf.dat": {400}, "unkscm.dat": {416},
    "novelsc.dat": {416, 404}, "bext01.dat": {420}, "multi01.dat": {400}, "mcl01.dat": {400},
    "zeromf.dat": {483}, "unksm2.dat": {404}, "invut.dat": {404}, "regaut01.dat": {404},
    "cparam01.dat": {404}, "cparam02.dat": {404}, "regescrt.dat": {404}, "sdp01.dat": {404},
    # valid requests (§3.1.1, §3.4): parsed, then refused as not a middle number
    "intmeth.dat": {404}, "esc01.dat": {404}, "escnull.dat": {404}, "esc02.dat": {404},
    "lwsdisp.dat": {404}, "longreq.dat": {404}, "dblreq.dat": {404}, "semiuri.dat": {404},
    "transports.dat": {404}, "mpart01.dat": {404}, "inv2543.dat": {404},
    "wsinv.dat": {481},  # carries a To tag: in-dialog, and no dialog of ours
    # responses nobody asked for: dropped, never forwarded (bcast's Via is a broadcast address)
    "bigcode.dat": {None}, "scalarlg.dat": {None}, "bcast.dat": {None},
    "noreason.dat": {None}, "unreason.dat": {None},
}
# The messages' Vias name other hosts; answers go to our source address at the sent-by port
# (RFC 3261 §18.2.2), 5060 by default, 5050 for quotbal, 5061 (TLS) for bext01. Sending from
# 127.0.0.3:5060 receives them without touching the messages.
TORTURE_SOURCE = "127.0.0.3"
TORTURE_PORTS = (5060, 5050, 5061)


def _call_id(message: bytes) -> bytes | None:
    m = re.search(rb"(?im)^(?:call-id|i)[ \t]*:[ \t]*(\S+)", message)
    return m.group(1) if m else None


def _answers(sel: selectors.BaseSelector, call_id: bytes | None, wait: float) -> list[int]:
    """Status codes of the responses to `call_id` arriving within `wait` seconds."""
    codes: list[int] = []
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        for key, _ in sel.select(left):
            data = key.fileobj.recv(70000)  # type: ignore[union-attr]
            m = re.match(rb"SIP/2\.0 (\d{3}) ", data)
            if m and _call_id(data) == call_id:
                codes.append(int(m.group(1)))
                deadline = min(deadline, time.monotonic() + 0.05)  # catch a duplicate answer
    return codes


def test_rfc4475_torture_messages(
    start_sip700: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    """All 49 RFC 4475 messages over UDP: answered as the RFC allows, nothing reaches the carrier
    leg, and the proxy then routes a normal call."""
    proxy = start_sip700(overrides={"trusted_peers": ["127.0.0.0/8"]})
    sel = selectors.DefaultSelector()
    socks = []
    for port in TORTURE_PORTS:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind((TORTURE_SOURCE, port))
        except OSError as exc:
            pytest.fail(f"cannot bind {TORTURE_SOURCE}:{port} to receive answers: {exc}")
        socks.append(s)
        sel.register(s, selectors.EVENT_READ)
    carrier = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    carrier.bind(("127.0.0.1", proxy.gateway_port))
    carrier.setblocking(False)
    try:
        assert sorted(TORTURE_EXPECTED) == sorted(p.name for p in RFC4475.glob("*.dat"))
        wrong = {}
        for name, allowed in sorted(TORTURE_EXPECTED.items()):
            data = (RFC4475 / name).read_bytes()
            socks[0].sendto(data, ("127.0.0.1", proxy.port))
            codes = _answers(sel, _call_id(data), 0.25 if None in allowed else 2.0)
            got = codes[0] if len(codes) == 1 else (None if not codes else tuple(codes))
            if got not in allowed:
                wrong[name] = (got, allowed)
        assert not wrong, f"(got, allowed) per message: {wrong}"
        with pytest.raises(BlockingIOError):
            carrier.recv(70000)  # nothing was forwarded
    finally:
        carrier.close()
        for s in socks:
            s.close()
    assert proxy.proc.poll() is None, "the proxy died"
    normal_call(proxy, tmp_path)


def _invite(x: str, via_port: int, pad: int = 0, n: int = 0) -> bytes:
    """INVITE n (its branch and Call-ID) to `x`, with `pad` bytes of filler header."""
    body = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    return (
        f"INVITE sip:{x}@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{via_port};branch=z9hG4bKjunk{n:08d}\r\n"
        f"From: <sip:{A}@127.0.0.1>;tag=junk\r\nTo: <sip:{x}@127.0.0.1>\r\n"
        f"Call-ID: junk-{n:08d}@127.0.0.1\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n"
        + (f"X-Pad: {'a' * pad}\r\n" if pad else "")
        + f"Content-Type: application/sdp\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def test_oversize_and_garbage_are_dropped(
    start_sip700: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    """A datagram over max_message_bytes, a 70 KB message over TCP, 500 junk datagrams: dropped,
    no crash, and the proxy still routes a normal call."""
    proxy = start_sip700(overrides={"transport": {"max_message_bytes": 16384}})
    rng = random.Random(4475)
    unbound_x = "700100000000009"  # junk that parses must not reach the carrier leg either
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        me = s.getsockname()[1]
        # the largest UDP payload IPv4 carries (70 KB cannot be one datagram); limit is 16 KB
        big = _invite(X, me, pad=65507 - len(_invite(X, me)) - len("X-Pad: \r\n"), n=1)
        assert len(big) == 65507
        s.sendto(big, ("127.0.0.1", proxy.port))
        s.settimeout(0.5)
        with pytest.raises(TimeoutError):
            s.recv(70000)  # dropped unanswered: neither 100 Trying nor a rejection
        valid = _invite(unbound_x, me, n=2)
        stray = b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKs7x\r\n\r\n"
        junk: list[bytes] = [b"", b"\r\n\r\n", b"\x00" * 100, b"SIP/2.0", b"INVITE", stray]
        junk += [rng.randbytes(rng.randrange(1, 1500)) for _ in range(250)]
        for _ in range(250):  # a valid INVITE with random bytes overwritten, cut or repeated
            m = bytearray(valid)
            for _ in range(rng.randrange(1, 8)):
                m[rng.randrange(len(m))] = rng.randrange(256)
            if rng.random() < 0.3:
                m = m[: rng.randrange(len(m))]
            if rng.random() < 0.2:
                m = m + m
            junk.append(bytes(m))
        for datagram in junk:
            s.sendto(datagram, ("127.0.0.1", proxy.port))
        time.sleep(0.5)
    # whatever it answers first, the proxy must close a stream it cannot frame; a timeout here
    # means it kept the connection open
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as tcp, \
            contextlib.suppress(ConnectionResetError, BrokenPipeError):
        tcp.sendall(_invite(X, me, pad=70 * 1024, n=3))
        while tcp.recv(70000):
            pass
    assert proxy.proc.poll() is None, "the proxy died"
    normal_call(proxy, tmp_path)
    stats = stop_and_read_stats(proxy)
    assert stats.get("oversize_dropped") == 1, stats
    assert stats.get("malformed", 0) >= 250, stats
    assert stats.get("calls_routed") == 1, stats  # junk never became a call


# ---- TCP ---------------------------------------------------------------------------------------

def test_call_over_tcp(start_sip700: Callable[..., ProxyProcess], tmp_path: Path) -> None:
    """Caller → proxy and proxy → carrier leg over TCP (SIPp -t t1), every privacy check."""
    gateway_port = free_port()
    proxy = start_sip700(gateway_port=gateway_port, overrides={
        "carrier": {"gateways": [f"sip:127.0.0.1:{gateway_port};transport=tcp"]}})
    normal_call(proxy, tmp_path, transport="t1")
    assert any('"routed"' in ln for ln in proxy.log_lines())


# ---- the dialog token: restart survival, tampering ----------------------------------------------

def _wait_for(path: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float = 10) -> str:
    """Wait until SIPp's message log holds `pattern` (a regexp); returns the log text."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if re.search(pattern, text, re.M):
            return text
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} never appeared in {path}")


def _start_caller(proxy: ProxyProcess, workdir: Path, hold_ms: int) -> tuple[
        subprocess.Popen[bytes], int, Path]:
    port = free_port()
    log = workdir / "caller_messages.log"
    args = sipp_args(CALLER, remote=f"127.0.0.1:{proxy.port}", local_port=port, workdir=workdir,
                     extra=[*caller_keys(*FORMS["national"], A, X), "-d", str(hold_ms),
                            "-trace_msg", "-message_file", str(log)])
    proc = subprocess.Popen(args, cwd=workdir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return proc, port, log


def _finish(proc: subprocess.Popen[bytes]) -> int:
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        proc.wait()
        raise AssertionError("the caller did not finish") from None


def test_dialog_survives_a_proxy_restart(
    start_sip700: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    """With privacy.dialog_key set, a call set up by one proxy process is hung up through the
    next one (same port), with the same rewrite: the rule travels in the Record-Route token."""
    proxy = start_sip700()
    callee_log = tmp_path / "callee_messages.log"
    with sipp_server(CALLEE, proxy.gateway_port, tmp_path,
                     extra=[*callee_keys(B, X), "-trace_msg", "-message_file", str(callee_log)]):
        # held long enough for a stop and a start that waits for every worker (and, on
        # Redis, imports the bindings again) on a busy machine
        caller, caller_port, caller_log = _start_caller(proxy, tmp_path, hold_ms=10000)
        _wait_for(caller_log, r"^ACK sip:", caller)
        first_pid = proxy.proc.pid
        assert proxy.stop() in (0, -15)
        restarted = start_sip700(port=proxy.port, gateway_port=proxy.gateway_port)
        assert restarted.proc.pid != first_pid
        assert caller.poll() is None, "the call ended before the restart"
        rc = _finish(caller)
        time.sleep(0.2)
    caller_counts = server_counts(CALLER, caller_port, tmp_path)
    assert rc == 0 and caller_counts == (1, 0), (rc, caller_counts)
    assert server_counts(CALLEE, proxy.gateway_port, tmp_path) == (1, 0)
    assert callee_log.read_text().count("\nBYE sip:") == 1


def _tampered(token: str) -> str:
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[20] ^= 0x01  # one bit of the ciphertext
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


def _bye_from(ack: str, route: str, via_port: int, cseq: int) -> bytes:
    """A BYE in the caller's dialog built from the ACK it sent, with our own Via and Route."""
    lines = ack.split("\n")
    keep = [ln for ln in lines[1:] if ln.split(":", 1)[0].lower() in ("from", "to", "call-id")]
    return "\r\n".join([
        lines[0].replace("ACK ", "BYE ", 1),
        f"Via: SIP/2.0/UDP 127.0.0.1:{via_port};branch=z9hG4bKforged{cseq};rport",
        f"Route: {route}", *keep, f"CSeq: {cseq} BYE", "Max-Forwards: 70",
        "Content-Length: 0", "", "",
    ]).encode()


def test_tampered_or_forged_dialog_token_gets_403(
    start_sip700: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    """A BYE whose s7 token has one bit flipped, or was sealed with another key to reach another
    number, gets 403 and never reaches the callee; the real BYE then ends the call normally."""
    proxy = start_sip700()
    callee_log = tmp_path / "callee_messages.log"
    with sipp_server(CALLEE, proxy.gateway_port, tmp_path,
                     extra=[*callee_keys(B, X), "-trace_msg", "-message_file", str(callee_log)]):
        caller, caller_port, caller_log = _start_caller(proxy, tmp_path, hold_ms=2000)
        text = _wait_for(caller_log, r"^ACK sip:", caller)
        ack = text[text.index("ACK sip:"):].split("\n\n")[0].replace("\r", "")
        route = re.search(r"^Route: (<[^>]*;s7=([A-Za-z0-9_-]+)>)", ack, re.M)
        assert route is not None, ack
        token = route.group(2)
        other_key = DialogSealer(os.urandom(32))
        forged = other_key.seal(DialogRule(X, A, "13900000002", A, "attacker"))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            s.settimeout(2)
            for n, bad in enumerate((_tampered(token), forged, token[:-4]), start=10):
                bye = _bye_from(ack, route.group(1).replace(token, bad), s.getsockname()[1], n)
                s.sendto(bye, ("127.0.0.1", proxy.port))
                answer = s.recv(70000)
                assert answer.startswith(b"SIP/2.0 403 Invalid Dialog Token\r\n"), answer
        rc = _finish(caller)
        time.sleep(0.2)
    assert rc == 0 and server_counts(CALLER, caller_port, tmp_path) == (1, 0)
    assert server_counts(CALLEE, proxy.gateway_port, tmp_path) == (1, 0)
    assert callee_log.read_text().count("\nBYE sip:") == 1  # only the caller's real BYE
    assert sum("dialog token failed authentication" in ln for ln in proxy.log_lines()) == 3
