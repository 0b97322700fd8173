"""The transport's pure pieces: which worker a message goes to, and the non-blocking log writer.

No proxy process: the worker choice is driven with bytes (and one ProxyCore, sans-IO); the log
writer with a real pipe that nobody reads.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import socket
import time
from typing import Any

import pytest

from proxy.bindings.model import Outcome, Resolution
from proxy.config import OverloadConfig
from proxy.core import CoreSettings, Hop, ProxyCore
from proxy.logs import NonBlockingLineWriter
from proxy.privacy import DialogSealer
from proxy.transport import (
    IDLE_TICK_S,
    LOW_RATE_MESSAGES_PER_S,
    PASS_SENDS_MESSAGES_PER_S,
    QUEUE_STANDING_S,
    TICK_S,
    ProxyServer,
    branch_worker,
    call_id_hasher,
    call_id_owner,
    route_worker,
)


def response(via_rows: list[str], status: str = "200 OK") -> bytes:
    return ("\r\n".join([f"SIP/2.0 {status}", *via_rows, "From: <sip:a@h>;tag=1",
                         "To: <sip:b@h>;tag=2", "Call-ID: c1", "CSeq: 1 INVITE",
                         "Content-Length: 0"]) + "\r\n\r\n").encode()


# ---- responses: by the worker named in the top Via's branch -----------------------------------

@pytest.mark.parametrize(("via", "worker"), [
    ("Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKs7000a1b2c3d41", 0),
    ("Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKs7001a1b2c3d41", 1),
    ("Via: SIP/2.0/UDP 10.0.0.1:5060;rport=5060;branch=z9hG4bKs70ffdeadbeef7", 255),
    ("v: SIP/2.0/TCP 10.0.0.1;branch=z9hG4bKs73e8deadbeef7;received=10.0.0.9", 1000),
    ("VIA:SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bKs7002x", 2),
])
def test_branch_names_the_worker(via: str, worker: int) -> None:
    data = response([via, "Via: SIP/2.0/UDP 10.0.0.7;branch=z9hG4bKs7009other"])
    assert branch_worker(data) == worker


@pytest.mark.parametrize("vias", [
    ["Via: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK-sipp-1"],  # not ours
    ["Via: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK-x",  # ours only below the top Via
     "Via: SIP/2.0/UDP 10.0.0.2;branch=z9hG4bKs7001abc"],
    ["Via: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK-x, SIP/2.0/UDP 10.0.0.2;branch=z9hG4bKs7001abc"],
    ["Via: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKs7"],  # too short
    ["Via: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKs70G1abc"],  # not hex
    ["Via: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKs7 01abc"],
    ["Via: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKs7+01abc"],
    [],  # no Via at all
])
def test_branch_not_ours_names_no_worker(vias: list[str]) -> None:
    assert branch_worker(response(vias)) is None


def test_branch_the_core_writes_names_its_worker() -> None:
    """The core's own branches (CoreSettings.worker_index) lead a response back to it."""
    for index in (0, 1, 7, 300):
        settings = CoreSettings(
            advertise_host="127.0.0.1", advertise_port=5060, is_trusted=lambda ip: True,
            middle_number=lambda n: n.startswith("700"),
            gateways=[Hop("127.0.0.1", 5090, "udp")], worker_index=index)
        core = ProxyCore(settings, DialogSealer(bytes(32)))
        core.receive_datagram((
            b"INVITE sip:700100000000001@127.0.0.1 SIP/2.0\r\n"
            b"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-a-1\r\n"
            b"From: <sip:13800000001@127.0.0.1>;tag=a\r\nTo: <sip:700100000000001@127.0.0.1>\r\n"
            b"Call-ID: c1\r\nCSeq: 1 INVITE\r\nContact: <sip:13800000001@127.0.0.1:5070>\r\n"
            b"Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"),
            ("127.0.0.1", 5070), "udp", 0.0)
        relay, _x, _caller = core.lookups.pop()
        core.complete_lookup(relay, Resolution(Outcome.ROUTE, "13900000001", 1e12), 0.0)
        forwarded = [o.data for o in core.outbox if o.dest == ("127.0.0.1", 5090)]
        assert len(forwarded) == 1
        top_via = next(row for row in forwarded[0].split(b"\r\n") if row.startswith(b"Via:"))
        assert branch_worker(response([top_via.decode()])) == index


