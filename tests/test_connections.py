"""proxy/connections.py: which worker holds a connection, and the message a worker passes to
another to send on it (sans-IO: bytes in, bytes out)."""

from __future__ import annotations

import collections
import os

from proxy.connections import decode_send, destination_owner, encode_send
from proxy.core import Outgoing
from proxy.legs import Flow
from proxy.transport import call_id_hasher


def test_one_owner_per_destination_agreed_by_every_worker() -> None:
    key = os.urandom(32)
    one, other = call_id_hasher(key), call_id_hasher(key)  # two workers, one key
    dests = [(f"10.0.{i // 250}.{i % 250}", 5060) for i in range(2000)]
    owners = [destination_owner(d, "tcp", 4, one) for d in dests]
    assert owners == [destination_owner(d, "tcp", 4, other) for d in dests]
    counts = collections.Counter(owners)
    assert set(counts) == {0, 1, 2, 3} and all(350 < n < 650 for n in counts.values()), counts
    # the transport is part of it: TCP and TLS to one address are different connections
    assert any(destination_owner(d, "tls", 4, one) != o for d, o in zip(dests, owners,
                                                                          strict=True))


def test_send_round_trips_with_and_without_a_flow() -> None:
    for item in (Outgoing(b"INVITE sip:x SIP/2.0\r\n\r\n", ("10.0.0.1", 5060), "tcp"),
                 Outgoing(b"SIP/2.0 200 OK\r\n\r\n", ("::1", 5061), "tls",
                          Flow(3, "192.0.2.1", 40000)),
                 Outgoing(b"BYE\n\n", ("10.0.0.1", 5060), "tcp", Flow(None, "10.0.0.2", 1))):
        assert decode_send(encode_send(item), item.dest) == item


def test_bad_send_payloads_are_refused() -> None:
    for payload in (b"no line", b"udp - - 0\nx", b"tcp x 1.2.3.4 5\nx", b"tcp 1 2\nx"):
        assert decode_send(payload, ("10.0.0.1", 5060)) is None
