"""Calls whose legs run over TCP and TLS, checked on the wire.

Real processes: the proxy (`python -m proxy run`, memory store); the peers are Python sockets
written byte by byte — UDP (tests/integration/rawsip.py), TCP and TLS (streamsip.py, with a test
CA made in the test, tests/tlsca.py) — so every Record-Route, Route, Via and the transport each
message arrived on can be looked at. The SIPp versions of these calls (TCP on both legs, and
TLS through socat because Debian's sipp is built without TLS) are in test_stream_sipp.py.

A full call here is INVITE, 180, 200, ACK, a re-INVITE from each side (with their ACKs) and a
BYE from one side; each side must only ever see its own token, and neither side's number may
reach the other.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from proxy.sip.message import SipMessage
from tests.integration.procs import (
    ProxyProcess,
    free_port,
    start_proxy,
    wait_tcp_listening,
    write_config,
)
from tests.integration.rawsip import (
    A,
    B,
    Peer,
    X,
    build_request,
    build_response,
    is_request,
    is_response,
    leaks,
    sdp,
    token_of,
    uniq,
    uri_of,
)
from tests.integration.streamsip import StreamConn, StreamPeer
from tests.tlsca import LoopbackPki, make_test_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LoopbackPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def proxies(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Factory: a proxy with `overrides` (memory store); stopped and checked afterwards."""
    started: list[ProxyProcess] = []

    def start(*, gateway: str, listen: list[str] | None = None, overrides: dict | None = None,
              port: int | None = None) -> ProxyProcess:
        port = port or free_port()
        cfg_dir = tmp_path / f"proxy-{port}"
        cfg_dir.mkdir()
        over = {"workers": 1, "carrier": {"gateways": [gateway]}, **(overrides or {})}
        if listen is not None:
            over["listen"] = [entry.format(port=port) for entry in listen]
        path, config = write_config(cfg_dir, port=port, gateway_port=0, overrides=over)
        proxy = start_proxy(path, port, 0, cfg_dir / "proxy.log", config)
        started.append(proxy)
        if any(e.startswith(("tcp:", "tls:")) for e in config["listen"]):
            wait_tcp_listening(port)
        return proxy

    yield start
    for proxy in started:
        proxy.assert_clean_exit(proxy.stop())


def tls_settings(pki: LoopbackPki, **extra: Any) -> dict:
    return {"tls": {"certificate_file": str(pki.proxy.cert),
                    "private_key_file": str(pki.proxy.key), "ca_file": str(pki.ca), **extra}}


# ---- one side of a call, whatever its transport -------------------------------------------------

@dataclass
class Got:
    msg: SipMessage
    raw: bytes
    transport: str
    reply: Callable[[bytes], None]  # send on the way the message came (socket / connection)


class Side:
    """A user agent on UDP (a rawsip.Peer) or on TCP/TLS (a StreamPeer): what it sends, how it
    answers, what it received."""

    def __init__(self, transport: str, *, udp: Peer | None = None,
                 stream: StreamPeer | None = None) -> None:
        self.transport = transport
        self.udp = udp
        self.stream = stream
        self.conn: StreamConn | None = None  # the connection it sends requests on
        self.proxy: tuple[str, int] | None = None  # where a UDP side sends requests
        self.received: list[Got] = []

    @property
    def host(self) -> str:
        return self.udp.host if self.udp is not None else self.stream.host  # type: ignore

    @property
    def port(self) -> int:
        if self.udp is not None:
            return self.udp.port
        assert self.stream is not None
        if self.stream.listener is None and self.conn is not None:
            return self.conn.local[1]  # a caller that does not listen: its connection's port
        return self.stream.port

    def via(self) -> str:
        return f"SIP/2.0/{self.transport.upper()} {self.host}:{self.port};" \
               f"branch={uniq('z9hG4bKu')};rport"

    def send(self, data: bytes) -> None:
        if self.udp is not None:
            assert self.proxy is not None
            self.udp.send(data, self.proxy)
        else:
            assert self.conn is not None
            self.conn.send(data)

    def wait(self, pred: Callable[[SipMessage], bool], what: str, timeout: float = 5.0) -> Got:
        if self.udp is not None:
            udp_got = self.udp.wait(pred, timeout)
            got = None if udp_got is None else Got(
                udp_got.msg, udp_got.raw, "udp",
                lambda data, a=udp_got.addr: self.udp.send(data, a))  # type: ignore[union-attr]
        else:
            assert self.stream is not None
            s_got = self.stream.wait(pred, timeout)
            got = None if s_got is None else Got(s_got.msg, s_got.raw, self.transport,
                                                 s_got.conn.send)
            if s_got is not None and self.conn is None:
                self.conn = s_got.conn  # a gateway's requests go on the proxy's connection
        assert got is not None, f"{what} never arrived"
        self.received.append(got)
        return got


