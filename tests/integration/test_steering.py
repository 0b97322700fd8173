"""One worker takes every new call while the load is low (proxy/steering.py), and the calls in
progress when the kernel's choice changes still end where they are held.

Real processes: the proxy (`python -m proxy run`, memory store, `workers: 2`); A and B are
plain UDP sockets driven byte by byte (tests/integration/rawsip.py), B bound on the carrier
gateway's port. A sends everything to the shared port, as SIPp does, so what the kernel picks
decides which worker gets A's CANCEL and its ACK: after a change, the worker that does not
hold the call must pass them to the one that does.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from proxy import steering as steering_module
from proxy.sip.message import parse_message
from tests.integration.procs import (
    ProxyProcess,
    free_port,
    free_port_range,
    start_proxy,
    write_config,
)
from tests.integration.rawsip import (
    Peer,
    ack_failure,
    answer_call,
    describe,
    is_request,
    is_response,
    start_call,
)
from tests.integration.test_operations import metric
from tests.integration.test_transport_limits import wait_tcp_listening
from tests.integration.test_worker_ports import via_port

CALLS = 24
LOW_LOAD = {"enabled": True, "enter_percent": 99.0, "leave_percent": 100.0, "hold_s": 2.0}


def start(tmp_path: Path, proxies: list[ProxyProcess], gateway_port: int,
          low_load: dict, metrics_port: int | None = None) -> tuple[ProxyProcess, int]:
    port = free_port()
    cfg_dir = tmp_path / f"proxy-{port}"
    cfg_dir.mkdir()
    overrides: dict = {"workers": 2, "logging": {"level": "info"},
                       "transport": {"low_load": low_load}}
    if metrics_port is not None:  # worker i: metrics_port + i
        overrides["metrics"] = {"listen": f"127.0.0.1:{metrics_port}"}
    path, config = write_config(cfg_dir, port=port, gateway_port=gateway_port,
                                overrides=overrides)
    proxy = start_proxy(path, port, gateway_port, cfg_dir / "proxy.log", config)
    proxies.append(proxy)
    wait_tcp_listening(port)
    return proxy, config["transport"]["worker_port_base"]


def steering(proxy: ProxyProcess) -> list[dict]:
    return [json.loads(ln) for ln in proxy.log_lines() if '"udp_steering"' in ln]


def wait_steering(proxy: ProxyProcess, count: int, timeout: float = 15.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(got := steering(proxy)) < count:
        assert time.monotonic() < deadline, f"steering changes: {got}"
        time.sleep(0.05)
    return got


def ring(proxy: ProxyProcess, a: Peer, b: Peer) -> tuple[bytes, object, int]:
    """A's INVITE reaches B, which rings: (A's INVITE, B's copy, the worker port it came by)."""
    _, sent = start_call(proxy.port, a, b)
    inv = b.wait(is_request("INVITE"))
    assert inv is not None, f"the INVITE never reached B; A got {describe(a.pending)}"
    b.answer(inv, 180, "Ringing", to_tag=f"b{time.monotonic_ns()}", record_route=True,
             headers=[("Contact", f"<sip:b@127.0.0.1:{b.port}>")])
    assert a.wait(is_response(180)) is not None, describe(a.pending)
    return sent, inv, via_port(inv.msg.header_values("via")[0])


def cancel_of(invite: bytes) -> bytes:
    """A's CANCEL of its INVITE (RFC 3261 §9.1): the same Via, From, To, Call-ID, CSeq number."""
    msg = parse_message(invite)
    keep = [row for name, row in msg.rows if name in ("via", "from", "to", "call-id")]
    lines = [f"CANCEL {msg.uri_text} SIP/2.0".encode(), *keep,
             f"CSeq: {msg.cseq[0]} CANCEL".encode(), b"Max-Forwards: 70",
             b"Content-Length: 0", b"", b""]
    return b"\r\n".join(lines)


def cancel_all(proxy: ProxyProcess, a: Peer, b: Peer, ringing: list) -> None:
    """A cancels every ringing call through the shared port: each gets the proxy's 200, B the
    CANCEL (answered 200, its INVITE 487), A the 487, which A acknowledges: nothing left."""
    shared = ("127.0.0.1", proxy.port)
    for sent, inv, _ in ringing:
        a.send(cancel_of(sent), shared)
        call_id = parse_message(sent).call_id
        ok = a.wait(lambda m, c=call_id: not m.is_request and m.call_id == c
                    and m.cseq[1] == "CANCEL")
        assert ok is not None and ok.msg.status == 200, (ok and str(ok), describe(a.pending))
        cancel = b.wait(lambda m, c=inv.msg.call_id: m.is_request and m.method == "CANCEL"
                        and m.call_id == c)
        assert cancel is not None, f"the CANCEL never reached B: {describe(b.pending)}"
        b.answer(cancel, 200, "OK")
        b.answer(inv, 487, "Request Terminated", to_tag="b487")
        final = a.wait(lambda m, c=call_id: not m.is_request and m.call_id == c
                       and m.status == 487)
        assert final is not None, f"no 487 for A: {describe(a.pending)}"
        ack_failure(a, sent, final, shared)
    # the proxy's ACK for each 487 reaches B; no 487 is sent to A again (its ACK was taken)
    acks = [got for got in b.quiet(1.5) if got.msg.is_request and got.msg.method == "ACK"]
    assert len(acks) == len(ringing), describe(b.pending)
    again = [got for got in a.quiet(0.1) if not got.msg.is_request and got.msg.status == 487]
    assert again == [], describe(again)


