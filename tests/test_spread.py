"""The kernel's choice of worker by Call-ID (proxy/spread.py), on real sockets.

A reuseport group of sockets bound in one process, in order: the kernel numbers them in bind
order, so the socket each datagram reaches can be compared with the program's hash computed in
Python (expected_socket).
"""

from __future__ import annotations

import collections
import errno
import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from proxy import spread


def group(sockets: int, keys: tuple[int, int, int, int]) -> tuple[list[socket.socket], int]:
    """`sockets` UDP sockets on one loopback port with the program attached; and that port."""
    first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    first.bind(("127.0.0.1", 0))
    port = first.getsockname()[1]
    socks = [first]
    for _ in range(sockets - 1):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", port))
        socks.append(s)
    for s in socks:
        s.setblocking(False)
    assert spread.attach(socks[-1], sockets, keys) == spread.SCAN_BYTES
    return socks, port


def deliver(socks: list[socket.socket], port: int, messages: list[bytes]) -> dict[bytes, int]:
    """Send each message (distinct) from one source socket; which socket received which."""
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    got: dict[bytes, int] = {}

    def read(until: int) -> None:
        deadline = time.monotonic() + 5
        while len(got) < until and time.monotonic() < deadline:
            for i, s in enumerate(socks):
                try:
                    while True:
                        got[s.recv(65535)] = i
                except BlockingIOError:
                    pass
            time.sleep(0.001)

    try:
        for start in range(0, len(messages), 20):  # a few at a time: the queues stay short
            for m in messages[start:start + 20]:
                tx.sendto(m, ("127.0.0.1", port))
            read(min(start + 20, len(messages)))
        assert len(got) == len(messages), f"{len(got)} of {len(messages)} arrived"
        return got
    finally:
        tx.close()


@pytest.fixture
def keys() -> tuple[int, int, int, int]:
    return spread.keys_from(uuid.uuid4().bytes)


@pytest.fixture
def closing() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for s in opened:
        s.close()


def invite(call_id: str, *, routes: int = 0, seq: int = 0, method: str = "INVITE") -> bytes:
    rows = [f"{method} sip:700100000000001@127.0.0.1 SIP/2.0",
            f"Via: SIP/2.0/UDP 127.0.0.1:5080;branch=z9hG4bK{uuid.uuid4().hex}"]
    rows += [f"Route: <sip:127.0.0.1:{5061 + r};lr;s7t={'t' * 180}>" for r in range(routes)]
    rows += ["From: <sip:13800000000@127.0.0.1>;tag=1", "To: <sip:700100000000001@127.0.0.1>",
             f"Call-ID: {call_id}", f"CSeq: {seq + 1} {method}", "Content-Length: 0", "", ""]
    return "\r\n".join(rows).encode()


def test_the_kernel_picks_the_socket_the_program_computes_and_spreads_calls(
    keys: tuple[int, int, int, int], closing: list[socket.socket]
) -> None:
    """600 calls' INVITEs from one source: each reaches the socket the hash names (bind order),
    and every socket takes a fair share; one source alone would otherwise reach one socket."""
    socks, port = group(3, keys)
    closing += socks
    messages = [invite(f"{i}-{uuid.uuid4().hex[:6]}@10.0.0.1") for i in range(600)]
    got = deliver(socks, port, messages)
    wrong = [m for m in messages if got[m] != spread.expected_socket(m, 3, keys)]
    assert wrong == []
    shares = collections.Counter(got.values())
    assert sorted(shares) == [0, 1, 2] and min(shares.values()) >= 120, shares


def test_every_request_of_a_call_reaches_one_socket(
    keys: tuple[int, int, int, int], closing: list[socket.socket]
) -> None:
    """INVITE, its retransmission, CANCEL, ACK and BYE (with Route rows before the Call-ID) of
    each call land together: the worker holding the call sees them all."""
    socks, port = group(2, keys)
    closing += socks
    calls = [f"{uuid.uuid4()}@pc33.example.com" for _ in range(100)]
    messages = {c: [invite(c), invite(c), invite(c, method="CANCEL"),
                    invite(c, routes=2, method="ACK"), invite(c, routes=1, seq=1, method="BYE")]
                for c in calls}
    got = deliver(socks, port, [m for ms in messages.values() for m in ms])
    split = [c for c, ms in messages.items() if len({got[m] for m in ms}) != 1]
    assert split == []
    assert len({got[messages[c][0]] for c in calls}) == 2


