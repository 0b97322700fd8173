"""Each worker's own port: what follows a call comes straight back to the worker that holds it.

Real processes: the proxy (`python -m proxy run`, memory store, `workers: 2` or `workers: 1`);
A and B are plain UDP sockets driven byte by byte (tests/integration/rawsip.py), B bound on the
carrier gateway's port; plain TCP sockets for the TCP side of the worker ports.

With `workers: 2`, worker i listens on transport.worker_port_base + i as well as on the shared
port, and names its own port in its Via and Record-Route: the responses and the dialog's ACK
and BYE, sent where the Via and the Record-Route say, are never relayed. On the shared port the
kernel picks the worker by Call-ID (proxy/spread.py), so what one caller sends there stays
with its call too. Before worker ports, about half of all messages of a call crossed.
"""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import pytest

from proxy.sip.address import parse_name_addr
from tests.integration.procs import (
    ProxyProcess,
    free_port,
    port_taken,
    start_proxy,
    write_config,
)
from tests.integration.rawsip import (
    Peer,
    answer_call,
    describe,
    establish,
    is_request,
    is_response,
    start_call,
)
from tests.integration.test_transport_limits import (
    options_status,
    tcp_connect,
    wait_tcp_listening,
)

CALLS = 50


def start(tmp_path: Path, proxies: list[ProxyProcess], workers: int, gateway_port: int,
          *, low_load: bool = True) -> tuple[ProxyProcess, int]:
    """A proxy with `workers`; returns it and its transport.worker_port_base. `low_load`:
    transport.low_load.enabled (one worker takes every new call while the load is low)."""
    port = free_port()
    cfg_dir = tmp_path / f"proxy-{port}"
    cfg_dir.mkdir()
    path, config = write_config(cfg_dir, port=port, gateway_port=gateway_port, overrides={
        "workers": workers, "logging": {"level": "info"},
        "transport": {"low_load": {"enabled": low_load}}})
    proxy = start_proxy(path, port, gateway_port, cfg_dir / "proxy.log", config)
    proxies.append(proxy)
    wait_tcp_listening(port)
    return proxy, config["transport"]["worker_port_base"]


def via_port(via: str) -> int:
    sent_by = via.split(None, 1)[1].split(";", 1)[0]
    return int(sent_by.rsplit(":", 1)[1])


def route_address(route: str) -> tuple[str, int]:
    uri = parse_name_addr(route, "Route").uri
    return uri.host, uri.port or 5060


def test_two_workers_each_call_follows_one_worker_port_without_relay(
    tmp_path: Path, proxies: list[ProxyProcess]
) -> None:
    """50 calls A → X → B with workers: 2. B gets each INVITE from a worker's own port, with
    that port in the top Via and the Record-Route; A gets the answers from the shared port; A
    sends ACK and BYE (B, every other call) to the Record-Route's port, as RFC 3261 §12 says.
    Both worker ports carry calls, every call completes, and the workers relay no more
    messages than there were INVITEs (only an INVITE that landed on the other worker)."""
    b = Peer(name="B")
    a = Peer(name="A")
    try:
        proxy, base = start(tmp_path, proxies, 2, b.port)
        shared = ("127.0.0.1", proxy.port)
        worker_ports = {base, base + 1}
        used: set[int] = set()
        for i in range(CALLS):
            dialog, _ = start_call(proxy.port, a, b)
            answer_call(dialog, ack=False)
            inv = dialog.invite_at_b
            assert inv is not None
            port = via_port(inv.msg.header_values("via")[0])
            assert port in worker_ports, inv.msg.header_values("via")
            assert inv.addr == ("127.0.0.1", port), "the INVITE left from another socket"
            assert [route_address(r) for r in dialog.b_routes] == [("127.0.0.1", port)]
            assert dialog.ok_at_a is not None and dialog.ok_at_a.addr == shared
            assert [route_address(r) for r in dialog.a_routes] == [("127.0.0.1", port)]
            used.add(port)
            dialog.proxy = ("127.0.0.1", port)  # the route set's first hop (RFC 3261 §12.2.1.1)
            dialog.ack_from_a()
            if i % 2 == 0:
                dialog.bye_from_a()
                assert a.log[-1].msg.status == 200, describe(dialog.a_received())
            else:
                dialog.request_from_b("BYE")
                bye = a.wait(is_request("BYE"))
                assert bye is not None, f"B's BYE never reached A; A got {describe(a.pending)}"
                a.answer(bye, 200, "OK")
                assert b.wait(is_response(200, "BYE")) is not None, describe(b.pending)
        assert used == worker_ports, f"the calls used worker ports {used} of {worker_ports}"
    finally:
        a.close()
        b.close()
    stats = proxy.stop_and_read_stats()
    assert stats.get("calls_routed") == CALLS, stats
    # an INVITE lands on the shared port's other worker half the time; nothing else crosses
    assert stats.get("relayed", 0) <= CALLS, stats


def test_a_response_sent_to_the_other_workers_port_still_reaches_its_transaction(
    tmp_path: Path, proxies: list[ProxyProcess]
) -> None:
    """B answers each INVITE to the other worker's port (as SIPp does when an in-dialog request
    of a call came from a worker other than the one its INVITE came from): the response names
    its worker in the branch and is passed there, and A gets its 200."""
    b = Peer(name="B")
    a = Peer(name="A")
    try:
        proxy, base = start(tmp_path, proxies, 2, b.port)
        for _ in range(4):
            start_call(proxy.port, a, b)
            got = b.wait(is_request("INVITE"))
            assert got is not None, f"A's INVITE never reached B; A got {describe(a.pending)}"
            other = base + 1 if got.addr[1] == base else base
            inv = dataclasses.replace(got, addr=("127.0.0.1", other))
            b.answer(inv, 200, "OK", to_tag="b", record_route=True,
                     headers=[("Contact", f"<sip:b@127.0.0.1:{b.port}>")])
            ok = a.wait(is_response(200, "INVITE"))
            assert ok is not None, f"the 200 never reached A; A got {describe(a.pending)}"
    finally:
        a.close()
        b.close()
    assert proxy.stop_and_read_stats().get("relayed", 0) >= 4


