"""The asyncio shell: UDP, TCP and TLS endpoints, the relay between workers, the timer tick and
the binding-lookup step.

With several workers, each binds the shared SIP port (SO_REUSEPORT) and a port of its own. Its
Via and Record-Route name its own port, so responses to what it forwards and the in-dialog
requests of its calls come straight to it. On the shared UDP port the kernel picks the worker
by the Call-ID (proxy/spread.py), so every request a caller sends in a call reaches the worker
that took its INVITE, even from a trunk that ignores the Record-Route; a worker passes on, over a
unix socket, only what belongs elsewhere: a response by the worker index in its branch, an
in-dialog request by the worker port its Route names. Where the kernel refuses the program,
requests go to the owner of their Call-ID by a keyed hash instead.

Everything protocol-shaped happens in `ProxyCore`; this module moves bytes, reads the clock and
awaits the store. The per-datagram path is synchronous: parse, decide, send, with the binding
answered from memory; only a cache miss on the Redis store creates a task. What untrusted peers
can make it hold is capped: TCP and TLS connections (in all and per source, counted together,
TLS ones from the moment they are accepted, before any handshake), output waiting for a peer,
messages waiting for another worker.

TCP/TLS connections: one per destination, held by one worker (proxy/connections.py); a worker
with something for a connection another worker holds passes it there over the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import socket
import ssl
import struct
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Final

import structlog

from proxy import logs, spread, steering
from proxy.bindings.model import Resolution, StoreUnavailable
from proxy.connections import SEND_FLAG, decode_send, destination_owner, encode_send
from proxy.core import Outgoing, ProxyCore, Relay
from proxy.legs import response_fallback
from proxy.sip.message import StreamFramer
from proxy.sockbuf import size_buffer
from proxy.tls import TlsClosed, TlsLayer

log = structlog.get_logger("sip700.transport")

TICK_S: Final = 0.01
# the tick's period while nothing arrives and no timer is due sooner: an idle worker (the
# second one while one takes every call, or any at night) wakes 30 times a second, not 100.
# Under steering.SWITCH_DELAY_S (50 ms), so a worker still reads a change of mode on the board
# before the kernel's program changes (measured: an idle worker 1.4 % of a core at 10 ms)
IDLE_TICK_S: Final = 0.03
# … and while fewer messages than this a second arrive (under ~330 calls a second of six
# messages): at 200 CPS a worker's 100 ticks a second were 2 % of a core, each costing about
# 190 µs with its caches cold. Timers keep their precision (a tick comes no later than the
# next one due), and past this rate the 10 ms tick is back for the overload signals
LOW_RATE_MESSAGES_PER_S: Final = 2000
# past this many messages a second (per worker, over the last tick), a UDP datagram's sends
# wait for the end of the event loop's pass (_flush_pass): ~1,700 calls a second on one worker
PASS_SENDS_MESSAGES_PER_S: Final = 10_000
QUEUE_STANDING_S: Final = 0.1  # a receive queue over its limit this long is overload
# getsockopt(SO_MEMINFO) (Linux): u32 sk_meminfo[]; [0] rmem_alloc, [8] drops
SO_MEMINFO: Final = 55
SK_MEMINFO_BYTES: Final = 36
_MEMINFO: Final = struct.Struct("9I")
# the kernel's arrival time on each datagram (Linux SO_TIMESTAMPNS: a struct timespec of
# CLOCK_REALTIME in a control message), read off the oldest one waiting with MSG_PEEK
SO_TIMESTAMPNS: Final = 35
_TIMESPEC: Final = struct.Struct("qq")
_TIMESPEC_SPACE: Final = socket.CMSG_SPACE(_TIMESPEC.size)
# The core's clock is time.monotonic(): the loop's own clock is cached per iteration at
# millisecond resolution, too coarse for the latencies the call log reports.
# Call-ID row at the start of a line, long or compact form, any case (RFC 3261 §7.3.3)
_CALL_ID: Final = re.compile(rb"\n(?:call-id|i)[ \t]*:[ \t]*([^\r\n]+)", re.IGNORECASE)
# the top Via row of a message, long or compact form, any case
_VIA: Final = re.compile(rb"\n(?:via|v)[ \t]*:", re.IGNORECASE)
# the top Route row (named Route, route or ROUTE) and the port of its URI: our Route URIs carry
# no user part and an IPv6 host is bracketed, so the first ":port" before ";" or ">" is the
# port; no port there, no group (the row still stops the search: only the top Route counts)
_ROUTE_PORT: Final = re.compile(rb"\n(?:Route|route|ROUTE)[ \t]*:(?:[^\r\n]*?:(\d{1,5})[;>])?")
# the core's branches: z9hG4bKs7 + 3 lowercase hex digits of the worker index + salt + sequence
_OUR_BRANCH: Final = "branch=z9hG4bKs7"
_HEX: Final = "0123456789abcdef"
_RELAY_HEADER: Final = struct.Struct("!IH46s")  # length, source port, source host (NUL-padded)
RELAY_MAX_PAYLOAD: Final = 65535 + 256  # a message (+ a send's first line); longer: stream broken
RELAY_MAX_QUEUED_BYTES: Final = 4 << 20  # per outbox: queued while connecting + the write buffer
LOG_EVERY_S: Final = 1.0  # at most one line per second for each rate-limited warning


def call_id_hasher(key: bytes) -> Any:
    """The keyed hash state call_id_owner copies: blake2b keyed with the workers' shared key.

    A keyed hash, so that a caller cannot choose Call-IDs that all land on one worker.
    """
    return hashlib.blake2b(key=key, digest_size=8)


def call_id_owner(data: bytes, workers: int, hasher: Any) -> int:
    """Which worker owns the transaction state of this request: a keyed hash of its Call-ID.

    Every request of a call (retransmissions, CANCEL, ACK) carries the same Call-ID, so it
    meets its transactions whichever worker the kernel handed it to. `hasher` comes from
    call_id_hasher(key), with one key for all workers.
    """
    m = _CALL_ID.search(data)
    if m is None:
        return 0
    h = hasher.copy()
    h.update(m.group(1).strip())
    return int.from_bytes(h.digest(), "little") % workers


def route_worker(data: bytes, base: int, workers: int) -> int | None:
    """The worker whose own port (base + index) the top Route of a request names; None when
    it names no port of that range (an initial request: no Route to us)."""
    m = _ROUTE_PORT.search(data)  # one search, not a find for each spelling: compiled, a
    if m is None:                  # method call costs more than the scan
        return None
    port = m.group(1)
    if port is None:
        return None
    worker = int(port) - base
    return worker if 0 <= worker < workers else None


def branch_worker(data: bytes) -> int | None:
    """The worker index written into the branch of a response's top Via, if the branch is ours.

    The core names its worker in every branch it creates (`z9hG4bKs7` + 3 hex digits), so a
    response finds the worker holding its client transaction wherever it arrives. None when
    the top Via carries no branch of ours.
    """
    # read as str: compiled, str's find, slices and compares are C calls, bytes.find a call
    # by name (each costing more than decoding the datagram)
    text = data.decode("latin-1")
    start = text.find("\n") + 1
    if text[start:start + 4] == "Via:":  # the usual layout: the top Via is the first row
        start += 4
    else:
        m = _VIA.search(data)
        if m is None:
            return None
        start = m.end()
    end = text.find("\n", start)
    i = text.find(_OUR_BRANCH, start, end if end >= 0 else len(text))
    if i < 0 or text.find(",", start, i) >= 0:  # after a comma: a second Via in the row
        return None
    i += len(_OUR_BRANCH)
    digits = text[i: i + 3]
    if len(digits) != 3 or digits.strip(_HEX):
        return None
    return int(digits, 16)


def _oldest_wait(sock: socket.socket) -> float:
    """How long (s) the datagram at the head of `sock`'s receive queue has waited there: the
    kernel's arrival stamp (SO_TIMESTAMPNS) read with MSG_PEEK, which leaves it queued. 0 when
    the queue is empty or the datagram carries no stamp (the option was refused)."""
    try:
        _, ancillary, _, _ = sock.recvmsg(1, _TIMESPEC_SPACE, socket.MSG_PEEK)
    except OSError:  # BlockingIOError: read meanwhile (the socket is non-blocking)
        return 0.0
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            # the realtime clock: a step of it skews one reading, never below nil
            return max(0.0, time.time() - (sec + nsec / 1e9))
    return 0.0


def relay_address(group: str, index: int) -> str:
    """Unix socket path of one worker's relay inbox (`group` is the supervisor's private dir)."""
    return f"{group}/worker{index}.sock"


class _UdpEndpoint(asyncio.DatagramProtocol):
    """The shared SIP port: what lands here may belong to another worker."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None
        # a shared port's socket: its place in the server's list (its reuseport group, for
        # proxy/steering.py), and the last datagram it took (which socket the kernel's
        # program made it, learned from it once a second)
        self.group = -1
        self.sample: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.sample = data
        self.server.on_datagram(data, (addr[0], addr[1]), self)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: the transaction layer times out on its own
        self.server.core.stats["udp_errors"] = self.server.core.stats.get("udp_errors", 0) + 1