@dataclass
class CallRecord:
    """What each side learned and received during one call."""

    invite_at_b: Got
    ok_at_a: Got
    b_routes: list[str]  # the INVITE's Record-Route, in order (B's route set)
    a_routes: list[str]  # the 200's Record-Route reversed (A's route set)
    requests_at_a: list[Got] = field(default_factory=list)
    requests_at_b: list[Got] = field(default_factory=list)


def in_dialog(method: str, side: Side, ruri: str, routes: list[str], from_: str, to: str,
              call_id: str, cseq: int, body: bytes = b"") -> bytes:
    rows = [("Via", side.via()), ("Max-Forwards", "70"), *(("Route", r) for r in routes),
            ("From", from_), ("To", to), ("Call-ID", call_id), ("CSeq", f"{cseq} {method}"),
            ("Contact", f"<sip:{A if side is not None else B}@{side.host}:{side.port}>")]
    if body:
        rows.append(("Content-Type", "application/sdp"))
    return build_request(method, ruri, rows, body)


def full_call(a: Side, b: Side, proxy_port: int, *, hangup: str = "a") -> CallRecord:
    """A → X → B: INVITE, 180, 200, ACK; a re-INVITE from A, then from B; BYE from `hangup`.
    Contacts name no transport (as SIPp's and many phones' do): the proxy must know each
    leg's transport itself."""
    call_id = f"{uniq('c')}@127.0.0.1"
    a_tag, b_tag = uniq("a"), uniq("b")
    a_from = f"<sip:{A}@127.0.0.1>;tag={a_tag}"
    a.send(build_request("INVITE", f"sip:{X}@127.0.0.1:{proxy_port}", [
        ("Via", a.via()), ("Max-Forwards", "70"), ("From", a_from),
        ("To", f"<sip:{X}@127.0.0.1:{proxy_port}>"), ("Call-ID", call_id),
        ("CSeq", "1 INVITE"), ("Contact", f"<sip:{A}@{a.host}:{a.port}>"),
        ("P-Asserted-Identity", f"<sip:{A}@127.0.0.1>"), ("Content-Type", "application/sdp"),
    ], sdp(A)))
    inv = b.wait(is_request("INVITE"), "A's INVITE at B")
    b_routes = inv.msg.header_values("record-route")
    b_contact = f"<sip:{B}@{b.host}:{b.port}>"
    for status, reason in ((180, "Ringing"), (200, "OK")):
        inv.reply(build_response(inv.msg, status, reason, to_tag=b_tag, record_route=True,
                                 headers=[("Contact", b_contact),
                                          *([("Content-Type", "application/sdp")]
                                            if status == 200 else [])],
                                 body=sdp(B) if status == 200 else b""))
    a.wait(is_response(180), "the 180 at A")
    ok = a.wait(is_response(200, "INVITE"), "the 200 at A")
    a_routes = list(reversed(ok.msg.header_values("record-route")))
    a_target = uri_of(ok.msg.header("contact") or "")
    a_to = ok.msg.header("to") or ""
    b_target = uri_of(inv.msg.header("contact") or "")
    b_from = f"{inv.msg.header('to')};tag={b_tag}"
    b_to = inv.msg.header("from") or ""
    record = CallRecord(inv, ok, b_routes, a_routes)

    def a_request(method: str, cseq: int, body: bytes = b"") -> None:
        a.send(in_dialog(method, a, a_target, a_routes, a_from, a_to, call_id, cseq, body))

    def b_request(method: str, cseq: int, body: bytes = b"") -> None:
        b.send(in_dialog(method, b, b_target, b_routes, b_from, b_to, inv.msg.call_id, cseq,
                         body))

    a_request("ACK", 1)
    record.requests_at_b.append(b.wait(is_request("ACK"), "A's ACK at B"))
    a_request("INVITE", 2, sdp(A, 2))  # re-INVITE from A
    got = b.wait(is_request("INVITE"), "A's re-INVITE at B")
    record.requests_at_b.append(got)
    got.reply(build_response(got.msg, 200, "OK", headers=[
        ("Contact", b_contact), ("Content-Type", "application/sdp")], body=sdp(B, 2)))
    a.wait(is_response(200, "INVITE"), "the 200 to A's re-INVITE")
    a_request("ACK", 2)
    record.requests_at_b.append(b.wait(is_request("ACK"), "A's second ACK at B"))
    b_request("INVITE", 1000, sdp(B, 3))  # re-INVITE from B
    got = a.wait(is_request("INVITE"), "B's re-INVITE at A")
    record.requests_at_a.append(got)
    got.reply(build_response(got.msg, 200, "OK", headers=[
        ("Contact", f"<sip:{A}@{a.host}:{a.port}>"), ("Content-Type", "application/sdp")],
        body=sdp(A, 3)))
    b.wait(is_response(200, "INVITE"), "the 200 to B's re-INVITE")
    b_request("ACK", 1000)
    record.requests_at_a.append(a.wait(is_request("ACK"), "B's ACK at A"))
    if hangup == "a":
        a_request("BYE", 3)
        got = b.wait(is_request("BYE"), "A's BYE at B")
        record.requests_at_b.append(got)
        got.reply(build_response(got.msg, 200, "OK"))
        a.wait(is_response(200, "BYE"), "the 200 to A's BYE")
    else:
        b_request("BYE", 1001)
        got = a.wait(is_request("BYE"), "B's BYE at A")
        record.requests_at_a.append(got)
        got.reply(build_response(got.msg, 200, "OK"))
        b.wait(is_response(200, "BYE"), "the 200 to B's BYE")
    for got in a.received:
        assert not leaks(got.raw, B), f"B's number reached A: {leaks(got.raw, B)}"
    for got in b.received:
        assert not leaks(got.raw, A), f"A's number reached B: {leaks(got.raw, A)}"
    a.received.clear()
    b.received.clear()
    return record


