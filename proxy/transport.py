"""The asyncio shell: UDP and TCP endpoints, the timer tick and the binding-lookup step.

Everything protocol-shaped happens in `ProxyCore`; this module moves bytes, reads the clock and
awaits the store. The per-datagram path is synchronous: parse, decide, send, with the binding
answered from memory; only a cache miss on the Redis store creates a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import time
import zlib
from typing import Any

import structlog

from proxy.bindings.model import StoreUnavailable
from proxy.core import Outgoing, ProxyCore, Relay
from proxy.sip.message import StreamFramer

log = structlog.get_logger("sip700.transport")

TICK_S = 0.01
# The core's clock is time.monotonic(): the loop's own clock is cached per iteration at
# millisecond resolution, too coarse for the latencies the call log reports.
# Call-ID row at the start of a line, long or compact form, any case (RFC 3261 §7.3.3)
_CALL_ID = re.compile(rb"\n(?:call-id|i)[ \t]*:[ \t]*([^\r\n]+)", re.IGNORECASE)
_RELAY_HEADER = struct.Struct("!IH46s")  # length, source port, source host (NUL-padded)


def call_id_owner(data: bytes, workers: int) -> int:
    """Which worker owns the transaction state of this message: a hash of its Call-ID.

    Every message of a call (requests, retransmissions, CANCEL, responses) carries the same
    Call-ID, so it meets its transactions whichever worker the kernel handed it to.
    """
    m = _CALL_ID.search(data)
    if m is None:
        return 0
    return zlib.crc32(m.group(1).strip()) % workers


def relay_address(group: str, index: int) -> str:
    """Unix socket path of one worker's relay inbox (`group` is the supervisor's private dir)."""
    return f"{group}/worker{index}.sock"


class _UdpEndpoint(asyncio.DatagramProtocol):
    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.server.on_datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: the transaction layer times out on its own
        self.server.core.stats["udp_errors"] = self.server.core.stats.get("udp_errors", 0) + 1


class _TcpConnection(asyncio.Protocol):
    def __init__(self, server: ProxyServer, peer: tuple[str, int] | None = None) -> None:
        self.server = server
        self.framer = StreamFramer(server.max_message_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer = peer
        self.last_active = time.monotonic()
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.peer is None:
            addr = transport.get_extra_info("peername")
            self.peer = (addr[0], addr[1])
        self.server.tcp_connections[self.peer] = self
        for data in self.pending:
            self.transport.write(data)  # type: ignore[union-attr]
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        assert self.peer is not None
        self.server.on_stream_data(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.server.tcp_connections.get(self.peer) is self:
            del self.server.tcp_connections[self.peer]

    def send(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        if self.transport is None:
            self.pending.append(data)
        else:
            self.transport.write(data)


class _RelayInbox(asyncio.Protocol):
    """Messages other workers pass to this one (a unix stream, length-prefixed)."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        size = _RELAY_HEADER.size
        while len(buf) >= size:
            length, port, host = _RELAY_HEADER.unpack_from(buf)
            if len(buf) < size + length:
                break
            payload = bytes(buf[size: size + length])
            del buf[: size + length]
            self.server.on_relayed(payload, (host.rstrip(b"\0").decode("ascii"), port))


