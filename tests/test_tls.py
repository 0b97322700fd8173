"""proxy/tls.py, sans-IO: two TlsLayers shuttle bytes to each other in memory (no sockets), with
certificates from a test CA made in the test."""

from __future__ import annotations

import ssl
from pathlib import Path
from types import SimpleNamespace

import pytest

from proxy.tls import TlsClosed, TlsLayer, client_context, load_problem, server_context
from tests.tlsca import LoopbackPki, make_test_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LoopbackPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def settings(pki: LoopbackPki, **kw: object) -> SimpleNamespace:
    base = {"certificate_file": pki.proxy.cert, "private_key_file": pki.proxy.key,
            "ca_file": pki.ca, "verify_clients": "none", "verify_servers": True,
            "min_version": "1.2", "handshake_timeout_s": 10.0}
    return SimpleNamespace(**{**base, **kw})


def handshake(client: TlsLayer, server: TlsLayer) -> None:
    """Shuttle bytes until both sides are established (or one raises)."""
    to_server = client.start()
    assert server.start() == b""
    for _ in range(10):
        _, to_client = server.receive(to_server) if to_server else (b"", b"")
        _, to_server = client.receive(to_client) if to_client else (b"", b"")
        if client.established and server.established and not to_server:
            return
    raise AssertionError("no handshake")


def test_tls_layers_handshake_and_carry_sip_both_ways(pki: LoopbackPki) -> None:
    server = TlsLayer(server_context(settings(pki)), server_side=True)
    client = TlsLayer(pki.client_context(), server_side=False, server_hostname="127.0.0.1")
    handshake(client, server)
    invite = b"INVITE sip:x@h SIP/2.0\r\nContent-Length: 0\r\n\r\n"
    plain, _ = server.receive(client.send(invite))
    assert plain == invite
    record = server.send(b"SIP/2.0 200 OK\r\n\r\n" * 3000)  # larger than one TLS record
    got = b""
    for i in range(0, len(record), 1000):  # the socket cuts records anywhere
        chunk, _ = client.receive(record[i:i + 1000])
        got += chunk
    assert got == b"SIP/2.0 200 OK\r\n\r\n" * 3000


def test_client_certificate_required_and_verified(pki: LoopbackPki) -> None:
    ctx = server_context(settings(pki, verify_clients="required"))
    for cert, ok in ((pki.peer, True), (pki.rogue, False), (None, False)):
        server = TlsLayer(ctx, server_side=True)
        client = TlsLayer(pki.client_context(cert=cert), server_side=False,
                          server_hostname="127.0.0.1")
        if ok:
            handshake(client, server)
            assert server.peer_certificate() is not None
        else:
            with pytest.raises(ssl.SSLError):
                handshake(client, server)


def test_the_proxy_verifies_the_gateways_certificate_and_name(pki: LoopbackPki) -> None:
    ctx = client_context(settings(pki))
    for cert, name, ok in ((pki.peer, "127.0.0.1", True), (pki.peer, "localhost", True),
                           (pki.peer, "10.9.9.9", False), (pki.rogue, "127.0.0.1", False)):
        server = TlsLayer(pki.server_context(cert), server_side=True)
        client = TlsLayer(ctx, server_side=False, server_hostname=name)
        if ok:
            handshake(client, server)
        else:
            with pytest.raises(ssl.SSLCertVerificationError):
                handshake(client, server)
    # verify_servers: false takes any certificate
    lax = client_context(settings(pki, verify_servers=False))
    handshake(TlsLayer(lax, server_side=False, server_hostname="10.9.9.9"),
              TlsLayer(pki.server_context(pki.rogue), server_side=True))


def test_close_notify_ends_the_session(pki: LoopbackPki) -> None:
    server = TlsLayer(server_context(settings(pki)), server_side=True)
    client = TlsLayer(pki.client_context(), server_side=False, server_hostname="127.0.0.1")
    handshake(client, server)
    try:  # the client shuts down: a close_notify
        client._obj.unwrap()
    except ssl.SSLWantReadError:
        pass
    with pytest.raises(TlsClosed):
        server.receive(client._out.read())


def test_garbage_instead_of_a_handshake_fails(pki: LoopbackPki) -> None:
    server = TlsLayer(server_context(settings(pki)), server_side=True)
    with pytest.raises(ssl.SSLError):
        server.receive(b"INVITE sip:x@h SIP/2.0\r\n\r\n")


def test_load_problem_names_the_file(pki: LoopbackPki, tmp_path: Path) -> None:
    assert load_problem(pki.proxy.cert, pki.proxy.key, pki.ca) is None
    problem = load_problem(pki.proxy.cert, pki.peer.key, None)
    assert problem is not None and "proxy.crt" in problem and "peer.key" in problem
    junk = tmp_path / "junk.pem"
    junk.write_text("x")
    assert "cannot load ca_file" in (load_problem(None, None, junk) or "")