# ---- in-dialog requests on the shared port: by the worker port their top Route names -----------

@pytest.mark.parametrize(("rows", "worker"), [
    (["Route: <sip:127.0.0.1:5062;lr;s7t=abc>", "Route: <sip:10.0.0.9:5062;lr>"], 1),
    (["route:<sip:127.0.0.1:5061;lr>"], 0),
    (["ROUTE: <sip:[::1]:5063;lr;s7t=x>"], 2),
    (["Route: <sip:127.0.0.1:5062;lr>, <sip:127.0.0.1:5061;lr>"], 1),
    (["Route: \"p\" <sip:127.0.0.1:5061;transport=udp;lr>"], 0),
    (["Record-Route: <sip:127.0.0.1:5062;lr>"], None),  # not a Route
    (["Route: <sip:127.0.0.1:5064;lr>"], None),  # past the range
    (["Route: <sip:127.0.0.1:5060;lr>"], None),  # the shared port: here
    (["Route: <sip:127.0.0.1;lr>"], None),  # no port
    (["Route: <sip:127.0.0.1;lr>", "Route: <sip:127.0.0.1:5062;lr>"], None),  # the top one only
    (["Routed: <sip:127.0.0.1:5061;lr>", "Route: <sip:127.0.0.1:5062;lr>"], 1),  # not a Route
    ([], None),  # an initial request
])
def test_route_names_the_worker(rows: list[str], worker: int | None) -> None:
    data = ("\r\n".join(["BYE sip:b@10.0.0.2 SIP/2.0", "Via: SIP/2.0/UDP h;branch=z9hG4bK1",
                          *rows, "Call-ID: c1", "CSeq: 2 BYE", "Content-Length: 0"])
            + "\r\n\r\n").encode()
    assert route_worker(data, 5061, 3) == worker


# ---- requests: by a keyed hash of the Call-ID ---------------------------------------------------

def request(call_id: str, header: str = "Call-ID") -> bytes:
    return (f"INVITE sip:700100000000001@h SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
            f"{header}: {call_id}\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n").encode()


def test_call_id_owner_is_stable_and_ignores_the_header_form() -> None:
    hasher = call_id_hasher(b"k" * 32)
    owner = call_id_owner(request("abc@host"), 8, hasher)
    assert call_id_owner(request("abc@host"), 8, hasher) == owner  # the state is copied
    assert call_id_owner(request("abc@host", "i"), 8, hasher) == owner
    assert call_id_owner(request("abc@host  ", "call-id"), 8, hasher) == owner
    assert call_id_owner(b"INVITE sip:x@h SIP/2.0\r\n\r\n", 8, hasher) == 0  # no Call-ID


def test_call_id_owner_depends_on_the_key_and_spreads_calls() -> None:
    """Without the key nobody can aim Call-IDs at one worker; with it, calls spread evenly."""
    rng = random.Random(7)
    ids = [f"{rng.getrandbits(64):x}@sbc.example" for _ in range(4000)]
    one, other = call_id_hasher(os.urandom(32)), call_id_hasher(os.urandom(32))
    owners = [call_id_owner(request(c), 4, one) for c in ids]
    assert owners != [call_id_owner(request(c), 4, other) for c in ids]
    counts = collections.Counter(owners)
    assert set(counts) == {0, 1, 2, 3}
    assert all(800 < n < 1200 for n in counts.values()), counts
    # the Call-IDs that crc32 (the old, unkeyed choice) sends to worker 0 spread out too
    import zlib
    aimed = [c for c in ids if zlib.crc32(c.encode()) % 4 == 0]
    assert len(collections.Counter(call_id_owner(request(c), 4, one) for c in aimed)) == 4


# ---- the log writer never blocks and never cuts a record -------------------------------------

