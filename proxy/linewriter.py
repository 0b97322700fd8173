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
from collections.abc import Callable
from typing import Any, Final

MAX_PENDING_BYTES: Final = 1 << 20  # log output held while stdout cannot take it
MAX_RECORDS: Final = 10_000  # records waiting to be rendered at the end of a loop pass


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
        # records handed over with write_later, rendered at the end of the loop pass
        self.records: list[tuple[Callable[[dict[str, Any]], str], dict[str, Any]]] = []
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

    def _running_loop(self) -> asyncio.AbstractEventLoop | None:
        known = self._loop
        if known is not None and self._loop_thread == threading.get_ident() and known.is_running():
            return known  # (asyncio's own check costs a getpid())
        return asyncio._get_running_loop()

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._scheduled or loop is not self._loop:
            self._scheduled = True
            self._loop, self._loop_thread = loop, threading.get_ident()
            loop.call_soon(self._flush_soon)

    def write_later(self, render: Callable[[dict[str, Any]], str], fields: dict[str, Any]) -> None:
        """Write the record `render(fields)` (a line without its newline), rendered at the
        end of the loop pass: the call log's line then costs the message that made it
        nothing before its sends go out. Outside an event loop it is written at once. The
        caller hands `fields` over (it must not change them afterwards)."""
        loop = self._running_loop()
        if loop is None:
            self.write_line(render(fields))
            return
        if len(self.records) >= MAX_RECORDS:
            self.dropped += 1
            return
        self.records.append((render, fields))
        self._schedule(loop)

    def _render_records(self) -> None:
        records, self.records = self.records, []
        for render, fields in records:
            self._hold((render(fields) + "\n").encode("utf-8", "replace"))

    def _hold(self, data: bytes) -> None:
        if len(self.pending) + len(data) > self.max_pending:
            self.dropped += 1
        else:
            self.pending += data

    def write_line(self, line: str) -> None:
        """Write one record (a line without its newline), or drop it whole."""
        data = (line + "\n").encode("utf-8", "replace")
        loop = self._running_loop()
        if loop is not None:
            # inside an event loop: every record of this loop pass goes out in one write, at
            # the end of the pass (one syscall instead of one per record)
            if self.records:  # the deferred ones came first
                self._render_records()
            self._hold(data)
            self._schedule(loop)
            return
        if self.records:
            self._render_records()
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
        if self.records:
            self._render_records()
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
        self.records = []
        self._scheduled = False
        self._loop = None
        self._loop_thread = 0
