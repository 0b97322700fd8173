"""TLS for SIP connections (RFC 3261 §26.2): the contexts made from the config, and a sans-IO
TLS layer that a stream connection runs its bytes through.

Why not asyncio's own TLS (`create_server(ssl=…)` / `start_tls`): the connection caps must be
applied when a connection is accepted, before any handshake (a flood of half-open handshakes
must cost no more than a flood of TCP connections), and the caps, the back-pressure and the
output bound must see the same transport as for plain TCP. `TlsLayer` is an `ssl.SSLObject`
between two memory BIOs: bytes from the socket in, plaintext and bytes for the socket out, no
I/O of its own (h11's shape), so the TCP connection code stays one code path for both.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

_VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
READ_CHUNK = 65536


def load_problem(certificate: Path | None, private_key: Path | None, ca: Path | None
                 ) -> str | None:
    """Why these PEM files cannot be used (for check-config), or None."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if certificate is not None and private_key is not None:
        try:
            ctx.load_cert_chain(str(certificate), str(private_key))
        except (ssl.SSLError, OSError, ValueError) as exc:
            return (f"cannot load certificate_file {str(certificate)!r} with private_key_file "
                    f"{str(private_key)!r}: {_reason(exc)}")
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (ssl.SSLError, OSError, ValueError) as exc:
            return f"cannot load ca_file {str(ca)!r}: {_reason(exc)}"
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    return str(exc) or type(exc).__name__


def _base(tls: Any, purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    if tls.certificate_file is not None:
        ctx.load_cert_chain(str(tls.certificate_file), str(tls.private_key_file))
    if tls.ca_file is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
    else:
        ctx.load_default_certs()
    return ctx


def server_context(tls: Any) -> ssl.SSLContext:
    """For connections peers open to our tls: listen entries (`transport.tls` config)."""
    ctx = _base(tls, ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = _VERIFY[tls.verify_clients]
    return ctx


def client_context(tls: Any) -> ssl.SSLContext:
    """For connections the proxy opens (TLS gateways, peers reached over TLS). Our certificate
    goes along when configured, for gateways that ask for one (mutual TLS)."""
    ctx = _base(tls, ssl.PROTOCOL_TLS_CLIENT)
    if not tls.verify_servers:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class TlsClosed(Exception):
    """The peer ended the TLS session (close_notify)."""


class TlsLayer:
    """One TLS session over a byte stream, sans-IO.

    `receive(data)` takes bytes from the socket and returns (plaintext, bytes to write back);
    `send(plaintext)` returns bytes to write; `start()` the client's first flight. Raises
    ssl.SSLError when the handshake or a record fails (the connection must be closed) and
    TlsClosed when the peer closed the session.
    """

    __slots__ = ("_in", "_obj", "_out", "established")

    def __init__(self, ctx: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=server_side,
                                 server_hostname=server_hostname)
        self.established = False

    def start(self) -> bytes:
        """The client's ClientHello (nothing for a server)."""
        self._handshake()
        return self._out.read()

    def _handshake(self) -> None:
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            return
        self.established = True

    def receive(self, data: bytes) -> tuple[bytes, bytes]:
        self._in.write(data)
        if not self.established:
            self._handshake()
            if not self.established:
                return b"", self._out.read()
        chunks: list[bytes] = []
        closed = False
        while True:
            try:
                chunk = self._obj.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                closed = True
                break
            if not chunk:  # SSLObject.read gives b"" for the peer's close_notify
                closed = True
                break
            chunks.append(chunk)
        if closed and not chunks:
            raise TlsClosed
        return b"".join(chunks), self._out.read()

    def send(self, data: bytes) -> bytes:
        self._obj.write(data)
        return self._out.read()

    def peer_certificate(self) -> dict[str, Any] | None:
        return self._obj.getpeercert() or None