class _OwnUdpEndpoint(_UdpEndpoint):
    """This worker's own port: what lands here is this worker's (see on_own_datagram)."""

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.server.on_own_datagram(data, (addr[0], addr[1]))


class _TcpConnection(asyncio.Protocol):
    """One TCP or TLS connection, accepted (`peer` None until connection_made) or opened by us.

    Output is bounded: when the peer does not read, asyncio's write buffer passes the high-water
    mark, and the proxy stops reading from that peer until it drains (its requests are what
    make the output); if the buffer still grows past tcp_max_output_bytes, the connection is
    closed. Data queued while the connection is still being opened (or its TLS handshake is
    under way) is bounded the same way. TLS runs inside the protocol (proxy/tls.py): the
    transport, the caps and the back-pressure are those of the TCP connection under it.
    """

    def __init__(self, server: ProxyServer, peer: tuple[str, int] | None = None, *,
                 tls: bool = False, server_hostname: str | None = None) -> None:
        self.server = server
        self.framer = StreamFramer(server.max_message_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer = peer
        self.counted = False  # holds a place under the accepted-connection caps
        self.last_active = time.monotonic()
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.kind = "tls" if tls else "tcp"
        self.tls: TlsLayer | None = None
        self.server_hostname = server_hostname
        self.ready = False  # connected (and for TLS, handshake done): sends go out at once
        self._handshake_timer: asyncio.TimerHandle | None = None

    def usable(self, kind: str) -> bool:
        """Whether a message for `kind` may go on this connection now or once it is up."""
        transport = self.transport
        return self.kind == kind and (transport is None or not transport.is_closing())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        server = self.server
        if self.peer is None:
            addr = transport.get_extra_info("peername")
            self.peer = (addr[0], addr[1])
            if not server.admit(self):
                transport.abort()  # type: ignore[attr-defined]  # over a connection cap
                return
        high = server.tcp_write_high
        self.transport.set_write_buffer_limits(high=high, low=high // 4)  # type: ignore[union-attr]
        server.tcp_connections[self.peer] = self
        if self.kind == "tls":
            accepted = self.counted
            ctx = server.tls_server if accepted else server.tls_client
            if ctx is None:  # no TLS configured for this direction: nothing to talk
                server.count("tls_not_configured")
                transport.abort()  # type: ignore[attr-defined]
                return
            try:
                self.tls = TlsLayer(ctx, server_side=accepted,
                                    server_hostname=None if accepted else self.server_hostname)
                hello = self.tls.start()
            except (ssl.SSLError, ValueError) as exc:
                self._tls_failed(exc)
                return
            if hello:
                transport.write(hello)  # type: ignore[attr-defined]
            self._handshake_timer = server.loop.call_later(server.tls_handshake_timeout,
                                                           self._handshake_expired)
            return  # what waits goes out once the handshake is done
        self._now_ready()

    def _now_ready(self) -> None:
        self.ready = True
        pending, self.pending = self.pending, []
        self.pending_bytes = 0
        for data in pending:
            self.send(data)

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if not self.ready and self.transport is not None:
            self.server.count("tls_handshake_timeout")
            self.transport.abort()

    def _tls_failed(self, exc: BaseException) -> None:
        server = self.server
        assert self.peer is not None
        server.count("tls_handshake_failed" if not self.ready else "tls_errors")
        server.log_limited("tls_failed", peer=f"{self.peer[0]}:{self.peer[1]}",
                           accepted=self.counted, error=str(exc) or type(exc).__name__)
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        assert self.peer is not None
        tls = self.tls
        if tls is not None:
            try:
                data, reply = tls.receive(data)
            except TlsClosed:
                if self.transport is not None:
                    self.transport.close()
                return
            except (ssl.SSLError, ValueError) as exc:
                self._tls_failed(exc)
                return
            if reply and self.transport is not None:
                self.transport.write(reply)
            if not self.ready and tls.established:
                if self._handshake_timer is not None:
                    self._handshake_timer.cancel()
                    self._handshake_timer = None
                self._now_ready()
            if not data:
                return
        elif self.kind == "tls":
            return  # a TLS connection that is not set up: nothing it says counts
        self.server.on_stream_data(self, data)

    def pause_writing(self) -> None:
        # the peer is not reading what we write: stop reading what it sends
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
            self.server.count("tcp_paused")

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        if self.peer is not None and self.server.tcp_connections.get(self.peer) is self:
            del self.server.tcp_connections[self.peer]
        if self.counted:
            self.server.release(self)

    def send(self, data: bytes) -> None:
        server = self.server
        self.last_active = time.monotonic()
        transport = self.transport
        if transport is None or not self.ready:  # still connecting (or in its TLS handshake)
            if self.pending_bytes + len(data) > server.tcp_max_output_bytes:
                server.count("tcp_pending_dropped")
                return
            self.pending.append(data)
            self.pending_bytes += len(data)
            return
        if transport.is_closing():
            return
        if self.tls is not None:
            try:
                data = self.tls.send(data)
            except ssl.SSLError as exc:
                self._tls_failed(exc)
                return
        if transport.get_write_buffer_size() + len(data) > server.tcp_max_output_bytes:
            server.count("tcp_output_overflow")
            assert self.peer is not None
            server.log_limited("tcp_output_overflow", peer=f"{self.peer[0]}:{self.peer[1]}",
                               limit=server.tcp_max_output_bytes)
            transport.abort()
            return
        transport.write(data)


class _RelayInbox(asyncio.Protocol):
    """Messages other workers pass to this one (a unix stream, length-prefixed)."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        size = _RELAY_HEADER.size
        at = 0
        while len(buf) - at >= size:
            length, port, host = _RELAY_HEADER.unpack_from(buf, at)
            send = bool(length & SEND_FLAG)
            length &= ~SEND_FLAG
            if length > RELAY_MAX_PAYLOAD:  # not a message: the stream is out of step
                self.server.count("relay_errors")
                log.error("relay_stream_broken", length=length)
                buf.clear()
                if self.transport is not None:
                    self.transport.abort()
                return
            end = at + size + length
            if len(buf) < end:
                break
            payload = bytes(buf[at + size: end])
            at = end
            address = (host.rstrip(b"\0").decode("ascii"), port)
            if send:
                self.server.on_relayed_send(payload, address)
            else:
                self.server.on_relayed(payload, address)
        del buf[:at]


class _RelayOutbox(asyncio.Protocol):
    """The connection to another worker's inbox.

    Messages queue while it connects and are written in one batch per event-loop pass: under
    load one write carries many messages (a syscall each would cost more than the relay).
    What waits (the queue and the transport's write buffer) is bounded by the caller.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.queue: list[bytes] = []
        self.queued = 0  # bytes in queue
        self.scheduled = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.closed = True

    def backlog(self) -> int:
        """Bytes waiting to reach the other worker."""
        if self.transport is None:
            return self.queued
        return self.queued + self.transport.get_write_buffer_size()

    def drain(self) -> None:
        self.scheduled = False
        if self.transport is not None and self.queue:
            self.transport.write(b"".join(self.queue))
            self.queue.clear()
            self.queued = 0


class ProxyServer:
    """Owns the sockets and feeds the core."""

    def __init__(
        self,
        core: ProxyCore,
        store: Any,
        *,
        listen: list[tuple[str, str, int]],
        udp_rcvbuf: int = 4 << 20,
        udp_sndbuf: int = 4 << 20,
        tcp_idle_timeout: float = 300.0,
        tcp_max_connections: int = 4096,
        tcp_max_connections_per_source: int = 256,
        tcp_max_output_bytes: int = 1 << 20,
        max_message_bytes: int = 65535,
        worker_index: int = 0,
        worker_count: int = 1,
        relay_group: str = "",
        relay_key: bytes = b"",
        worker_port: int | None = None,
        overload: Any = None,
        tls_server: ssl.SSLContext | None = None,
        tls_client: ssl.SSLContext | None = None,
        tls_handshake_timeout: float = 10.0,
        tls_server_names: dict[tuple[str, int], str] | None = None,
        steering_board: steering.Board | None = None,
        steering_thresholds: steering.Thresholds | None = None,
    ) -> None:
        self.core = core
        self.policy: Any = None  # the policy's shell (PolicyRunner) when a policy is on
        # overload control (config `overload:`, None: off): the loop's lag, measured on the
        # tick, and the lookups waiting for the store decide whether new INVITEs are shed
        self.overload = overload
        self.loop_lag = 0.0
        # the kernel's receive queues of every UDP socket (SO_MEMINFO): with a large
        # udp_rcvbuf, datagrams wait there for seconds while the loop's lag stays small
        # (uvloop reads a few dozen per turn), so the queue is the overload signal for UDP.
        # With each transport, the socket it was made from: the event loop keeps that very
        # object (its get_extra_info("socket") makes a new one, and a getsockname(), a tick)
        self._udp_sockets: list[tuple[asyncio.DatagramTransport, socket.socket]] = []
        self.receive_queue_bytes = 0
        self.receive_wait = 0.0  # how long the oldest datagram waiting has waited (s)
        self._receive_drops = 0
        self._queue_over_since: float | None = None  # when the queue went over its limit
        self.store = store
        self.listen = listen
        self.udp_rcvbuf = udp_rcvbuf
        self.udp_sndbuf = udp_sndbuf
        self.tcp_idle_timeout = tcp_idle_timeout
        self.tcp_max_connections = tcp_max_connections
        self.tcp_max_connections_per_source = tcp_max_connections_per_source
        self.tcp_max_output_bytes = tcp_max_output_bytes
        # past this much unsent output to a peer, stop reading from it (back-pressure)
        self.tcp_write_high = max(tcp_max_output_bytes // 4, 4096)
        self.max_message_bytes = max_message_bytes
        self.udp: dict[int, asyncio.DatagramTransport] = {}  # the shared port, by family
        # this worker's own port (None: one worker, no port of its own): by family
        self.worker_port = worker_port
        self.own_udp: dict[int, asyncio.DatagramTransport] = {}
        self.tcp_servers: list[asyncio.base_events.Server] = []
        self.shared_tcp_servers: list[asyncio.base_events.Server] = []  # on the listen ports
        self.spare_udp: list[asyncio.DatagramTransport] = []  # the spare range (see bind_spare)
        self._own_tcp_servers: list[asyncio.base_events.Server] = []
        self.tcp_connections: dict[tuple[str, int], _TcpConnection] = {}
        self.tcp_accepted = 0  # accepted connections holding a place under the caps
        self.tcp_per_source: dict[str, int] = {}
        self.loop = asyncio.get_running_loop()
        self._ticker: asyncio.Task[None] | None = None
        # the worker's young-generation collector (proxy.worker.YoungCollector), run each tick
        self.young_collector: Callable[[float], None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # a store that looks up a loop pass's misses in one write (Redis: lookup_batch), and
        # how many of those lookups are out
        self._lookup_batch: Any = getattr(store, "lookup_batch", None)
        self._batched_lookups = 0
        # the misses of this loop pass, sent once its I/O callbacks are done (_send_misses):
        # every datagram the loop read in the pass, not one, shares a write to the store
        self._misses: list[tuple[Relay, str, str]] = []
        # a UDP datagram's sends wait for the end of the loop pass (_flush_pass) while more
        # than PASS_SENDS_MESSAGES_PER_S arrive (set each tick); below, they leave at once
        self._pass_sends = False
        # a _flush_pass is scheduled or running: it sends the pass's misses and checks itself
        self._pass_flush = False
        self._policy_checks: list[tuple[Relay, Resolution]] = []  # the same for the policy
        self._last_logged: dict[str, tuple[float, int]] = {}  # event → (when, suppressed)
        self.worker_index = worker_index
        self.worker_count = worker_count
        self.relay_group = relay_group
        # a random key unless the supervisor gives one (all workers must share it)
        secret = relay_key or os.urandom(32)
        self._call_id_hasher = call_id_hasher(secret)
        # the kernel picks the worker of a datagram on the shared UDP port by its Call-ID
        # (proxy/spread.py): set when the program is attached to every shared UDP socket
        self.kernel_spread = False
        self._spread_scans: list[int] = []  # per shared UDP socket: bytes scanned, 0: refused
        self._flood_weight = 1  # what a UDP request counts for in policy.flood (FloodGuard)
        # one worker taking every new call while the load is low (proxy/steering.py): the
        # workers' shared board, worker 0's decision, the shared sockets with their endpoints
        self.board = steering_board if worker_count > 1 else None
        self._controller = (steering.Controller(steering_thresholds)
                            if steering_thresholds is not None and worker_index == 0 else None)
        self._cpu = steering.CpuMeter()
        self._steer_at = 0.0  # next once-a-second pass
        self._seen_change = -1.0  # the board's last change this worker has acted on
        self._shared_socks: list[tuple[socket.socket, _UdpEndpoint]] = []
        self._steer_stopped = False  # draining, or another instance taking over
        # the shared-port endpoint whose datagram the core is handling now (None otherwise)
        self._arrived: _UdpEndpoint | None = None
        self._spread_keys = spread.keys_from(secret)
        self._range_base = (worker_port - worker_index) if worker_port is not None else 0
        self._relay_server: asyncio.base_events.Server | None = None
        self._outboxes: dict[int, _RelayOutbox] = {}
        # TLS: accepted connections (tls: listen entries), connections we open (TLS gateways
        # and peers), and the name a destination's certificate must carry (default: its IP)
        self.tls_server = tls_server
        self.tls_client = tls_client
        self.tls_handshake_timeout = tls_handshake_timeout
        self.tls_server_names = tls_server_names or {}

    def _relays_from(self, host: str) -> bool:
        """Whose requests go to their Call-ID's owner; anyone else's are refused where they
        land. Read from the core's settings of the moment (a reload may change them)."""
        s = self.core.settings
        return self.core.is_gateway_ip(host) or s.is_trusted(host)

    # ---- bookkeeping ---------------------------------------------------------------------------
    def count(self, name: str, n: int = 1) -> None:
        self.core.stats[name] = self.core.stats.get(name, 0) + n

    def log_limited(self, event: str, **fields: Any) -> None:
        """A warning at most once per LOG_EVERY_S per event, with how many were left out."""
        now = time.monotonic()
        last, suppressed = self._last_logged.get(event, (0.0, 0))
        if now - last < LOG_EVERY_S:
            self._last_logged[event] = (last, suppressed + 1)
            return
        self._last_logged[event] = (now, 0)
        log.warning(event, suppressed=suppressed, **fields)

    def admit(self, conn: _TcpConnection) -> bool:
        """Whether an accepted connection fits under the connection caps (and take its place)."""
        assert conn.peer is not None
        host = conn.peer[0]
        here = self.tcp_per_source.get(host, 0)
        if self.tcp_accepted >= self.tcp_max_connections:
            cap = "tcp_max_connections"
        elif here >= self.tcp_max_connections_per_source:
            cap = "tcp_max_connections_per_source"
        else:
            self.tcp_accepted += 1
            self.tcp_per_source[host] = here + 1
            conn.counted = True
            return True
        self.count("tcp_refused")
        self.log_limited("tcp_refused", source=host, cap=cap, connections=self.tcp_accepted)
        return False

    def release(self, conn: _TcpConnection) -> None:
        """An accepted connection closed: give its place back."""
        conn.counted = False
        assert conn.peer is not None
        host = conn.peer[0]
        self.tcp_accepted -= 1
        left = self.tcp_per_source.get(host, 1) - 1
        if left > 0:
            self.tcp_per_source[host] = left
        else:
            self.tcp_per_source.pop(host, None)

    async def start(self) -> None:
        if self.worker_port is not None:
            # this worker's own port first, on every listen host (the shared port, opened
            # last, tells the world the worker is ready)
            for transport, host in dict.fromkeys((t, h) for t, h, _ in self.listen
                                                 if t != "tls"):
                if transport == "udp":
                    family, udp = await self._open_udp(host, self.worker_port, own=True)
                    self.own_udp.setdefault(family, udp)
                else:
                    server = await self.loop.create_server(
                        lambda: _TcpConnection(self), host, self.worker_port,
                        reuse_address=True)
                    self.tcp_servers.append(server)
                    self._own_tcp_servers.append(server)
        for transport, host, port in self.listen:
            if transport == "udp":
                family, udp = await self._open_udp(host, port, own=False)
                self.udp.setdefault(family, udp)
            else:
                # tls: a plain TCP accept, admitted under the caps, then the handshake;
                # SO_REUSEPORT even with one worker: an instance taking over (`run
                # --takeover`) binds next to this one (`run` refuses a port held otherwise)
                tls = transport == "tls"
                server = await self.loop.create_server(
                    partial(_TcpConnection, self, tls=tls), host, port,
                    reuse_address=True, reuse_port=True)
                self.tcp_servers.append(server)
                self.shared_tcp_servers.append(server)
        if self._spread_scans:
            scan = min(self._spread_scans)
            self.kernel_spread = scan > 0
            # one source's datagrams are spread over every worker: each sees its share
            self._flood_weight = self.worker_count if self.kernel_spread else 1
            if self.board is not None and self.kernel_spread:
                self.core.handoff = self._handoff
                if self.board.mode == steering.SINGLE:  # a worker restarted: spread again
                    self.board.set_mode(steering.SPREAD, time.monotonic())
                    # its windows now, not at its first tick: the other workers' CANCELs and
                    # ACKs the kernel gives it from now on are passed to them at once
                    self._see_board(self.board)
                    log.info("udp_steering", mode="spread", reason="worker_started",
                             worker=self.worker_index)
            log.info("udp_spread", worker=self.worker_index,
                     mode="kernel_call_id" if self.kernel_spread else "relay_call_id",
                     scan_bytes=scan)
        if self.worker_count > 1:
            self._relay_server = await self.loop.create_unix_server(
                lambda: _RelayInbox(self), relay_address(self.relay_group, self.worker_index))
        self._ticker = self.loop.create_task(self._tick())

    async def _open_udp(self, host: str, port: int, *, own: bool
                        ) -> tuple[int, asyncio.DatagramTransport]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if not own:  # every worker binds it (the kernel spreads), and a takeover's too
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            where = f"udp:{host}:{port}"
            size_buffer(sock, "receive", self.udp_rcvbuf, address=where)
            size_buffer(sock, "send", self.udp_sndbuf, address=where)
            with contextlib.suppress(OSError):  # the oldest datagram's wait (_oldest_wait)
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        if not own and self.worker_count > 1:
            self._spread_scans.append(self._spread(sock))
        udp, endpoint = await self.loop.create_datagram_endpoint(
            lambda: (_OwnUdpEndpoint if own else _UdpEndpoint)(self), sock=sock)
        if not own:
            endpoint.group = len(self._shared_socks)
            self._shared_socks.append((sock, endpoint))
        self._udp_sockets.append((udp, sock))
        return family, udp

    def _spread(self, sock: socket.socket) -> int:
        """Attach the Call-ID program to the shared socket's group; the bytes it scans, or 0
        where the kernel refuses it (the workers then pass requests by Call-ID themselves)."""
        try:
            return spread.attach(sock, self.worker_count, self._spread_keys)
        except OSError as exc:
            log.warning("udp_spread_unavailable", worker=self.worker_index, error=str(exc))
            return 0

    async def bind_spare(self, port: int) -> None:
        """Also serve `port` (the spare worker-port range) like this worker's own port, without
        sending from it: Record-Routes of calls set up by the instance before (or after) this
        one name it. OSError while another instance still holds it."""
        for transport, host in dict.fromkeys((t, h) for t, h, _ in self.listen):
            if transport == "udp":
                _, udp = await self._open_udp(host, port, own=True)
                self.spare_udp.append(udp)
            else:
                server = await self.loop.create_server(
                    lambda: _TcpConnection(self), host, port, reuse_address=True)
                self.tcp_servers.append(server)

    def stop_steering(self) -> None:
        """Another instance is taking over: its workers join the shared ports' groups and
        attach their own program; this instance no longer changes it (proxy/steering.py)."""
        self._steer_stopped = True

    def release_spare(self) -> None:
        """Give the spare range back (an instance taking over will use it)."""
        for udp in self.spare_udp:
            udp.close()
        self.spare_udp.clear()
        spare = {s for s in self.tcp_servers if s not in self.shared_tcp_servers} - set(
            self._own_tcp_servers)
        for server in spare:
            server.close()
            self.tcp_servers.remove(server)

    def close_shared(self) -> None:
        """Stop listening on the shared SIP port (draining behind a load balancer, or handing
        over to another instance); the worker's own port keeps serving what is in progress.
        Responses then leave from the worker's own port."""
        for udp in self.udp.values():
            udp.close()
        self.udp = dict(self.own_udp)
        self._steer_stopped = True  # nothing more to steer (proxy/steering.py)
        for server in self.shared_tcp_servers:
            server.close()
        self.shared_tcp_servers.clear()

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        for udp in (*self.udp.values(), *self.own_udp.values(), *self.spare_udp):
            udp.close()
        if self._relay_server is not None:
            self._relay_server.close()
        for box in self._outboxes.values():
            if box.transport is not None:
                box.transport.close()
        for server in self.tcp_servers:
            server.close()
        for conn in list(self.tcp_connections.values()):
            if conn.transport is not None:
                conn.transport.close()

    # ---- input -------------------------------------------------------------------------------
    def on_datagram(self, data: bytes, source: tuple[str, int],
                    endpoint: _UdpEndpoint | None = None) -> None:
        """A datagram on the shared port (through `endpoint`)."""
        self._arrived = endpoint
        try:
            self._on_udp(data, source, shared=True)
        finally:
            self._arrived = None

    def on_own_datagram(self, data: bytes, source: tuple[str, int]) -> None:
        """A datagram on this worker's own port: a response to what it forwarded, or a request
        following its Record-Route; handled here.

        Only a response naming another worker's branch goes there: a peer that answers to the
        address its call came from rather than to the Via (SIPp does), after that call's
        in-dialog request was forwarded by another worker (one restarted, for instance).
        """
        self._on_udp(data, source, shared=False)

    def _on_udp(self, data: bytes, source: tuple[str, int], *, shared: bool) -> None:
        if len(data) > self.max_message_bytes:
            self.core.stats["oversize_dropped"] = self.core.stats.get("oversize_dropped", 0) + 1
            return
        # a keep-alive is CR/LF only; a message starts with a letter, so only a datagram
        # starting with CR or LF pays for strip's copy
        if (not data or data[0] == 13 or data[0] == 10) and not data.strip(b"\r\n"):
            return
        if self.core.flood is not None and not data.startswith(b"SIP/2.0 ") and \
                self.core.refuse_flood(source, "udp", time.monotonic(), data=data,
                                       weight=self._flood_weight):
            self.flush()  # policy.flood: counted here, before any relay to another worker
            return
        owner = self._owner(data, source, shared) if self.worker_count > 1 else None
        if owner is not None and owner != self.worker_index:
            self._relay_to(owner, data, source)
            return
        try:
            self.core.receive_datagram(data, source, "udp", time.monotonic())
        except Exception:  # a bug must cost one message, never the process
            self._internal_error(source)
        if not self._pass_sends:
            self.flush()
        elif not self._pass_flush:  # its sends go out with the rest of the pass's
            self._pass_flush = True
            self.loop.call_soon(self._flush_pass)

    def _flush_pass(self) -> None:
        """Send what the loop pass's datagrams made, once the loop has read and handled every
        one of them (uvloop reads up to 32 a socket a pass), and give the store and the policy
        the pass's lookups and checks in one batch each.

        Only while more than PASS_SENDS_MESSAGES_PER_S arrive (`_pass_sends`, set each
        tick). Below, a pass holds one datagram or a small burst, each datagram's sends leave
        as it is handled, and the first of a burst is not kept waiting for the rest (at 200
        and 1,000 CPS this measured no gain, and one callback more a datagram). Above, what a
        pass holds is what arrived while the previous one ran, and reading it all before
        sending measured 4-5 % less CPU a call and a far shorter tail at 4,000-4,500 CPS
        (scripts/bench_ab.py, three pairs; the README's performance section, 2026-12-07)."""
        try:
            self.flush()
        finally:
            self._pass_flush = False
        if self._misses:
            self._send_misses()
        if self._policy_checks:
            self._submit_policy()

    def _owner(self, data: bytes, source: tuple[str, int], shared: bool) -> int | None:
        """Which worker holds what this datagram needs; None: whoever received it."""
        if data.startswith(b"SIP/2.0 "):
            # a response goes to the worker named in its branch: the one holding its client
            # transaction (unknown or foreign branch: here, where the core drops it)
            owner = branch_worker(data)
            return owner if owner is not None and owner < self.worker_count else None
        if shared and self._relays_from(source[0]):
            # a request on the shared port from a peer that may send us requests: where the
            # kernel spreads by Call-ID (proxy/spread.py) it is already at its call's worker,
            # unless it is an in-dialog request naming another worker's port in its Route (the
            # callee's, whose Call-ID differs, or one sent before a worker restarted); else it
            # goes to its Call-ID's owner. From anyone else it is refused here, at no relay cost
            if self.kernel_spread:
                return route_worker(data, self._range_base, self.worker_count)
            return call_id_owner(data, self.worker_count, self._call_id_hasher)
        return None

    def _relay_to(self, owner: int, data: bytes, source: tuple[str, int], *,
                  send: bool = False) -> None:
        box = self._outboxes.get(owner)
        if box is None or box.closed:
            box = self._outboxes[owner] = _RelayOutbox()
            task = self.loop.create_task(self._connect_relay(owner, box))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        size = _RELAY_HEADER.size + len(data)
        if box.backlog() + size > RELAY_MAX_QUEUED_BYTES:
            # the owner is not keeping up (or not there): drop rather than grow without bound
            self.count("relay_dropped")
            self.log_limited("relay_dropped", worker=owner, backlog=box.backlog())
            return
        length = len(data) | SEND_FLAG if send else len(data)
        box.queue.append(_RELAY_HEADER.pack(length, source[1], source[0].encode("ascii")))
        box.queue.append(data)
        box.queued += size
        self.count("relayed_sends" if send else "relayed")
        if box.transport is not None and not box.scheduled:
            box.scheduled = True
            self.loop.call_soon(box.drain)

    async def _connect_relay(self, owner: int, box: _RelayOutbox) -> None:
        # the owner may still be starting (workers come up in any order) or restarting: keep
        # its messages for a few seconds rather than dropping them
        for attempt in range(50):
            try:
                await self.loop.create_unix_connection(
                    lambda: box, relay_address(self.relay_group, owner))
                break
            except OSError:
                await asyncio.sleep(min(0.01 * 2 ** attempt, 0.2))
        else:
            self.count("relay_errors")
            self.count("relay_dropped", len(box.queue) // 2)
            log.warning("relay_unreachable", worker=owner, dropped=len(box.queue) // 2)
            box.queue.clear()
            box.queued = 0
            box.closed = True
            return
        box.drain()

    def on_relayed(self, data: bytes, source: tuple[str, int]) -> None:
        """A message another worker received for this one (its Call-ID or its branch)."""
        try:
            self.core.receive_datagram(data, source, "udp", time.monotonic())
        except Exception:
            self._internal_error(source)
        self.flush()

    def _internal_error(self, source: tuple[str, int]) -> None:
        self.count("internal_errors")
        log.exception("internal_error", source=f"{source[0]}:{source[1]}")

    def _bug(self, where: str) -> None:
        """A bug outside one message's handling (a batch, a callback): counted and logged as
        the shell's other internal errors."""
        self.count("internal_errors")
        log.exception("internal_error", where=where)

    def on_stream_data(self, conn: _TcpConnection, data: bytes) -> None:
        """Messages over TCP are handled here, where their connection lives; only a response
        whose branch names another worker goes there (its client transaction is there)."""
        assert conn.peer is not None
        now = time.monotonic()
        relay = self.worker_count > 1
        for item in conn.framer.feed(data):
            try:
                if isinstance(item, Exception):
                    self.core.reject_malformed(item, conn.peer, conn.kind)  # type: ignore[arg-type]
                    continue
                if item.is_request and self.core.flood is not None and \
                        self.core.refuse_flood(conn.peer, conn.kind, now, msg=item):
                    continue
                raw = item.serialize()
                if relay and not item.is_request:
                    owner = branch_worker(raw)
                    if owner is not None and owner != self.worker_index \
                            and owner < self.worker_count:
                        self._relay_to(owner, raw, conn.peer)
                        continue
                self.core.receive_message(item, raw, conn.peer, conn.kind, now)
            except Exception:  # a bug must cost one message, never the process
                self._internal_error(conn.peer)
        self.flush()
        if conn.framer.broken and conn.transport is not None:
            conn.transport.close()  # the stream cannot be resynchronised

    # ---- output and lookups -----------------------------------------------------------------
    def flush(self) -> None:
        core = self.core
        while core.outbox or core.lookups or core.policy_checks:
            if core.outbox:
                out, core.outbox = core.outbox, []
                for item in out:
                    try:
                        self._send(item)
                    except (OSError, ValueError, RuntimeError) as exc:
                        # one bad destination must not cost the rest of the batch
                        core.stats["send_errors"] = core.stats.get("send_errors", 0) + 1
                        log.warning("send_failed", dest=f"{item.dest[0]}:{item.dest[1]}",
                                    transport=item.transport, error=str(exc))
            if core.lookups:
                lookups, core.lookups = core.lookups, []
                wall = time.time()
                misses: list[tuple[Relay, str, str]] = []
                for relay, x, caller in lookups:
                    answer = self.store.resolve_cached(x, caller, wall)
                    if answer is not None:
                        core.complete_lookup(relay, answer, time.monotonic())
                    else:
                        misses.append((relay, x, caller))
                if misses and self._lookup_batch is not None:
                    if not self._misses and not self._pass_flush:  # else: _flush_pass sends
                        self.loop.call_soon(self._send_misses)
                    self._misses += misses
                    self._batched_lookups += len(misses)  # waiting: counted as out
                else:
                    self._lookup_tasks(misses)
            if core.policy_checks:  # the anti-fraud policy step (proxy/policy/runner.py)
                # the pass's calls in one submit, so one write to the policy's Redis
                if not self._policy_checks and not self._pass_flush:
                    self.loop.call_soon(self._submit_policy)
                self._policy_checks += core.policy_checks
                core.policy_checks = []
        if core.to_seal:
            core.after_send()

    def _submit_policy(self) -> None:
        """The loop pass's calls to the policy step at once (see _send_misses)."""
        checks, self._policy_checks = self._policy_checks, []
        if not checks:
            return
        self.count("policy_batches")
        try:
            self.policy.submit(checks)
        except Exception:  # these calls end at their policy deadline, the rest go on
            self._bug("policy batch")
        self.flush()

    def _send_misses(self) -> None:
        """The loop pass's cache misses to the store in one batch (uvloop reads up to 32
        datagrams a socket a pass; this runs after all of them: from _flush_pass, or for
        misses made elsewhere, a TCP message's say, as a callback of its own). One at a time,
        a lookup costs ~90 µs of this process's CPU, in a batch of 32 ~14 µs
        (scripts/bench_store.py): under load, passes carry more datagrams."""
        misses, self._misses = self._misses, []
        self._batched_lookups -= len(misses)
        if not misses:
            return
        self.count("lookup_batches")
        self.count("lookups_batched", len(misses))
        try:
            answered, left = self._lookup_batch(misses, self._looked_up)
        except Exception:  # these calls end at their lookup deadline, the rest go on
            self._bug("lookup batch")
            return
        core = self.core
        self._batched_lookups += len(misses) - len(answered) - len(left)
        now = time.monotonic()
        for relay, answer in answered:
            if answer is None:
                core.fail_lookup(relay, now)
            else:
                core.complete_lookup(relay, answer, now)
        self._lookup_tasks(left)
        self.flush()

    def _lookup_tasks(self, misses: list[tuple[Relay, str, str]]) -> None:
        """Lookups the batch path cannot take: a task each, through the store's resolve()."""
        for relay, x, caller in misses:
            task = self.loop.create_task(self._lookup(relay, x, caller))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _looked_up(self, results: list[tuple[Relay, Resolution | None]]) -> None:
        """Answers to batched lookups (from the store's connection reader or time-out)."""
        self._batched_lookups -= len(results)
        core = self.core
        now = time.monotonic()
        for relay, answer in results:
            try:
                if answer is None:
                    core.fail_lookup(relay, now)
                else:
                    core.complete_lookup(relay, answer, now)
            except Exception:  # one call's bug must not cost the batch's other calls
                self._bug("lookup answer")
        self.flush()

    async def _lookup(self, relay: Relay, x: str, caller: str) -> None:
        try:
            answer = await self.store.resolve(x, caller)
        except StoreUnavailable:
            self.core.fail_lookup(relay, time.monotonic())
        else:
            self.core.complete_lookup(relay, answer, time.monotonic())
        self.flush()

    def _send(self, item: Outgoing) -> None:
        if item.transport != "udp":
            self._send_stream(item)
            return
        family = socket.AF_INET6 if ":" in item.dest[0] else socket.AF_INET
        data = item.data
        # a request leaves from this worker's own port (our Via has rport: an answer to the
        # source port must reach this worker); a response from the shared port, where the
        # peer sent its request
        udp = None if data.startswith(b"SIP/2.0 ") else self.own_udp.get(family)
        if udp is None:
            udp = self.udp.get(family) or next(iter(self.udp.values()), None)
            if udp is None:
                return
        udp.sendto(data, item.dest)

    def _send_stream(self, item: Outgoing) -> None:
        """TCP/TLS: down the connection the peer opened (a flow; a response's own connection)
        while it lasts, else on our one connection to the destination, held by the worker
        connections.destination_owner names (opened when there is none)."""
        kind = item.transport
        flow = item.flow
        if flow is not None:
            worker = flow.worker
            if worker is not None and worker != self.worker_index and worker < self.worker_count:
                self._relay_send(worker, item)  # the worker holding the peer's connection
                return
            conn = self.tcp_connections.get((flow.host, flow.port))
            if conn is not None and conn.usable(kind):
                conn.send(item.data)
                return
            item = Outgoing(item.data, item.dest, item.transport)  # gone: a connection to dest
        elif item.data.startswith(b"SIP/2.0 "):
            conn = self.tcp_connections.get(item.dest)  # the request's own connection
            if conn is not None and conn.usable(kind):
                conn.send(item.data)
                return
            # RFC 3261 §18.2.2: it closed; a new connection to the Via's sent-by port
            fallback = response_fallback(item.data, item.dest[0])
            if fallback is None:
                self.count("responses_unsendable")
                return
            self.count("responses_to_sent_by")
            item = Outgoing(item.data, fallback, item.transport, item.flow)
        dest = item.dest
        if self.worker_count > 1:
            owner = destination_owner(dest, kind, self.worker_count, self._call_id_hasher)
            if owner != self.worker_index:
                self._relay_send(owner, item)
                return
        conn = self.tcp_connections.get(dest)
        if conn is not None and not conn.usable(kind):
            if conn.kind != kind:  # a connection of the other kind holds that address
                self.count("stream_kind_mismatch")
                return
            conn = None  # closing: a new one
        if conn is None:
            conn = _TcpConnection(self, dest, tls=kind == "tls",
                                  server_hostname=self.tls_server_names.get(dest, dest[0]))
            self.tcp_connections[dest] = conn
            task = self.loop.create_task(self._connect(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        conn.send(item.data)

    def _relay_send(self, worker: int, item: Outgoing) -> None:
        self._relay_to(worker, encode_send(item), item.dest, send=True)

    def on_relayed_send(self, payload: bytes, dest: tuple[str, int]) -> None:
        """Another worker's message for a connection this worker holds (or should open)."""
        item = decode_send(payload, dest)
        if item is None:
            self.count("relay_errors")
            return
        try:
            self._send_stream(item)
        except (OSError, ValueError, RuntimeError) as exc:
            self.count("send_errors")
            log.warning("send_failed", dest=f"{dest[0]}:{dest[1]}", transport=item.transport,
                        error=str(exc))

    async def _connect(self, conn: _TcpConnection) -> None:
        assert conn.peer is not None
        try:
            await self.loop.create_connection(lambda: conn, conn.peer[0], conn.peer[1])
        except OSError as exc:
            log.warning("tcp_connect_failed", peer=f"{conn.peer[0]}:{conn.peer[1]}",
                        error=str(exc))
            if self.tcp_connections.get(conn.peer) is conn:
                del self.tcp_connections[conn.peer]

    def overload_gauges(self) -> dict[str, int]:
        """Overload state and thresholds for the metrics."""
        o = self.overload
        return {"loop_lag_ms": round(self.loop_lag * 1000),
                "pending_lookups": len(self._tasks) + self._batched_lookups,
                "udp_receive_queue_bytes": self.receive_queue_bytes,
                "udp_receive_wait_ms": round(self.receive_wait * 1000),
                "overloaded": int(self.core.overloaded),
                # one worker takes every new call (transport.low_load): 1 on every worker
                "udp_single_worker": int(self.board is not None and self.core.handoff is not None
                                         and self.board.mode == steering.SINGLE),
                "overload_max_loop_lag_ms": o.max_loop_lag_ms if o is not None else 0,
                "overload_max_pending_lookups": o.max_pending_lookups if o is not None else 0,
                "overload_max_receive_wait_ms": (o.max_receive_wait_ms if o is not None
                                                 else 0),
                "overload_max_receive_queue_kb": (o.max_receive_queue_kb if o is not None
                                                  else 0)}

    def _read_receive_queues(self) -> tuple[int, int, float]:
        """(bytes waiting in the fullest UDP receive queue, datagrams the kernel dropped for
        a full queue since the last call, how long the oldest datagram waiting in any of
        them has waited in seconds); closed sockets are forgotten."""
        queued = drops = 0
        wait = 0.0
        alive = []
        for udp, sock in self._udp_sockets:
            # a closed transport is forgotten before its descriptor can be reused by another
            # socket (whose queue would then be read as this one's)
            if udp.is_closing():
                continue
            try:
                info = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, SK_MEMINFO_BYTES)
            except OSError:
                continue
            alive.append((udp, sock))
            rmem_alloc, dropped = _MEMINFO.unpack_from(info)[0::8]
            queued = max(queued, rmem_alloc)
            drops += dropped
            if rmem_alloc:  # a system call only where something waits
                wait = max(wait, _oldest_wait(sock))
        if len(alive) != len(self._udp_sockets):
            self._udp_sockets = alive
        new_drops = max(0, drops - self._receive_drops)
        self._receive_drops = drops
        return queued, new_drops, wait

    def _check_overload(self, lag: float, now: float) -> None:
        """Shed new calls above a threshold (the loop's lag, lookups waiting for the store,
        how long the oldest datagram has waited in the kernel, how much waits there, or any
        the kernel dropped); take them again once each is below half of its threshold
        (hysteresis: no flapping at the edge). Measured: a longer hold after the last sign of
        overload only sheds calls the worker could take (a burst at 2,000 CPS: 0.2 s of hold
        connected 329 calls of 6,000, none 1,431).

        The wait is what a caller feels (T1, 500 ms, is when its INVITE is sent again): a
        burst the worker reads in time never reaches it. The queue's size counts only once it
        has stood above its limit for QUEUE_STANDING_S, for the same reason (near capacity,
        bursts of 50-70 ms over 2 MiB shed hundreds of calls a worker then served with a p99
        under 100 ms); a queue that keeps growing, or any drop, is overload."""
        o = self.overload
        self.loop_lag = lag
        if self._udp_sockets:
            queued, drops, wait = self._read_receive_queues()
        else:
            queued, drops, wait = 0, 0, 0.0
        self.receive_queue_bytes = queued
        self.receive_wait = wait
        if drops:
            self.count("udp_receive_drops", drops)
        if o is None:
            return
        limit = o.max_loop_lag_ms / 1000
        wait_limit = o.max_receive_wait_ms / 1000
        queue_limit = o.max_receive_queue_kb * 1024
        if queued <= queue_limit:
            self._queue_over_since = None
        elif self._queue_over_since is None:
            self._queue_over_since = now
        standing = (self._queue_over_since is not None
                    and now - self._queue_over_since >= QUEUE_STANDING_S)
        pending = len(self._tasks) + self._batched_lookups
        core = self.core
        if not core.overloaded:
            if (lag > limit or wait > wait_limit or pending > o.max_pending_lookups
                    or standing or drops):
                core.overloaded = True
                self.count("overload_entered")
                log.warning("overloaded", loop_lag_ms=round(lag * 1000),
                            receive_wait_ms=round(wait * 1000), pending_lookups=pending,
                            receive_queue_kb=queued // 1024, receive_drops=drops)
        elif (lag < limit / 2 and wait < wait_limit / 2
              and pending <= o.max_pending_lookups // 2
              and queued < queue_limit // 2 and not drops):
            core.overloaded = False
            log.info("overload_cleared", loop_lag_ms=round(lag * 1000),
                     receive_wait_ms=round(wait * 1000), pending_lookups=pending,
                     receive_queue_kb=queued // 1024)

    async def _tick(self) -> None:
        sweep_at = time.monotonic() + 5.0
        period = TICK_S
        expected = time.monotonic() + period
        seen = -1
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            self._check_overload(max(0.0, now - expected), now)
            if self.board is not None and self.core.handoff is not None:
                self._steer(now)
            core = self.core
            deadline = core.next_deadline()
            if deadline is not None and deadline <= now:
                try:
                    core.handle_timers(now)
                except Exception:
                    self._internal_error(("timer", 0))
                self.flush()
                deadline = core.next_deadline()
            if now >= sweep_at:
                sweep_at = now + 5.0
                self._close_idle()
            logs.flush()  # what a slow log reader left waiting
            if self.young_collector is not None:
                self.young_collector(now)
            self._pass_sends = core.received - seen > PASS_SENDS_MESSAGES_PER_S * period
            period = self._tick_period(now, deadline, seen, period)
            seen = core.received
            expected = now + period

    def _tick_period(self, now: float, deadline: float | None, seen: int,
                     last: float) -> float:
        """TICK_S, or IDLE_TICK_S while few messages arrive (fewer than
        LOW_RATE_MESSAGES_PER_S over the last period, `last`: the count was `seen` at its
        start), nothing waits for the store, no call is shed and no timer is due sooner. A
        message that arrives meanwhile is handled at once; the timers it arms are T1 (500 ms)
        or more away, and the next tick is at most IDLE_TICK_S later."""
        core = self.core
        if core.overloaded or self._tasks or self._batched_lookups or \
                core.received - seen > LOW_RATE_MESSAGES_PER_S * last:
            return TICK_S
        if deadline is None or deadline - now >= IDLE_TICK_S:
            return IDLE_TICK_S
        return max(TICK_S, deadline - now)

    # ---- one worker while the load is low (proxy/steering.py) ---------------------------------
    def _steer(self, now: float) -> None:
        """Every tick: act on a change of mode. Once a second: this worker's CPU on the board,
        which socket of each group is its own, and (worker 0) the decision."""
        board = self.board
        assert board is not None
        changed = self._see_board(board)
        if self._controller is not None and board.mode == steering.SINGLE and (
                self.receive_wait > steering.LEAVE_WAIT_S or self.core.overloaded) \
                and not self._steer_stopped:
            self._controller.loaded()
            self._switch(steering.SPREAD, now, board.cpus(),
                         "shedding" if self.core.overloaded else "receive_wait")
            return
        if now < self._steer_at:
            return
        self._steer_at = now + 1.0
        board.set_cpu(self.worker_index, self._cpu.read(now))
        mode = board.mode
        if mode == steering.SPREAD and board.ready and now - changed >= steering.LEARN_AFTER_S:
            for _, endpoint in self._shared_socks:
                sample, endpoint.sample = endpoint.sample, None
                if sample is None:
                    continue
                index = spread.expected_socket(sample, self.worker_count, self._spread_keys,
                                               self._spread_scans[endpoint.group])
                if index is not None:
                    board.set_owner(endpoint.group, index, self.worker_index)
        if self._controller is None or self._steer_stopped:
            return
        known = all(board.index_of(g, self.worker_index) is not None
                    for g in range(len(self._shared_socks)))
        cpus = board.cpus()
        target = self._controller.decide(mode, cpus, now, shedding=self.core.overloaded,
                                         indexes_known=known)
        if target is not None:
            self._switch(target, now, cpus, "load")

    def _see_board(self, board: steering.Board) -> float:
        """Act on the board's last change of mode if this worker has not yet: the hand-off
        windows after it, and policy.flood's weight. Returns when the change was made."""
        changed = board.changed_at
        if changed != self._seen_change:
            self._seen_change = changed
            self.core.handoff_until, self.core.handoff_invite_until = steering.handoff_windows(
                changed, board.mode, self.core.settings.timer_c)
            # policy.flood: in SINGLE one worker sees a source's every request
            self._flood_weight = 1 if board.mode == steering.SINGLE else self.worker_count
        return changed

    def _switch(self, target: int, now: float, cpus: list[float], reason: str) -> None:
        """Worker 0: the board first; the kernel's program SWITCH_DELAY_S later, by when every
        worker (reading the board each tick) knows."""
        assert self.board is not None
        self.board.set_mode(target, now)
        log.info("udp_steering", mode="single" if target == steering.SINGLE else "spread",
                 reason=reason, cpu_percent=[round(c, 1) for c in cpus],
                 receive_wait_ms=round(self.receive_wait * 1000), shedding=self.core.overloaded)
        self.loop.call_later(steering.SWITCH_DELAY_S, self._apply_mode, target)

    def _apply_mode(self, target: int) -> None:
        board = self.board
        if board is None or board.mode != target or self._steer_stopped:
            return  # changed again meanwhile (a worker restarted), or draining
        try:
            for sock, endpoint in self._shared_socks:
                if target == steering.SINGLE:
                    index = board.index_of(endpoint.group, self.worker_index)
                    if index is None:
                        raise OSError("this worker's socket in the group is not known")
                    spread.attach_single(sock, index)
                else:
                    spread.attach(sock, self.worker_count, self._spread_keys)
        except OSError as exc:
            log.warning("udp_steering_failed", error=str(exc))
            if target == steering.SINGLE:
                board.set_mode(steering.SPREAD, time.monotonic())
                for sock, _ in self._shared_socks:
                    with contextlib.suppress(OSError):
                        spread.attach(sock, self.worker_count, self._spread_keys)

    def _handoff(self, msg: Any, source: tuple[str, int]) -> bool:
        """The core's hook: pass a request with no transaction here, from the shared port, to
        the worker the other mode would have given it, if that is another (see the core's
        `handoff`). The Call-ID program's choice is computed (proxy/spread.py); SINGLE's is
        worker 0. Only a peer's requests are passed, as everywhere (`_owner`)."""
        endpoint = self._arrived
        board = self.board
        if endpoint is None or board is None or endpoint.sample is None \
                or not self._relays_from(source[0]):
            return False
        data = endpoint.sample
        if board.mode == steering.SINGLE:
            index = spread.expected_socket(data, self.worker_count, self._spread_keys,
                                           self._spread_scans[endpoint.group])
            other = None if index is None else board.owner(endpoint.group, index)
            if other is None and self.worker_count == 2:  # the one other worker
                other = 1 - self.worker_index
        else:
            other = steering.CONTROLLER
        if other is None or other == self.worker_index:
            return False
        self._relay_to(other, data, source)
        return True

    def _close_idle(self) -> None:
        limit = time.monotonic() - self.tcp_idle_timeout
        for conn in list(self.tcp_connections.values()):
            transport = conn.transport
            if conn.last_active < limit and transport is not None:
                if transport.get_write_buffer_size():
                    transport.abort()  # a peer that stopped reading: close() would wait forever
                else:
                    transport.close()