def test_at_low_load_one_worker_takes_new_calls_and_the_others_calls_end_where_they_are(
        tmp_path: Path, proxies: list[ProxyProcess]) -> None:
    """Calls ringing on both workers when one worker starts taking everything: their CANCELs
    and ACKs, which the kernel now gives to worker 0, still reach the worker of their call.
    Then every new call is worker 0's."""
    a, b = Peer(name="A"), Peer(name="B")
    mport = free_port_range(2, avoid=(a.port, b.port))
    try:
        proxy, base = start(tmp_path, proxies, b.port, LOW_LOAD, mport)
        assert [metric(mport + w, "sip700_udp_single_worker") for w in (0, 1)] == [0.0, 0.0]
        ringing = [ring(proxy, a, b) for _ in range(CALLS)]
        assert {port for _, _, port in ringing} == {base, base + 1}  # spread
        [change] = wait_steering(proxy, 1)
        seen = time.monotonic()
        assert change["mode"] == "single" and change["reason"] == "load", change
        time.sleep(0.2)  # SWITCH_DELAY_S: the program is attached after the board says so
        assert [metric(mport + w, "sip700_udp_single_worker") for w in (0, 1)] == [1.0, 1.0]
        cancel_all(proxy, a, b, ringing)
        # past the INVITE window, in which a new INVITE still goes where the Call-ID program
        # would have sent it (it may be a retransmission of one of that worker's calls)
        time.sleep(max(0.0, seen + steering_module.INVITE_WINDOW_S + 0.3 - time.monotonic()))
        ports = set()
        for _ in range(CALLS):
            dialog, _ = start_call(proxy.port, a, b)
            answer_call(dialog)
            assert dialog.invite_at_b is not None
            ports.add(via_port(dialog.invite_at_b.msg.header_values("via")[0]))
            dialog.bye_from_a()
            assert a.log[-1].msg.status == 200, describe(dialog.a_received())
        assert ports == {base}, ports
    finally:
        a.close()
        b.close()
    stats = proxy.stop_and_read_stats()
    on_worker_1 = sum(port == base + 1 for _, _, port in ringing)
    # each of worker 1's calls: its CANCEL and its ACK, handed from worker 0 (and its INVITE
    # too when it came within INVITE_WINDOW_S of the change)
    assert on_worker_1 > 0 and stats.get("handed_off", 0) >= 2 * on_worker_1, stats
    assert stats.get("calls_routed") == 2 * CALLS, stats


def test_a_worker_restarting_spreads_calls_again_and_worker_0s_calls_end_there(
        tmp_path: Path, proxies: list[ProxyProcess]) -> None:
    """In single mode every call rings on worker 0; worker 1 is killed and restarts, which
    spreads new datagrams over both again: the CANCELs and ACKs the kernel now gives worker 1
    are passed to worker 0, which holds their calls."""
    a, b = Peer(name="A"), Peer(name="B")
    try:
        proxy, base = start(tmp_path, proxies, b.port, LOW_LOAD)
        for _ in range(12):  # traffic for both workers: each learns its socket from it
            dialog, _ = start_call(proxy.port, a, b)
            answer_call(dialog)
            dialog.bye_from_a()
        wait_steering(proxy, 1)
        time.sleep(steering_module.INVITE_WINDOW_S + 0.3)  # see the test above
        ringing = [ring(proxy, a, b) for _ in range(CALLS)]
        assert {port for _, _, port in ringing} == {base}
        worker_1 = sorted(proxy.worker_pids())[1]  # forked second: worker 1
        os.kill(worker_1, signal.SIGKILL)
        changes = wait_steering(proxy, 2)
        assert changes[1]["mode"] == "spread" and changes[1]["reason"] == "worker_started"
        assert changes[1]["worker"] == 1, changes
        cancel_all(proxy, a, b, ringing)
    finally:
        a.close()
        b.close()
    stats = proxy.stop_and_read_stats()
    # worker 1's share of the CANCELs and ACKs (one each a call), passed by the new worker 1
    assert stats.get("handed_off", 0) > 0 and stats["handed_off"] % 2 == 0, stats