@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_log_writer_on_a_full_pipe_keeps_then_drops_whole_records(kind: str) -> None:
    """stdout a pipe or a stream socket (journald) that nobody reads: nothing blocks."""
    if kind == "pipe":
        read_fd, write_fd = os.pipe()
    else:
        a, b = socket.socketpair()
        read_fd, write_fd = a.detach(), b.detach()
    try:
        writer = NonBlockingLineWriter(write_fd, max_pending=64 * 1024)
        records = [json.dumps({"event": "e", "n": i, "pad": "x" * (100 + i % 300)})
                   for i in range(3000)]
        for r in records:
            writer.write_line(r)  # would block on the first full pipe if it could
        assert writer.dropped > 0 and 0 < len(writer.pending) <= 64 * 1024 + 500
        got = bytearray()
        while not writer.flush():
            got += os.read(read_fd, 1 << 16)
        os.set_blocking(read_fd, False)
        with pytest.raises(BlockingIOError):
            while True:
                got += os.read(read_fd, 1 << 16)
        written = [json.loads(ln) for ln in got.decode().splitlines()]  # each one whole
        assert written == [json.loads(records[w["n"]]) for w in written]
        assert [w["n"] for w in written] == sorted({w["n"] for w in written})  # in order, once
        assert len(written) + writer.dropped == len(records)
        assert not writer.pending
    finally:
        os.close(read_fd)
        os.close(write_fd)


# ---- overload: datagrams waiting in the kernel ----------------------------------------------

def _server(rcvbuf: int, max_receive_queue_kb: int, max_receive_wait_ms: int = 200
            ) -> ProxyServer:
    settings = CoreSettings(
        advertise_host="127.0.0.1", advertise_port=5060, is_trusted=lambda ip: True,
        middle_number=lambda n: n.startswith("700"), gateways=[Hop("127.0.0.1", 5090, "udp")])
    overload = OverloadConfig(max_loop_lag_ms=200, max_receive_queue_kb=max_receive_queue_kb,
                              max_receive_wait_ms=max_receive_wait_ms)
    return ProxyServer(ProxyCore(settings, DialogSealer(bytes(32))), None, listen=[],
                       udp_rcvbuf=rcvbuf, overload=overload)


def test_the_tick_slows_down_while_few_messages_arrive_and_not_for_timers_or_load() -> None:
    async def run() -> None:
        server = _server(rcvbuf=1 << 20, max_receive_queue_kb=1024)
        core = server.core
        core.received = 10_000
        now = 100.0
        # nothing arrived, a few (200 CPS: 12 messages in 10 ms, 36 in 30 ms): the slow tick
        assert server._tick_period(now, None, 10_000, TICK_S) == IDLE_TICK_S
        assert server._tick_period(now, None, 10_000 - 12, TICK_S) == IDLE_TICK_S
        assert server._tick_period(now, None, 10_000 - 36, IDLE_TICK_S) == IDLE_TICK_S
        # at the limit still slow, past it the 10 ms tick, whichever period the count is over
        at_limit = int(LOW_RATE_MESSAGES_PER_S * TICK_S)
        assert server._tick_period(now, None, 10_000 - at_limit, TICK_S) == IDLE_TICK_S
        assert server._tick_period(now, None, 10_000 - at_limit - 1, TICK_S) == TICK_S
        over_slow = int(LOW_RATE_MESSAGES_PER_S * IDLE_TICK_S) + 1
        assert server._tick_period(now, None, 10_000 - over_slow, IDLE_TICK_S) == TICK_S
        assert server._tick_period(now, None, 10_000 - over_slow, TICK_S) == TICK_S
        # a timer due sooner than the slow tick: woken for it, never later, never under 10 ms
        assert server._tick_period(now, now + 0.017, 10_000, TICK_S) == pytest.approx(0.017)
        assert server._tick_period(now, now + 0.001, 10_000, TICK_S) == TICK_S
        assert server._tick_period(now, now + 0.5, 10_000, TICK_S) == IDLE_TICK_S
        # shedding, or lookups waiting for the store: the 10 ms tick whatever the rate
        core.overloaded = True
        assert server._tick_period(now, None, 10_000, TICK_S) == TICK_S
        core.overloaded = False
        server._batched_lookups = 1
        assert server._tick_period(now, None, 10_000, TICK_S) == TICK_S

    asyncio.run(run())