def assert_each_side_its_own_token(record: CallRecord) -> None:
    b_tokens = {token_of(r) for r in record.b_routes}
    a_tokens = {token_of(r) for r in record.a_routes}
    assert len(b_tokens) == 1 and len(a_tokens) == 1 and b_tokens != a_tokens
    b_token, a_token = next(iter(b_tokens)), next(iter(a_tokens))
    assert b_token.encode() not in record.ok_at_a.raw
    for got in record.requests_at_a:
        assert b_token.encode() not in got.raw
    assert a_token.encode() not in record.invite_at_b.raw
    for got in record.requests_at_b:
        assert a_token.encode() not in got.raw
        assert got.msg.header_values("route") == []  # every Route of ours went


def rr_heads(routes: list[str]) -> list[str]:
    return [r.split(";s7=")[0] for r in routes]


# ---- mixed legs: UDP caller, TCP gateway ------------------------------------------------------

@pytest.mark.parametrize("hangup", ["a", "b"])
def test_udp_caller_tcp_gateway_double_record_route_on_the_wire(
    proxies: Callable[..., ProxyProcess], hangup: str
) -> None:
    """RFC 5658: B (TCP) gets the INVITE with two Record-Route entries — the TCP one facing it
    on top, the UDP one facing A below — both with B's token; A gets them (reversed in its
    route set) with A's own token. Each side's in-dialog requests carry both entries, which
    the proxy pops as one hop, and go out on the other leg's transport: over TCP to B (on the
    connection the proxy opened), over UDP to A."""
    gw = StreamPeer("tcp", name="B")
    a_peer = Peer(name="A")
    try:
        proxy = proxies(gateway=f"sip:127.0.0.1:{gw.port};transport=tcp")
        a = Side("udp", udp=a_peer)
        a.proxy = ("127.0.0.1", proxy.port)
        b = Side("tcp", stream=gw)
        record = full_call(a, b, proxy.port, hangup=hangup)
        p = proxy.port
        assert rr_heads(record.b_routes) == [f"<sip:127.0.0.1:{p};transport=tcp;lr",
                                             f"<sip:127.0.0.1:{p};lr"]
        assert rr_heads(record.a_routes) == [f"<sip:127.0.0.1:{p};lr",
                                             f"<sip:127.0.0.1:{p};transport=tcp;lr"]
        assert record.invite_at_b.transport == "tcp"
        assert record.invite_at_b.msg.top_via.transport == "TCP"
        assert all(g.transport == "tcp" for g in record.requests_at_b)
        assert all(g.transport == "udp" for g in record.requests_at_a)
        assert_each_side_its_own_token(record)
        assert len(gw.conns) == 1  # one connection carried the whole call, both ways
    finally:
        gw.close()
        a_peer.close()