class _RelayOutbox(asyncio.Protocol):
    """The connection to another worker's inbox.

    Messages queue while it connects and are written in one batch per event-loop pass: under
    load one write carries many messages (a syscall each would cost more than the relay).
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.queue: list[bytes] = []
        self.scheduled = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.closed = True

    def drain(self) -> None:
        self.scheduled = False
        if self.transport is not None and self.queue:
            self.transport.write(b"".join(self.queue))
            self.queue.clear()


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
        max_message_bytes: int = 65535,
        worker_index: int = 0,
        worker_count: int = 1,
        relay_group: str = "",
    ) -> None:
        self.core = core
        self.store = store
        self.listen = listen
        self.udp_rcvbuf = udp_rcvbuf
        self.udp_sndbuf = udp_sndbuf
        self.tcp_idle_timeout = tcp_idle_timeout
        self.max_message_bytes = max_message_bytes
        self.udp: dict[int, asyncio.DatagramTransport] = {}  # by address family
        self.tcp_servers: list[asyncio.base_events.Server] = []
        self.tcp_connections: dict[tuple[str, int], _TcpConnection] = {}
        self.loop = asyncio.get_running_loop()
        self._ticker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.worker_index = worker_index
        self.worker_count = worker_count
        self.relay_group = relay_group
        self._relay_server: asyncio.base_events.Server | None = None
        self._outboxes: dict[int, _RelayOutbox] = {}

    async def start(self) -> None:
        for transport, host, port in self.listen:
            if transport == "udp":
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_DGRAM)
                if self.worker_count > 1:  # every worker binds the port; the kernel spreads
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.udp_rcvbuf)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.udp_sndbuf)
                sock.bind((host, port))
                udp, _ = await self.loop.create_datagram_endpoint(
                    lambda: _UdpEndpoint(self), sock=sock)
                self.udp.setdefault(family, udp)
            else:
                server = await self.loop.create_server(
                    lambda: _TcpConnection(self), host, port, reuse_address=True,
                    reuse_port=self.worker_count > 1)
                self.tcp_servers.append(server)
        if self.worker_count > 1:
            self._relay_server = await self.loop.create_unix_server(
                lambda: _RelayInbox(self), relay_address(self.relay_group, self.worker_index))
        self._ticker = self.loop.create_task(self._tick())

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        for udp in self.udp.values():
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
    def on_datagram(self, data: bytes, source: tuple[str, int]) -> None:
        if len(data) > self.max_message_bytes:
            self.core.stats["oversize_dropped"] = self.core.stats.get("oversize_dropped", 0) + 1
            return
        if not data.strip(b"\r\n"):
            return  # keep-alive
        if self.worker_count > 1:
            owner = call_id_owner(data, self.worker_count)
            if owner != self.worker_index:
                self._relay_to(owner, data, source)
                return
        try:
            self.core.receive_datagram(data, source, "udp", time.monotonic())
        except Exception:  # a bug must cost one message, never the process
            self._internal_error(source)
        self.flush()

    def _relay_to(self, owner: int, data: bytes, source: tuple[str, int]) -> None:
        box = self._outboxes.get(owner)
        if box is None or box.closed:
            box = self._outboxes[owner] = _RelayOutbox()
            task = self.loop.create_task(self._connect_relay(owner, box))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        box.queue.append(_RELAY_HEADER.pack(len(data), source[1], source[0].encode("ascii")))
        box.queue.append(data)
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
            self.core.stats["relay_errors"] = self.core.stats.get("relay_errors", 0) + 1
            log.warning("relay_unreachable", worker=owner, dropped=len(box.queue) // 2)
            box.queue.clear()
            box.closed = True
            return
        box.drain()

    def on_relayed(self, data: bytes, source: tuple[str, int]) -> None:
        """A datagram another worker received for a Call-ID this worker owns."""
        try:
            self.core.receive_datagram(data, source, "udp", time.monotonic())
        except Exception:
            self._internal_error(source)
        self.flush()

    def _internal_error(self, source: tuple[str, int]) -> None:
        self.core.stats["internal_errors"] = self.core.stats.get("internal_errors", 0) + 1
        log.exception("internal_error", source=f"{source[0]}:{source[1]}")

    def on_stream_data(self, conn: _TcpConnection, data: bytes) -> None:
        assert conn.peer is not None
        now = time.monotonic()
        for item in conn.framer.feed(data):
            try:
                if isinstance(item, Exception):
                    self.core.reject_malformed(item, conn.peer, "tcp")  # type: ignore[arg-type]
                else:
                    self.core.receive_message(item, item.serialize(), conn.peer, "tcp", now)
            except Exception:  # a bug must cost one message, never the process
                self._internal_error(conn.peer)
        self.flush()
        if conn.framer.broken and conn.transport is not None:
            conn.transport.close()  # the stream cannot be resynchronised

    # ---- output and lookups -----------------------------------------------------------------
    def flush(self) -> None:
        core = self.core
        while core.outbox or core.lookups:
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
                for relay, x, caller in lookups:
                    answer = self.store.resolve_cached(x, caller, wall)
                    if answer is not None:
                        core.complete_lookup(relay, answer, time.monotonic())
                    else:
                        task = self.loop.create_task(self._lookup(relay, x, caller))
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)

    async def _lookup(self, relay: Relay, x: str, caller: str) -> None:
        try:
            answer = await self.store.resolve(x, caller)
        except StoreUnavailable:
            self.core.fail_lookup(relay, time.monotonic())
        else:
            self.core.complete_lookup(relay, answer, time.monotonic())
        self.flush()

    def _send(self, item: Outgoing) -> None:
        if item.transport == "tcp":
            conn = self.tcp_connections.get(item.dest)
            if conn is None:
                conn = _TcpConnection(self, item.dest)
                self.tcp_connections[item.dest] = conn
                task = self.loop.create_task(self._connect(conn))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            conn.send(item.data)
            return
        family = socket.AF_INET6 if ":" in item.dest[0] else socket.AF_INET
        udp = self.udp.get(family) or next(iter(self.udp.values()), None)
        if udp is None:
            return
        udp.sendto(item.data, item.dest)

    async def _connect(self, conn: _TcpConnection) -> None:
        assert conn.peer is not None
        try:
            await self.loop.create_connection(lambda: conn, conn.peer[0], conn.peer[1])
        except OSError as exc:
            log.warning("tcp_connect_failed", peer=f"{conn.peer[0]}:{conn.peer[1]}",
                        error=str(exc))
            if self.tcp_connections.get(conn.peer) is conn:
                del self.tcp_connections[conn.peer]

    async def _tick(self) -> None:
        sweep_at = time.monotonic() + 5.0
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            deadline = self.core.next_deadline()
            if deadline is not None and deadline <= now:
                try:
                    self.core.handle_timers(now)
                except Exception:
                    self._internal_error(("timer", 0))
                self.flush()
            if now >= sweep_at:
                sweep_at = now + 5.0
                self._close_idle()

    def _close_idle(self) -> None:
        limit = time.monotonic() - self.tcp_idle_timeout
        for conn in list(self.tcp_connections.values()):
            if conn.last_active < limit and conn.transport is not None:
                conn.transport.close()
