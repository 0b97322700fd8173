"""Raw SIP over TCP and TLS for integration tests: a peer that listens (a gateway, or a caller
that can be reached back) and/or connects (a caller), with every byte written by the test.

Each connection has a reader thread that cuts messages out of the stream (the proxy's own
StreamFramer) and queues them with the connection they came on, so a test waits for "the next
INVITE" whichever connection it arrives on, and answers on that connection — or on another one,
or after closing it, which is the point of some tests.
"""

from __future__ import annotations

import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.sip.message import SipMessage, StreamFramer


@dataclass
class StreamReceived:
    msg: SipMessage
    raw: bytes
    conn: StreamConn

    def __str__(self) -> str:
        return self.msg.start_line.decode("latin-1")


class StreamConn:
    """One connection (accepted or opened), driven by a thread of its own.

    That one thread does all the reading and writing: an SSL socket must not be read and
    written from two threads at once (OpenSSL's SSL object is not thread-safe), so `send`
    hands the bytes to it and waits until they are written."""

    def __init__(self, peer: StreamPeer, sock: socket.socket, accepted: bool) -> None:
        self.peer = peer
        self.sock = sock
        self.accepted = accepted
        self.local = sock.getsockname()[:2]
        self.remote = sock.getpeername()[:2]
        self.closed = threading.Event()
        self._outbox: queue.Queue[tuple[bytes, threading.Event]] = queue.Queue()
        self._stop = threading.Event()
        sock.setblocking(False)
        peer.conns.append(self)  # before anything it reads can be seen
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        framer = StreamFramer()
        sock = self.sock
        try:
            while not self._stop.is_set():
                pending = isinstance(sock, ssl.SSLSocket) and sock.pending()
                if not pending:
                    ready, _, _ = select.select([sock], [], [], 0.01)
                else:
                    ready = [sock]
                if ready:
                    try:
                        data = sock.recv(65536)
                    except (ssl.SSLWantReadError, BlockingIOError):
                        data = None
                    if data == b"":
                        break
                    if data:
                        for item in framer.feed(data):
                            if isinstance(item, Exception):
                                self.peer.errors.append(item)
                                continue
                            self.peer.inbox.put(StreamReceived(item, item.serialize(), self))
                while not self._outbox.empty():
                    out, done = self._outbox.get_nowait()
                    self._write(out)
                    done.set()
        except (OSError, ValueError):
            pass
        finally:
            self.closed.set()
            while not self._outbox.empty():
                self._outbox.get_nowait()[1].set()
            try:
                sock.close()
            except OSError:
                pass

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                select.select([], [self.sock], [], 0.05)
                continue
            view = view[sent:]

    def send(self, data: bytes) -> None:
        if self.closed.is_set():
            raise OSError("connection closed")
        done = threading.Event()
        self._outbox.put((data, done))
        if not done.wait(5):
            raise TimeoutError("could not send")

    def close(self) -> None:
        self._stop.set()
        self.closed.wait(2)


class StreamPeer:
    """A SIP peer over TCP or TLS on `host`: optionally listening on `port` (0: any)."""

    def __init__(self, transport: str = "tcp", *, host: str = "127.0.0.1", listen: bool = True,
                 port: int = 0, server_ctx: ssl.SSLContext | None = None,
                 client_ctx: ssl.SSLContext | None = None, name: str = "") -> None:
        self.transport = transport
        self.host = host
        self.server_ctx = server_ctx
        self.client_ctx = client_ctx
        self.name = name
        self.inbox: queue.Queue[StreamReceived] = queue.Queue()
        self.pending: list[StreamReceived] = []
        self.log: list[StreamReceived] = []
        self.conns: list[StreamConn] = []
        self.errors: list[Exception] = []
        self.handshake_failures: list[Exception] = []
        self.listener: socket.socket | None = None
        self.port = port
        if listen:
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind((host, port))
            self.listener.listen(64)
            self.port = self.listener.getsockname()[1]
            threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self.listener is not None
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            if self.transport == "tls":
                assert self.server_ctx is not None
                try:
                    sock.settimeout(5)
                    sock = self.server_ctx.wrap_socket(sock, server_side=True)
                    sock.settimeout(None)
                except (OSError, ssl.SSLError) as exc:
                    self.handshake_failures.append(exc)
                    sock.close()
                    continue
            StreamConn(self, sock, accepted=True)

    def connect(self, dest: tuple[str, int], *, server_hostname: str = "127.0.0.1",
                source_port: int = 0) -> StreamConn:
        """Open a connection to `dest` (TLS: verified with client_ctx)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((self.host, source_port))
        sock.settimeout(5)
        sock.connect(dest)
        if self.transport == "tls":
            assert self.client_ctx is not None
            sock = self.client_ctx.wrap_socket(sock, server_hostname=server_hostname)
        sock.settimeout(None)
        return StreamConn(self, sock, accepted=False)

    def wait(self, pred: Callable[[SipMessage], bool], timeout: float = 5.0
             ) -> StreamReceived | None:
        """The first new message matching `pred` (others stay pending), None after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            for i, got in enumerate(self.pending):
                if pred(got.msg):
                    del self.pending[i]
                    return got
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                got = self.inbox.get(timeout=left)
            except queue.Empty:
                return None
            self.log.append(got)
            self.pending.append(got)

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
        for conn in list(self.conns):
            conn.close()