# ---- TCP only, TLS only -------------------------------------------------------------------------

def test_tcp_only_listener_carries_full_calls_both_ways(
        proxies: Callable[..., ProxyProcess]) -> None:
    """listen: tcp only, a TCP gateway. A calls from an ephemeral port with a Contact that
    names neither TCP nor that port: B's re-INVITE and BYE still reach A, down the connection A
    opened (the flow sealed in B's token)."""
    gw = StreamPeer("tcp", name="B")
    caller = StreamPeer("tcp", name="A")  # listens too, but nothing may connect to it
    try:
        proxy = proxies(gateway=f"sip:127.0.0.1:{gw.port};transport=tcp",
                        listen=["tcp:127.0.0.1:{port}"])
        for hangup in ("a", "b"):
            a = Side("tcp", stream=caller)
            a.conn = caller.connect(("127.0.0.1", proxy.port))
            b = Side("tcp", stream=gw)
            record = full_call(a, b, proxy.port, hangup=hangup)
            assert rr_heads(record.b_routes) == [
                f"<sip:127.0.0.1:{proxy.port};transport=tcp;lr"]
            assert all(g.transport == "tcp" for g in record.requests_at_a)
            assert_each_side_its_own_token(record)
        assert not [c for c in caller.conns if c.accepted], "the proxy connected to A's port"
        assert len(gw.conns) == 1
    finally:
        gw.close()
        caller.close()