async def _listening(server: ProxyServer) -> tuple[ProxyServer, Any, tuple[str, int]]:
    """`server` on a real UDP socket of its own (port chosen by the kernel)."""
    server.loop = asyncio.get_running_loop()
    _, udp = await server._open_udp("127.0.0.1", 0, own=True)
    return server, udp, udp.get_extra_info("sockname")


def test_a_full_receive_queue_sheds_new_calls_until_it_drains() -> None:
    """Datagrams the loop has not read yet (a real socket, the loop kept busy) put the worker
    in overload although its lag is nil; once they are read, it clears."""
    async def run() -> None:
        server, udp, address = await _listening(_server(rcvbuf=4 << 20, max_receive_queue_kb=64))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for _ in range(200):  # ~250 KiB of kernel memory: over 64 KiB
                sender.sendto(b"OPTIONS sip:x SIP/2.0\r\n" + b"X" * 600, address)
            server._check_overload(0.0, 100.0)
            assert not server.core.overloaded  # a burst, so far: it may be read in time
            assert server.overload_gauges()["udp_receive_queue_bytes"] > 64 * 1024
            server._check_overload(0.0, 100.0 + QUEUE_STANDING_S / 2)
            assert not server.core.overloaded
            server._check_overload(0.0, 100.001 + QUEUE_STANDING_S)
            assert server.core.overloaded  # it stood over the limit: overload
            server._check_overload(0.0, 100.5)
            assert server.core.overloaded  # still waiting: no turn of the loop yet
            await asyncio.sleep(0.05)  # the loop reads them (and answers nothing: not SIP)
            server._check_overload(0.0, 100.6)
            assert not server.core.overloaded
            assert server.overload_gauges()["udp_receive_queue_bytes"] < 64 * 1024
        udp.close()
        server._check_overload(0.0, 101.0)  # a closed socket is read no more (fd reuse)
        assert server._udp_sockets == []
    asyncio.run(run())


def test_a_datagram_that_waited_too_long_in_the_kernel_sheds_new_calls() -> None:
    """One small datagram, far under the queue's size limit, left unread (the loop kept busy)
    longer than max_receive_wait_ms: the kernel's arrival stamp says how long it waited, and
    that is overload; once the loop has read it, the wait is nil again and it clears."""
    async def run() -> None:
        server, udp, address = await _listening(
            _server(rcvbuf=4 << 20, max_receive_queue_kb=1024, max_receive_wait_ms=40))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"OPTIONS sip:x SIP/2.0\r\n", address)
            time.sleep(0.005)
            server._check_overload(0.0, 10.0)
            assert not server.core.overloaded
            assert 0 <= server.overload_gauges()["udp_receive_wait_ms"] < 40
            time.sleep(0.06)  # the loop cannot run: the datagram keeps waiting
            server._check_overload(0.0, 10.1)
            assert server.core.overloaded
            gauges = server.overload_gauges()
            assert gauges["udp_receive_wait_ms"] >= 60
            assert gauges["overload_max_receive_wait_ms"] == 40
            assert 0 < gauges["udp_receive_queue_bytes"] < 1024 * 1024  # the size said nothing
            server._check_overload(0.0, 10.2)  # peeked at, not read: it is still there
            assert server.core.overloaded and server.receive_wait >= 0.06
            await asyncio.sleep(0.05)  # the loop reads it
            server._check_overload(0.0, 10.3)
            assert not server.core.overloaded
            assert server.overload_gauges()["udp_receive_wait_ms"] == 0
        udp.close()
    asyncio.run(run())


def test_a_queue_that_falls_under_its_limit_in_time_sheds_nothing() -> None:
    """Over the limit, then read before QUEUE_STANDING_S: the next time it goes over, the
    clock starts again."""
    async def run() -> None:
        server, udp, address = await _listening(_server(rcvbuf=4 << 20, max_receive_queue_kb=64))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for burst_at in (10.0, 10.0 + QUEUE_STANDING_S * 0.9):
                for _ in range(200):
                    sender.sendto(b"X" * 600, address)
                server._check_overload(0.0, burst_at)
                assert not server.core.overloaded
                await asyncio.sleep(0.05)  # read
                server._check_overload(0.0, burst_at + QUEUE_STANDING_S * 0.5)
                assert server.overload_gauges()["udp_receive_queue_bytes"] < 64 * 1024
            # over the limit for 0.9 + 0.5 standing times in all, never for one: no overload
            assert not server.core.overloaded
            assert server.core.stats.get("overload_entered", 0) == 0
        udp.close()
    asyncio.run(run())


