"""Socket buffer sizes: ask for the configured size, and say so when the kernel gives less.

Linux caps SO_RCVBUF / SO_SNDBUF at net.core.rmem_max / wmem_max (212,992 bytes by default)
without an error. A UDP receive buffer that small fills in tens of milliseconds at a few
thousand calls a second: the kernel then drops datagrams (BYEs of calls in progress among
them) before the overload control's receive wait can shed new calls. A process with
CAP_NET_ADMIN may pass the cap (SO_RCVBUFFORCE / SO_SNDBUFFORCE); without it the proxy keeps
what the kernel gives and logs the shortfall with the config key and the sysctl to raise.
"""
from __future__ import annotations

import contextlib
import socket
from typing import Final

import structlog

log = structlog.get_logger("sip700.transport")

# Linux asm-generic/socket.h; Python's socket module does not name them
SO_SNDBUFFORCE: Final = 32
SO_RCVBUFFORCE: Final = 33

_KINDS: Final = {
    # option, its privileged form, the config key, the sysctl that caps it
    "receive": (socket.SO_RCVBUF, SO_RCVBUFFORCE, "transport.udp_rcvbuf_bytes",
                "net.core.rmem_max"),
    "send": (socket.SO_SNDBUF, SO_SNDBUFFORCE, "transport.udp_sndbuf_bytes",
             "net.core.wmem_max"),
}


def size_buffer(sock: socket.socket, kind: str, size: int, *, address: str = "") -> int:
    """Set `sock`'s `kind` ("receive" or "send") buffer to `size` bytes; return the size the
    kernel granted, as configured (it reports twice that: the other half is its bookkeeping).
    A shortfall is logged, with `address` (the socket's), the key and the sysctl."""
    option, forced, key, sysctl = _KINDS[kind]
    try:
        sock.setsockopt(socket.SOL_SOCKET, forced, size)
    except OSError:  # no CAP_NET_ADMIN (or not Linux): the capped form
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, size)
    granted = sock.getsockopt(socket.SOL_SOCKET, option) // 2
    if granted < size:
        log.warning("udp_buffer_capped", address=address, buffer=kind, asked_bytes=size,
                    granted_bytes=granted, key=key,
                    reason=f"the kernel caps it at {sysctl} without CAP_NET_ADMIN: "
                           f"raise {sysctl} to at least {size}")
    return granted