def test_tls_only_listener_carries_full_calls_with_the_test_ca(
    proxies: Callable[..., ProxyProcess], pki: LoopbackPki
) -> None:
    """listen: tls only, a sips: gateway; the proxy's certificate verified by A, A's (client)
    certificate required by the proxy, the gateway's verified by the proxy — all from the
    test CA. Both full calls (BYE from each side) work over TLS on both legs, the
    Record-Route says transport=tls with the TLS port."""
    gw = StreamPeer("tls", server_ctx=pki.server_context(pki.peer), name="B")
    caller = StreamPeer("tls", listen=False, client_ctx=pki.client_context(cert=pki.peer))
    try:
        proxy = proxies(gateway=f"sips:127.0.0.1:{gw.port}", listen=["tls:127.0.0.1:{port}"],
                        overrides={"transport": tls_settings(pki, verify_clients="required")})
        for hangup in ("a", "b"):
            a = Side("tls", stream=caller)
            a.conn = caller.connect(("127.0.0.1", proxy.port))
            b = Side("tls", stream=gw)
            record = full_call(a, b, proxy.port, hangup=hangup)
            assert rr_heads(record.b_routes) == [
                f"<sip:127.0.0.1:{proxy.port};transport=tls;lr"]
            assert record.invite_at_b.msg.top_via.transport == "TLS"
            assert record.invite_at_b.msg.uri_text.endswith(f":{gw.port};transport=tls")
            assert_each_side_its_own_token(record)
        assert len(gw.conns) == 1 and not gw.handshake_failures
    finally:
        gw.close()
        caller.close()
    stats = proxy.stop_and_read_stats()
    assert stats.get("calls_routed") == 2 and not stats.get("tls_handshake_failed"), stats


def test_tls_refuses_a_caller_certificate_from_another_ca_and_silent_handshakes(
    proxies: Callable[..., ProxyProcess], pki: LoopbackPki
) -> None:
    """verify_clients: required: a caller with a certificate of another CA (or none) never
    gets a SIP message through; a connection that never starts its handshake is closed after
    handshake_timeout_s, and holds a place under the connection caps meanwhile."""
    proxy = proxies(gateway="sip:127.0.0.1:9;transport=tls", listen=["tls:127.0.0.1:{port}"],
                    overrides={"transport": {
                        **tls_settings(pki, verify_clients="required",
                                       handshake_timeout_s=1.0),
                        "tcp_max_connections_per_source": 2}})
    for cert in (pki.rogue, None):
        caller = StreamPeer("tls", listen=False, client_ctx=pki.client_context(cert=cert))
        try:
            with pytest.raises((OSError, TimeoutError)):
                conn = caller.connect(("127.0.0.1", proxy.port))
                conn.send(build_request("OPTIONS", "sip:127.0.0.1", [
                    ("Via", f"SIP/2.0/TLS 127.0.0.1:1;branch={uniq('z9hG4bKo')}"),
                    ("From", "<sip:p@127.0.0.1>;tag=1"), ("To", "<sip:127.0.0.1>"),
                    ("Call-ID", uniq("o")), ("CSeq", "1 OPTIONS"), ("Max-Forwards", "70")]))
                assert conn.closed.wait(3)  # TLS 1.3: the refusal comes after connect()
                raise OSError("closed by the proxy")
            assert caller.wait(lambda m: True, 0.2) is None
        finally:
            caller.close()
    silent = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(3)]
    try:
        silent[2].settimeout(2)
        assert silent[2].recv(10) == b""  # over the per-source cap (2): closed at once
        started = time.monotonic()
        silent[0].settimeout(5)
        assert silent[0].recv(10) == b""  # no handshake: closed after ~1 s
        assert 0.5 < time.monotonic() - started < 4
    finally:
        for s in silent:
            s.close()
    stats = proxy.stop_and_read_stats()
    assert stats.get("tls_handshake_failed", 0) >= 2, stats
    assert stats.get("tls_handshake_timeout", 0) >= 1 and stats.get("tcp_refused") == 1, stats


# ---- RFC 3261 §18.2.2: the response after the connection closed ------------------------------