def test_what_the_program_cannot_read_is_left_to_the_kernel() -> None:
    """Compact form, no space after the colon, a Call-ID row past the scan: the kernel's own
    choice (None); shorter than what it reads: socket 0; Call-Id in another case: read."""
    keys = spread.keys_from(b"k")
    compact = b"OPTIONS sip:x SIP/2.0\r\ni: abcdefghijkl\r\n\r\n" + b"P" * 1000
    assert spread.expected_socket(compact, 2, keys) is None
    assert spread.expected_socket(b"BYE sip:x SIP/2.0\r\nCall-ID:abcdefghij\r\n\r\n" + b"x" * 1000,
                                  2, keys) is None
    far = b"BYE sip:x SIP/2.0\r\nX-Pad: " + b"p" * 950 + b"\r\nCall-ID: abcdefghijkl\r\n\r\n"
    assert spread.expected_socket(far, 2, keys) is None
    assert spread.expected_socket(b"\r\n\r\n", 2, keys) == 0
    info = b"INVITE sip:x SIP/2.0\r\nCall-Info: <http://x>\r\nCall-ID: abcdefghijkl\r\n\r\n"
    assert spread.expected_socket(info + b"x" * 1000, 2, keys) is None
    assert spread.expected_socket(b"BYE sip:x SIP/2.0\r\nCall-Id: abcdefghijkl\r\n\r\n", 2,
                                  keys) in (0, 1)


def test_compact_and_far_rows_still_reach_one_socket_per_source(
    keys: tuple[int, int, int, int], closing: list[socket.socket]
) -> None:
    """Left to the kernel, one source's datagrams stay on one socket: a trunk using the compact
    form keeps each call on one worker (just not spread)."""
    socks, port = group(2, keys)
    closing += socks
    messages = [f"OPTIONS sip:x SIP/2.0\r\ni: {uuid.uuid4()}\r\nX-Pad: {'p' * 1000}\r\n\r\n"
                .encode() for _ in range(50)]
    assert all(spread.expected_socket(m, 2, keys) is None for m in messages)
    got = deliver(socks, port, messages)
    assert len(set(got.values())) == 1


def test_keys_are_the_instances_own() -> None:
    assert spread.keys_from(b"a") == spread.keys_from(b"a")
    assert spread.keys_from(b"a") != spread.keys_from(b"b")
    assert all(k % 2 for k in spread.keys_from(b"a")[1::2])  # odd multipliers


class _SmallKernel:
    """A socket whose kernel takes programs up to `limit` instructions (net.core.optmem_max)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sizes: list[int] = []

    def setsockopt(self, level: int, option: int, value: bytes) -> None:
        size = int.from_bytes(value[:2], "little")
        self.sizes.append(size)
        if size > self.limit:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")


def test_a_kernel_short_of_option_memory_gets_a_shorter_scan() -> None:
    small = _SmallKernel(2000)
    scan = spread.attach(small, 2, spread.keys_from(b"k"))  # type: ignore[arg-type]
    assert scan == spread.SCAN_BYTES // 2 and small.sizes[-1] <= 2000 < small.sizes[0]
    with pytest.raises(OSError):
        spread.attach(_SmallKernel(100), 2, spread.keys_from(b"k"))  # type: ignore[arg-type]


def test_the_program_refuses_a_group_of_one() -> None:
    with pytest.raises(ValueError):
        spread.program(1, spread.keys_from(b"k"))


def test_one_socket_takes_everything_and_the_call_id_program_spreads_again(
    keys: tuple[int, int, int, int], closing: list[socket.socket]
) -> None:
    """single_program(i) sends every datagram to socket i, whatever its Call-ID; attaching the
    Call-ID program again (any socket of the group) spreads them as before."""
    socks, port = group(3, keys)
    closing += socks
    spread.attach_single(socks[0], 2)
    messages = [invite(f"{i}-{uuid.uuid4().hex[:6]}@10.0.0.1") for i in range(200)]
    got = deliver(socks, port, messages)
    assert set(got.values()) == {2}
    spread.attach(socks[1], 3, keys)
    messages = [invite(f"{i}-{uuid.uuid4().hex[:6]}@10.0.0.2") for i in range(300)]
    got = deliver(socks, port, messages)
    assert [m for m in messages if got[m] != spread.expected_socket(m, 3, keys)] == []
    assert sorted(set(got.values())) == [0, 1, 2]


def test_the_single_program_refuses_an_index_out_of_range() -> None:
    for index in (-1, 0x10000):
        with pytest.raises(ValueError):
            spread.single_program(index)