def test_datagrams_the_kernel_dropped_are_counted_and_shed_new_calls() -> None:
    async def run() -> None:
        server = _server(rcvbuf=4096, max_receive_queue_kb=1024)  # the kernel's minimum
        server.loop = asyncio.get_running_loop()
        _, udp = await server._open_udp("127.0.0.1", 0, own=True)
        address = udp.get_extra_info("sockname")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for _ in range(100):
                sender.sendto(b"X" * 600, address)
        server._check_overload(0.0, 10.0)
        assert server.core.overloaded  # the queue is far under 1 MiB: the drops decided
        assert server.core.stats["udp_receive_drops"] > 50
        udp.close()
    asyncio.run(run())


def _bye(n: int) -> bytes:
    return ("BYE sip:x@127.0.0.1 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:5999;rport;branch=z9hG4bK{n}\r\n"
            "From: <sip:a@h>;tag=1\r\nTo: <sip:b@h>;tag=2\r\nCall-ID: c1\r\n"
            f"CSeq: {n} BYE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode()


def test_under_load_a_loop_pass_s_sends_leave_together_after_its_datagrams() -> None:
    """Past PASS_SENDS_MESSAGES_PER_S the replies a pass makes wait for the end of the pass (one
    loop callback); below it each leaves as its datagram is handled. A BYE without our dialog
    token gets its 481 at once: the reply shows when the sends left."""
    async def run() -> None:
        server, udp, _ = await _listening(_server(rcvbuf=1 << 20, max_receive_queue_kb=1024))
        server.udp[socket.AF_INET] = udp  # replies leave from the shared port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            peer.bind(("127.0.0.1", 0))
            peer.setblocking(False)
            source = peer.getsockname()
            server._pass_sends = True
            for n in (1, 2, 3):  # as uvloop hands over the datagrams of one pass
                server.on_datagram(_bye(n), source)
                assert len(server.core.outbox) == n  # made, not sent
            with pytest.raises(BlockingIOError):
                peer.recv(65536)
            await asyncio.sleep(0)  # the end of the pass
            assert server.core.outbox == []
            await asyncio.sleep(0.05)
            replies = [peer.recv(65536) for _ in range(3)]
            assert [r.split(b"\r\n")[0] for r in replies] == \
                [b"SIP/2.0 481 Call/Transaction Does Not Exist"] * 3
            assert [r.split(b"CSeq: ")[1][:1] for r in replies] == [b"1", b"2", b"3"]
            server._pass_sends = False
            server.on_datagram(_bye(4), source)
            assert server.core.outbox == []  # sent as it was handled
            await asyncio.sleep(0.05)
            assert b"CSeq: 4 BYE" in peer.recv(65536)
        udp.close()
    asyncio.run(run())


def test_the_tick_sends_per_pass_only_while_many_messages_arrive() -> None:
    async def run() -> None:
        server = _server(rcvbuf=1 << 20, max_receive_queue_kb=1024)
        server.loop = asyncio.get_running_loop()
        core = server.core

        async def becomes(expected: bool, arriving: int) -> None:
            for _ in range(200):  # a tick is 10-30 ms away
                if server._pass_sends is expected:
                    return
                core.received += arriving  # every 5 ms: `arriving` × 200 a second
                await asyncio.sleep(0.005)
            raise AssertionError(f"_pass_sends still {server._pass_sends} after 1 s")

        server._pass_sends = True
        ticker = asyncio.get_running_loop().create_task(server._tick())
        try:
            await becomes(False, 0)  # nothing arrives
            await becomes(True, 1000)  # 200,000 a second: well past the limit
            # 1,000 CPS on one worker (7,000 a second): each datagram's sends at once
            assert PASS_SENDS_MESSAGES_PER_S > 7_000
            await becomes(False, 35)
        finally:
            ticker.cancel()
    asyncio.run(run())