def test_response_goes_to_the_via_sent_by_port_after_the_callers_connection_closed(
        proxies: Callable[..., ProxyProcess]) -> None:
    """A sends its INVITE over a TCP connection from an ephemeral port, with Via sent-by naming
    the port it listens on, and closes the connection at once. B's 180 and 200 reach A on a
    new connection the proxy opens to the sent-by port — not to the ephemeral port."""
    gw = StreamPeer("tcp", name="B")
    caller = StreamPeer("tcp", name="A")  # listens on caller.port, the Via's sent-by
    try:
        proxy = proxies(gateway=f"sip:127.0.0.1:{gw.port};transport=tcp")
        conn = caller.connect(("127.0.0.1", proxy.port))
        ephemeral = conn.local[1]
        assert ephemeral != caller.port
        a = Side("tcp", stream=caller)
        a.conn = conn
        call_id = f"{uniq('c')}@127.0.0.1"
        a.send(build_request("INVITE", f"sip:{X}@127.0.0.1:{proxy.port}", [
            ("Via", a.via()), ("Max-Forwards", "70"),
            ("From", f"<sip:{A}@127.0.0.1>;tag={uniq('a')}"), ("To", f"<sip:{X}@127.0.0.1>"),
            ("Call-ID", call_id), ("CSeq", "1 INVITE"),
            ("Contact", f"<sip:{A}@127.0.0.1:{caller.port}>")]))
        b = Side("tcp", stream=gw)
        inv = b.wait(is_request("INVITE"), "A's INVITE at B")
        conn.close()
        time.sleep(0.3)
        inv.reply(build_response(inv.msg, 200, "OK", to_tag="b", record_route=True,
                                 headers=[("Contact", f"<sip:{B}@127.0.0.1:{gw.port}>")]))
        ok = a.wait(is_response(200, "INVITE"), "the 200 at A's sent-by port")
        assert ok.msg.call_id == call_id
        accepted = [c for c in caller.conns if c.accepted]
        assert len(accepted) == 1 and accepted[0].local == ("127.0.0.1", caller.port)
    finally:
        gw.close()
        caller.close()
    assert proxy.stop_and_read_stats().get("responses_to_sent_by", 0) >= 1


# ---- RFC 3261 §18.1.1: large requests ----------------------------------------------------------

@pytest.mark.parametrize("over_tcp", [True, False])
def test_large_request_over_udp_is_sent_over_tcp_when_the_next_hop_takes_it(
    proxies: Callable[..., ProxyProcess], over_tcp: bool
) -> None:
    """A UDP gateway, an INVITE of ~2,000 bytes: with transport.large_requests_over_tcp it
    reaches the gateway over TCP (Via TCP) on the gateway's port, and a small one over UDP;
    without the flag both go over UDP as before."""
    port = free_port()
    udp_gw = Peer(port=port, name="B/udp")
    tcp_gw = StreamPeer("tcp", port=port, name="B/tcp")
    a_peer = Peer(name="A")
    try:
        proxy = proxies(gateway=f"sip:127.0.0.1:{port}",
                        overrides={"transport": {"large_requests_over_tcp": over_tcp}})
        for size, expect_tcp in ((2000, over_tcp), (0, False)):
            body = sdp(A) + (b"a=x-pad:" + b"p" * size + b"\r\n" if size else b"")
            data = build_request("INVITE", f"sip:{X}@127.0.0.1:{proxy.port}", [
                ("Via", f"SIP/2.0/UDP 127.0.0.1:{a_peer.port};branch={uniq('z9hG4bKl')};rport"),
                ("Max-Forwards", "70"), ("From", f"<sip:{A}@127.0.0.1>;tag={uniq('a')}"),
                ("To", f"<sip:{X}@127.0.0.1>"), ("Call-ID", uniq("big")), ("CSeq", "1 INVITE"),
                ("Contact", f"<sip:{A}@127.0.0.1:{a_peer.port}>"),
                ("Content-Type", "application/sdp")], body)
            assert (len(data) > 1300) is bool(size)
            a_peer.send(data, ("127.0.0.1", proxy.port))
            if expect_tcp:
                got = tcp_gw.wait(is_request("INVITE"), 5)
                assert got is not None, "the large INVITE never came over TCP"
                assert got.msg.top_via.transport == "TCP" and len(got.raw) > 1300
                got.conn.send(build_response(got.msg, 200, "OK", to_tag="b",
                                             record_route=True))
            else:
                udp_got = udp_gw.wait(is_request("INVITE"), 5)
                assert udp_got is not None, "the INVITE never came over UDP"
                assert udp_got.msg.top_via.transport == "UDP"
                udp_gw.answer(udp_got, 200, "OK", to_tag="b", record_route=True)
            ok = a_peer.wait(is_response(200, "INVITE"), 5)
            assert ok is not None, "no 200 at A"
    finally:
        udp_gw.close()
        tcp_gw.close()
        a_peer.close()
    assert proxy.stop_and_read_stats().get("large_requests_over_tcp", 0) == (1 if over_tcp
                                                                              else 0)


