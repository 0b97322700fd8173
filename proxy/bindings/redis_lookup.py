"""A lean, pipelined connection for the one command on the call path: `EVALSHA resolve`.

redis-py costs ~250 µs of Python per command on this class of machine (connection pool,
command packing, response callbacks). Lookups need none of that: one connection per process,
RESP written directly, replies parsed by hiredis and matched to waiters in order (Redis answers
a connection's commands in order), so concurrent lookups pipeline on their own. Everything else
(writes, admin, Sentinel, Cluster, TLS) stays on redis-py.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis


def lean_target(url: str, sentinel: Any, cluster: Any) -> dict[str, Any] | None:
    """Where the lean connection goes, or None when only redis-py can get there."""
    if sentinel is not None or cluster is not None:
        return None
    parts = urlsplit(url)
    if parts.scheme == "unix":
        target: dict[str, Any] = {"path": parts.path}
    elif parts.scheme == "redis":
        target = {"host": parts.hostname or "127.0.0.1", "port": parts.port or 6379}
    else:
        return None  # rediss:// (TLS): redis-py handles it
    db = parts.path.strip("/") if parts.scheme == "redis" else ""
    query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
    target["db"] = int(query.get("db", db or 0) or 0)
    target["username"] = unquote(parts.username) if parts.username else None
    target["password"] = unquote(parts.password) if parts.password else None
    return target


def _pack(*args: str | bytes | int) -> bytes:
    """One command in RESP (hiredis's packer, in C: a third of the time of doing it here)."""
    return hiredis.pack_command(args)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            if not self.waiters:
                continue  # nothing asked for it (cannot happen with an ordered server)
            waiter = self.waiters.popleft()
            if waiter.done():
                continue  # its caller timed out; the order is kept all the same
            if isinstance(reply, hiredis.ReplyError):
                waiter.set_exception(LookupReplyError(str(reply)))
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.transport = None
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionError("redis connection lost"))


class _Batch:
    """Stands in the reply queue for each of a batch's commands: one future for all their
    replies (no future, gather or callback per command)."""

    __slots__ = ("future", "left", "replies")

    def __init__(self, future: asyncio.Future[list[Any]], n: int) -> None:
        self.future = future
        self.replies: list[Any] = []
        self.left = n

    def done(self) -> bool:
        return self.future.done()  # given up (timed out): its replies are skipped

    def set_result(self, reply: Any) -> None:
        self.replies.append(reply)
        self.left -= 1
        if not self.left:
            self.future.set_result(self.replies)

    set_exception = set_result  # an error reply takes its command's place


class _CallbackBatch:
    """Like _Batch, but hands the replies to a function as the last one is read (no future,
    no task): for a caller on the event loop's hot path that keeps no coroutine per request.
    A lost connection, or the time-out's timer, hands it that exception instead; late replies
    are skipped."""

    __slots__ = ("done_fn", "finished", "left", "replies", "timer")

    def __init__(self, done_fn: Any, n: int) -> None:
        self.done_fn = done_fn
        self.replies: list[Any] = []
        self.left = n
        self.finished = False
        self.timer: asyncio.TimerHandle | None = None

    def done(self) -> bool:
        return self.finished

    def set_result(self, reply: Any) -> None:
        self.replies.append(reply)
        self.left -= 1
        if not self.left:
            self.finished = True
            if self.timer is not None:
                self.timer.cancel()
            self.done_fn(self.replies)

    def set_exception(self, exc: BaseException) -> None:
        if isinstance(exc, LookupReplyError):  # an error reply takes its command's place
            self.set_result(exc)
            return
        self.fail(exc)  # connection lost: the rest will never come

    def fail(self, exc: BaseException) -> None:
        if not self.finished:
            self.finished = True
            if self.timer is not None:
                self.timer.cancel()
            self.done_fn(exc)


class LookupReplyError(Exception):
    """Redis answered with an error (NOSCRIPT, BUSY, …)."""


class LeanConnection:
    """One pipelined connection; `call(*args)` awaits that command's reply."""

    def __init__(self, target: dict[str, Any]) -> None:
        self.target = target
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        t = self.target
        if "path" in t:
            _, protocol = await loop.create_unix_connection(_Protocol, t["path"])
        else:
            _, protocol = await loop.create_connection(_Protocol, t["host"], t["port"])
        setup: list[bytes] = []
        if t.get("password"):
            setup.append(_pack("AUTH", *([t["username"]] if t.get("username") else []),
                               t["password"]))
        if t.get("db"):
            setup.append(_pack("SELECT", t["db"]))
        for command in setup:
            waiter = loop.create_future()
            protocol.waiters.append(waiter)
            assert protocol.transport is not None
            protocol.transport.write(command)
            await waiter
        return protocol

    async def _ready(self) -> _Protocol:
        protocol = self._protocol
        if protocol is None or protocol.lost:
            if self._connecting is None:
                self._connecting = asyncio.ensure_future(self._connect())
            try:
                protocol = await asyncio.shield(self._connecting)
            finally:
                if self._connecting is not None and self._connecting.done():
                    self._connecting = None
            self._protocol = protocol
        return protocol

    async def connect(self) -> None:
        """Connect now (lookups before this go through `call`, which connects on first use)."""
        await self._ready()

    async def call(self, *args: str | bytes | int) -> Any:
        protocol = await self._ready()
        waiter = asyncio.get_running_loop().create_future()
        protocol.waiters.append(waiter)
        assert protocol.transport is not None
        protocol.transport.write(_pack(*args))
        return await waiter

    async def call_many(self, commands: list[tuple[str | bytes | int, ...]]) -> list[Any]:
        """Several commands in one write; their replies in order. An error reply raises
        LookupReplyError once every reply is in (the first one's)."""
        replies = await self.call_each(commands)
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return replies

    async def call_each(self, commands: list[tuple[str | bytes | int, ...]]) -> list[Any]:
        """Several commands in one write; their replies in order, an error reply (or a lost
        connection) as its exception, in its place: one command's error is not the others'."""
        if not commands:
            return []
        protocol = await self._ready()
        batch = _Batch(asyncio.get_running_loop().create_future(), len(commands))
        protocol.waiters.extend([batch] * len(commands))  # type: ignore[list-item]
        assert protocol.transport is not None
        protocol.transport.write(b"".join(_pack(*c) for c in commands))
        return await batch.future

    @property
    def connected(self) -> bool:
        """True while commands can be written at once (`send_each` will take them)."""
        protocol = self._protocol
        return protocol is not None and not protocol.lost and protocol.transport is not None

    def send_each(self, commands: list[tuple[str | bytes | int, ...]],
                  done: Any, timeout_s: float | None) -> bool:
        """`call_each` without awaiting: `done(replies)` is called from the reader (an error
        reply in its command's place), `done(exception)` on a lost connection or after
        `timeout_s` (TimeoutError). False (nothing sent) while the connection is not up: use
        `call_each`."""
        protocol = self._protocol
        if protocol is None or protocol.lost or protocol.transport is None or not commands:
            return False
        batch = _CallbackBatch(done, len(commands))
        protocol.waiters.extend([batch] * len(commands))  # type: ignore[list-item]
        protocol.transport.write(b"".join(_pack(*c) for c in commands))
        if timeout_s is not None:
            batch.timer = asyncio.get_running_loop().call_later(
                timeout_s, batch.fail, TimeoutError())
        return True

    def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
