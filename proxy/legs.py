"""The transport of each leg of a call, sans-IO: what the core writes into Record-Route for a
leg, how a request finds the other side's leg again, and when a request is too large for UDP.

A call has two legs: the caller's (the transport its INVITE came over) and the callee's (the
gateway's transport). Our Record-Route names, for each leg, the address and transport that leg
must use to reach us; when the legs differ there are two entries (RFC 5658 §3.3: the topmost
faces the callee, the one below faces the caller), both with the token of the side that holds
them. An in-dialog request that brings two of our Route entries has made one hop through us
and both go.

Each token also says how to reach the *other* side (`DialogRule.peer`, sealed, so nobody can
read or forge it): the transport of its leg and, when that side opened a TCP/TLS connection to
us, that connection (the flow, RFC 5626 §5.3 style). Requests towards a caller behind NAT
then go down the connection it opened, whatever its Contact says.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Final, NamedTuple

from proxy.privacy import TOKEN_PARAM
from proxy.sip.errors import ParseError
from proxy.sip.message import parse_message

TRANSPORTS: Final = ("udp", "tcp", "tls")
STREAMS: Final = frozenset(("tcp", "tls"))
DEFAULT_PORTS: Final = {"udp": 5060, "tcp": 5060, "tls": 5061}  # RFC 3261 §19.1.2
UDP_LARGE_DEFAULT: Final = 1300  # RFC 3261 §18.1.1, when the path MTU is unknown


class Flow(NamedTuple):
    """A connection a peer opened to us: the worker holding it (None: whichever worker owns
    connections to that address) and the peer's address on it."""

    worker: int | None
    host: str
    port: int


def uri_transport(uri: Any) -> str | None:
    """The transport a SIP URI asks for (`sips:` is TLS), None when it names none or one we do
    not speak."""
    if getattr(uri, "scheme", "") == "sips":
        return "tls"
    param = uri.param("transport")
    if param is None:
        return None
    param = param.lower()
    return param if param in TRANSPORTS else None


def record_route_prefix(host_port: str, transport: str, *, sips: bool = False) -> str:
    """Our Record-Route value for a leg, up to the token: `<sip:h:p;lr;s7=` for UDP (as it
    always was), `;transport=tcp|tls` for a stream leg, `sips:` for TLS in a sips: dialog."""
    if transport == "udp":
        return f"<sip:{host_port};lr;{TOKEN_PARAM}="
    if transport == "tls" and sips:
        return f"<sips:{host_port};lr;{TOKEN_PARAM}="
    return f"<sip:{host_port};transport={transport};lr;{TOKEN_PARAM}="


def encode_peer(transport: str, flow: Flow | None = None) -> str:
    """The `peer` of a token: how the side that receives requests bearing it is reached.
    Empty for UDP without a flow (the UDP tokens stay as short as before)."""
    if flow is None:
        return "" if transport == "udp" else transport
    worker = "-" if flow.worker is None else str(flow.worker)
    return f"{transport} {worker} {flow.host} {flow.port}"


def decode_peer(text: str) -> tuple[str | None, Flow | None]:
    """(transport of the leg or None when unknown, the flow or None) from a token's `peer`."""
    if not text:
        return None, None
    parts = text.split(" ")
    transport = parts[0] if parts[0] in TRANSPORTS else None
    if len(parts) != 4 or transport is None:
        return transport, None
    try:
        worker = None if parts[1] == "-" else int(parts[1])
        return transport, Flow(worker, parts[2], int(parts[3]))
    except ValueError:
        return transport, None


def too_large_for_udp(size: int, limit: int = UDP_LARGE_DEFAULT) -> bool:
    """RFC 3261 §18.1.1: a request within 200 bytes of the path MTU (`limit` = MTU − 200, or
    1300 when the MTU is unknown) must go over a congestion-controlled transport."""
    return size > limit


def response_fallback(data: bytes, peer_ip: str) -> tuple[str, int] | None:
    """Where a response goes when the connection its request came on has closed (RFC 3261
    §18.2.2): a new connection to the address the request came from (the `received` we
    stamped) and the port of the top Via's sent-by, or the transport's default port — never
    the connection's ephemeral source port. The IP is always the one the request came from,
    whatever `received` a sender wrote itself. None when there is no usable top Via."""
    try:
        via = parse_message(data).top_via
    except (ParseError, ValueError):
        return None
    try:
        ipaddress.ip_address(peer_ip)
    except ValueError:
        return None
    port = via.port or DEFAULT_PORTS.get(via.transport.lower(), 5060)
    return peer_ip, port