# ---- several workers: one connection per destination ---------------------------------------------

def test_two_workers_share_one_connection_to_the_gateway(
        proxies: Callable[..., ProxyProcess]) -> None:
    """workers: 2, UDP callers, a TCP gateway: whichever worker takes a call, every INVITE,
    ACK and BYE to the gateway goes on one connection (held by one worker, the other passes
    its messages there), and the gateway's responses and BYEs find their way back."""
    gw = StreamPeer("tcp", name="B")
    a_peer = Peer(name="A")
    try:
        proxy = proxies(gateway=f"sip:127.0.0.1:{gw.port};transport=tcp",
                        overrides={"workers": 2})
        for i in range(12):
            a = Side("udp", udp=a_peer)
            a.proxy = ("127.0.0.1", proxy.port)
            b = Side("tcp", stream=gw)
            full_call(a, b, proxy.port, hangup="ab"[i % 2])
        assert len(gw.conns) == 1, f"{len(gw.conns)} connections to one gateway"
    finally:
        gw.close()
        a_peer.close()
    stats = proxy.stop_and_read_stats()
    assert stats.get("calls_routed") == 12 and stats.get("relayed_sends", 0) > 0, stats


def test_two_workers_tls_caller_is_reached_down_its_connection(
    proxies: Callable[..., ProxyProcess], pki: LoopbackPki
) -> None:
    """workers: 2, TLS callers (each call on a connection of its own, so the kernel spreads
    them over both workers), a TCP gateway: B's re-INVITE and BYE reach each caller down its
    own connection, held by whichever worker accepted it."""
    gw = StreamPeer("tcp", name="B")
    try:
        proxy = proxies(gateway=f"sip:127.0.0.1:{gw.port};transport=tcp",
                        listen=["udp:127.0.0.1:{port}", "tls:127.0.0.1:{port}"],
                        overrides={"workers": 2, "transport": tls_settings(pki)})
        for i in range(8):
            caller = StreamPeer("tls", listen=False, client_ctx=pki.client_context())
            try:
                a = Side("tls", stream=caller)
                a.conn = caller.connect(("127.0.0.1", proxy.port))
                record = full_call(a, Side("tcp", stream=gw), proxy.port, hangup="ab"[i % 2])
                # the TLS entry names the TLS port (shared by the workers); the TCP one the
                # worker's own port (this config has no tcp listen entry to name)
                heads = rr_heads(record.b_routes)
                assert [h.split(";", 1)[1] for h in heads] == ["transport=tcp;lr",
                                                               "transport=tls;lr"]
                assert heads[1].startswith(f"<sip:127.0.0.1:{proxy.port};")
                assert_each_side_its_own_token(record)
            finally:
                caller.close()
        assert len(gw.conns) == 1
    finally:
        gw.close()
    stats = proxy.stop_and_read_stats()
    assert stats.get("calls_routed") == 8, stats


def test_rr_uri_transport_helper() -> None:
    """The helper above reads what the proxy wrote (guards the test itself)."""
    assert rr_heads(["<sip:1.2.3.4:5;transport=tcp;lr;s7=abc>"]) == [
        "<sip:1.2.3.4:5;transport=tcp;lr"]
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token_of("<sip:h;lr;s7=a-b_c>"))