def test_two_workers_listen_on_their_own_tcp_port_too(
    tmp_path: Path, proxies: list[ProxyProcess]
) -> None:
    """With a tcp listen entry, each worker's own port takes TCP as well: an OPTIONS sent there
    over TCP is answered by that worker."""
    _, base = start(tmp_path, proxies, 2, free_port())
    for port in (base, base + 1):
        wait_tcp_listening(port)
        conn = tcp_connect(port)
        try:
            assert options_status(conn) == "SIP/2.0 200 OK"
        finally:
            conn.close()


def test_one_worker_binds_no_port_of_its_own(tmp_path: Path, proxies: list[ProxyProcess]
                                             ) -> None:
    """workers: 1: the Via names the listen port, and worker_port_base stays unbound."""
    b = Peer(name="B")
    a = Peer(name="A")
    try:
        proxy, base = start(tmp_path, proxies, 1, b.port)
        dialog, _ = start_call(proxy.port, a, b)
        answer_call(dialog)
        assert dialog.invite_at_b is not None
        assert via_port(dialog.invite_at_b.msg.header_values("via")[0]) == proxy.port
        assert dialog.invite_at_b.addr == ("127.0.0.1", proxy.port)
        dialog.bye_from_a()
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            with socket.socket(socket.AF_INET, kind) as s:
                s.bind(("127.0.0.1", base))  # free: nothing bound it
    finally:
        a.close()
        b.close()


def test_a_worker_port_taken_after_the_draw_is_reported_as_a_port_to_draw_again(
    tmp_path: Path
) -> None:
    """The test harness's side of a port race: a TCP socket bound (not listening) on worker
    1's own port escapes the supervisor's check of the socket tables, so worker 1 fails to
    bind it. start_proxy reports that as a taken port, which start_sip700 draws again for,
    instead of handing back a proxy whose log holds an error (the test's teardown would fail).
    And a port handed out once is not handed out again while it may still be unbound."""
    gateway_port = free_port()
    port = free_port()
    assert port != gateway_port
    cfg_dir = tmp_path / "proxy"
    cfg_dir.mkdir()
    path, config = write_config(cfg_dir, port=port, gateway_port=gateway_port, overrides={
        "workers": 2, "logging": {"level": "info"},
        "transport": {"low_load": {"enabled": False}}})
    base = config["transport"]["worker_port_base"]
    drawn = {free_port() for _ in range(50)}
    assert not drawn & {port, gateway_port, base, base + 1, base + 2, base + 3}
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", base + 1))
        with pytest.raises(RuntimeError) as caught:
            start_proxy(path, port, gateway_port, cfg_dir / "proxy.log", config)
    assert port_taken(caught.value), str(caught.value)[-2000:]
    assert f"{base + 1}" in str(caught.value)
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", port))  # the proxy was stopped: its port is free again


def test_one_source_sending_everything_to_the_shared_port_is_spread_without_relay(
    tmp_path: Path, proxies: list[ProxyProcess]
) -> None:
    """A sends its INVITEs, ACKs and BYEs all to the shared port from one socket, as SIPp does
    (it ignores the Record-Route). The kernel hands each datagram to the worker its Call-ID
    names (proxy/spread.py): both workers carry calls and nothing crosses between them. B's
    BYE to the shared port (its Call-ID is the sealed one, so the kernel may pick the other
    worker) is passed to the worker its Route names, and reaches A."""
    b = Peer(name="B")
    a = Peer(name="A")
    try:
        # the Call-ID program alone (with transport.low_load one worker would soon take all)
        proxy, base = start(tmp_path, proxies, 2, b.port, low_load=False)
        modes = [json.loads(ln)["mode"] for ln in proxy.log_lines() if '"udp_spread"' in ln]
        assert modes == ["kernel_call_id", "kernel_call_id"], modes
        used: set[int] = set()
        for _ in range(CALLS):
            dialog, _ = start_call(proxy.port, a, b)
            answer_call(dialog, ack=False)
            assert dialog.invite_at_b is not None
            used.add(via_port(dialog.invite_at_b.msg.header_values("via")[0]))
            dialog.ack_from_a()  # dialog.proxy is the shared port
            dialog.bye_from_a()
            assert a.log[-1].msg.status == 200, describe(dialog.a_received())
        assert used == {base, base + 1}, f"the calls used worker ports {used}"
        for _ in range(10):
            dialog = establish(proxy.port, a, b)
            dialog.request_from_b("BYE")
            bye = a.wait(is_request("BYE"))
            assert bye is not None, f"B's BYE never reached A; A got {describe(a.pending)}"
            a.answer(bye, 200, "OK")
            assert b.wait(is_response(200, "BYE")) is not None, describe(b.pending)
    finally:
        a.close()
        b.close()
    stats = proxy.stop_and_read_stats()
    assert stats.get("calls_routed") == CALLS + 10, stats
    assert stats.get("relayed", 0) <= 10, stats  # B's BYEs only, at most
