"""Log lines to a file descriptor without ever blocking the event loop.

Its own module so that the compiled build (proxy/compiled.py) takes it: every call's log line
goes through `write_line`, and as plain Python its checks cost an interpreted frame a call.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import stat
import threading
from typing import Final

MAX_PENDING_BYTES: Final = 1 << 20  # log output held while stdout cannot take it


class NonBlockingLineWriter:
    """Writes whole lines to a file descriptor without ever blocking.

    A line the descriptor takes in part has its rest kept and written first, before any other
    line: no record is ever cut by another. Pipes and terminals are reopened through
    /proc/self/fd with O_NONBLOCK (a flag of their own, so stderr and the processes sharing
    the descriptor keep blocking I/O); sockets are written with MSG_DONTWAIT; regular files are
    written as they are (they never block for long).
    """

    def __init__(self, fd: int, max_pending: int = MAX_PENDING_BYTES) -> None:
        self.max_pending = max_pending
        self.pending = bytearray()
        self.dropped = 0
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the flush waits on
        self._loop_thread = 0  # the thread running it
        self._fd = fd
        self._sock: socket.socket | None = None
        self._write = self._plain_write
        self._atomic = False  # a pipe: write whole lines of at most PIPE_BUF bytes
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            return
        self._atomic = stat.S_ISFIFO(mode)
        if stat.S_ISSOCK(mode):
            self._sock = socket.socket(fileno=os.dup(fd))
            self._write = self._socket_write
        elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
            try:
                self._fd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # no /proc: make the descriptor itself non-blocking
                os.set_blocking(fd, False)

    def _plain_write(self, data: bytes | bytearray) -> int:
        return os.write(self._fd, data)

    def _socket_write(self, data: bytes | bytearray) -> int:
        assert self._sock is not None
        return self._sock.send(data, socket.MSG_DONTWAIT)

    def write_line(self, line: str) -> None:
        """Write one record (a line without its newline), or drop it whole."""
        data = (line + "\n").encode("utf-8", "replace")
        known = self._loop
        if known is not None and self._loop_thread == threading.get_ident() and known.is_running():
            loop: asyncio.AbstractEventLoop | None = known  # (asyncio's check costs a getpid())
        else:
            loop = asyncio._get_running_loop()
        if loop is not None:
            # inside an event loop: every record of this loop pass goes out in one write, at
            # the end of the pass (one syscall instead of one per record)
            if len(self.pending) + len(data) > self.max_pending:
                self.dropped += 1
                return
            self.pending += data
            if not self._scheduled or loop is not known:
                self._scheduled = True
                self._loop, self._loop_thread = loop, threading.get_ident()
                loop.call_soon(self._flush_soon)
            return
        if self.pending and not self.flush():
            if len(self.pending) + len(data) > self.max_pending:
                self.dropped += 1
            else:
                self.pending += data
            return
        try:
            n = self._write(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:  # EPIPE (nobody will ever read) and the like
            self.dropped += 1
            return
        if n < len(data):
            if n == 0 and len(data) > self.max_pending:
                self.dropped += 1
                return
            self.pending += data[n:]  # a cut record is always finished before the next

    def flush(self) -> bool:
        """Write what is waiting, as far as the descriptor takes it; True when nothing waits."""
        pending = self.pending
        while pending:
            chunk = pending
            if self._atomic and len(pending) > select.PIPE_BUF:
                # whole lines, at most PIPE_BUF bytes: a pipe takes such a write whole or not
                # at all, so another process writing to it (the supervisor and the other
                # workers share stdout) never lands inside a line
                cut = pending.rfind(b"\n", 0, select.PIPE_BUF) + 1
                if cut == 0:  # one line longer than PIPE_BUF: it cannot be atomic
                    cut = pending.find(b"\n") + 1 or len(pending)
                chunk = pending[:cut]
            try:
                n = self._write(chunk)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                pending.clear()  # the reader is gone: what waits can never be written
                return True
            if n <= 0:
                return False
            del pending[:n]
            if n < len(chunk):
                return False  # the descriptor is full for now
        return True

    def _flush_soon(self) -> None:
        self._scheduled = False
        self.flush()  # what the descriptor cannot take now waits for the next record or tick

    def forget_pending(self) -> None:
        """In a forked child: what waits belongs to the parent, which still writes it."""
        self.pending = bytearray()
        self.dropped = 0
        self._scheduled = False
        self._loop = None
        self._loop_thread = 0
