"""Which worker holds a TCP/TLS connection, and how another worker asks it to send.

One connection per destination, not one per worker: a connection the proxy opens belongs to
the worker that a keyed hash of (transport, host, port) names (`destination_owner`). Any other
worker with something to send there passes it to that worker over the relay between workers
(`encode_send` / `decode_send`), which sends it on the one connection (opening it if needed).
A connection a peer opened to us belongs to the worker the kernel handed it to; the core names
that worker in the flow it seals into the dialog token (proxy/legs.py), so a request for that
peer is passed to the worker holding its connection the same way.

The per-datagram UDP path never comes here.
"""

from __future__ import annotations

from typing import Any

from proxy.core import Outgoing
from proxy.legs import Flow

SEND_FLAG = 1 << 31  # in the relay header's length field: "send this", not "handle this"


def destination_owner(dest: tuple[str, int], transport: str, workers: int, hasher: Any) -> int:
    """The worker that opens and holds our connection to `dest` over `transport`.

    `hasher` is the workers' keyed blake2b (transport.call_id_hasher): the same in every worker
    and in a restarted one, so they all agree.
    """
    h = hasher.copy()
    h.update(f"{transport}|{dest[0]}|{dest[1]}".encode("ascii", "replace"))
    return int.from_bytes(h.digest(), "little") % workers


def encode_send(item: Outgoing) -> bytes:
    """A message for another worker to send (the relay header carries the destination):
    `transport flow-worker flow-host flow-port` on the first line, then the bytes."""
    flow = item.flow
    if flow is None:
        head = f"{item.transport} - - 0\n"
    else:
        worker = "-" if flow.worker is None else flow.worker
        head = f"{item.transport} {worker} {flow.host} {flow.port}\n"
    return head.encode("ascii") + item.data


def decode_send(payload: bytes, dest: tuple[str, int]) -> Outgoing | None:
    """The Outgoing that encode_send packed; None when the payload is not one."""
    eol = payload.find(b"\n")
    if eol < 0:
        return None
    try:
        transport, worker, host, port = payload[:eol].decode("ascii").split(" ")
        flow = None if host == "-" else Flow(None if worker == "-" else int(worker), host,
                                              int(port))
    except ValueError:
        return None
    if transport not in ("tcp", "tls"):
        return None
    return Outgoing(payload[eol + 1:], dest, transport, flow)
