"""Redis binding store: shared by every proxy instance, with a local cache in front.

One round trip per lookup (a read-only Lua script on X's keys, see redis_scripts.py). Every
Redis call is bounded by `timeout_ms`; a circuit breaker stops calls to a Redis that keeps
failing, and cached bindings keep routing meanwhile. Changes are announced on the pub/sub
channel `<prefix>invalidate` (published by the same script that writes, so atomically), which
every instance listens to in order to drop its cached answers for X.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

from proxy.bindings import redis_scripts
from proxy.bindings.breaker import CircuitBreaker
from proxy.bindings.cache import ResolutionCache, Settled
from proxy.bindings.model import (
    A_TO_B,
    B_TO_A,
    BOTH,
    N_TO_A,
    Binding,
    BindingConflict,
    Outcome,
    Resolution,
    StoreUnavailable,
    resolution_from_meta,
    validate_binding,
)
from proxy.bindings.redis_connect import PubSubClientFactory, connect
from proxy.bindings.redis_lookup import LeanConnection, LookupReplyError, lean_target
from proxy.numbers import normalize_number

log = structlog.get_logger("sip700.bindings")

_OUTCOME_BY_CODE = {1: Outcome.ROUTE, 2: Outcome.NOT_PARTY, 0: Outcome.NO_BINDING,
                    3: Outcome.DIRECTION_RESTRICTED}
# direction as stored with a binding's optional fields (see redis_scripts)
_DIRECTION_CODE = {BOTH: "b", A_TO_B: "a", B_TO_A: "r"}
_DIRECTION_BY_CODE = {code: name for name, code in _DIRECTION_CODE.items()}
# the resolve script's leg of a routed call (for call records)
_LEGS = {"a": A_TO_B, "b": B_TO_A, "n": N_TO_A}


def meta_value(binding: Binding) -> str:
    """A binding's optional fields as the X hash keeps them ('' when it has none)."""
    meta = binding.meta()
    if not meta:
        return ""
    direction = meta.pop("direction", BOTH)
    return (f"{_DIRECTION_CODE[direction]}|{binding.b or ''}|"  # type: ignore[index]
            f"{json.dumps(meta, separators=(',', ':'), ensure_ascii=False)}")


def parse_meta_value(value: str) -> dict[str, Any]:
    """The optional fields of a stored binding (inverse of meta_value)."""
    if not value:
        return {}
    code, _, rest = value.partition("|")
    _, _, text = rest.partition("|")
    meta = json.loads(text) if text else {}
    direction = _DIRECTION_BY_CODE.get(code, BOTH)
    if direction != BOTH:
        meta["direction"] = direction
    return meta
_GLOB_SPECIAL = str.maketrans({c: "\\" + c for c in "*?[]\\"})
_PUBSUB_IDLE_PING_S = 1.0
_PUBSUB_DEAD_AFTER_S = 3.0


def _ms(t: float) -> int:
    return int(t * 1000)


# lookup_batch's callback: each request's tag with its answer (None: the store could not answer)
BatchDone = Callable[[list[tuple[Any, Resolution | None]]], None]


def _answer(reply: Any, now: float) -> Resolution:
    """The resolve script's reply as a Resolution."""
    code, callee, exp_ms, meta, leg = reply
    outcome = _OUTCOME_BY_CODE[int(code)]
    leg = _LEGS.get(leg.decode() if isinstance(leg, bytes) else leg, "")
    if meta:  # only bindings made with optional fields (the API's) carry any
        fields = parse_meta_value(meta.decode() if isinstance(meta, bytes) else meta)
        if isinstance(callee, bytes):
            callee = callee.decode()
        return resolution_from_meta(outcome, callee or None, int(exp_ms) / 1000.0, fields, leg)
    if outcome is Outcome.ROUTE:
        if isinstance(callee, bytes):
            callee = callee.decode()
        return Resolution(outcome, callee, int(exp_ms) / 1000.0, leg=leg)
    return Resolution(outcome, None, now)


class RedisStore:
    """Bindings in Redis (standalone, Sentinel or Cluster), cached locally per process."""

    def __init__(
        self,
        client: Any,
        pubsub_client: PubSubClientFactory | None,
        *,
        key_prefix: str = "sip700:",
        timeout_ms: float = 200,
        cache: ResolutionCache | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError("key_prefix may not contain braces (they pick the cluster slot)")
        self.key_prefix = key_prefix
        self.channel = f"{key_prefix}invalidate"
        self.timeout_s = float(timeout_ms) / 1000.0
        # `is None`, not `or`: an empty cache is falsy (it has a length), and `or` threw the
        # configured one away (store.cache.* had no effect until 2026-12-02)
        self.cache = cache if cache is not None else ResolutionCache(100_000, 60.0, 1.0)
        self.cache.trusted = False  # until the invalidation channel is up
        self.breaker = breaker or CircuitBreaker(5, 1.0)
        # the lean pipelined connection for lookups (standalone Redis only; see redis_lookup)
        self.lean: LeanConnection | None = None
        self._instance_base = uuid.uuid4().hex[:12]
        self._client = client
        self._pubsub_client = pubsub_client
        self._resolve_script = client.register_script(redis_scripts.RESOLVE)
        self._bind_script = client.register_script(redis_scripts.BIND)
        self._unbind_script = client.register_script(redis_scripts.UNBIND)
        self._get_script = client.register_script(redis_scripts.GET)
        self._listener: asyncio.Task[None] | None = None
        self._refetches: set[asyncio.Task[None]] = set()
        self._channel_up = asyncio.Event() if pubsub_client is not None else None
        self._channel_state: bool | None = None
        self._closed = False

    @property
    def instance_id(self) -> str:
        """Origin tag of this process's invalidation messages.

        Includes the pid: workers forked from one parent share the object, and each must still
        hear the others' messages.
        """
        return f"{self._instance_base}.{os.getpid()}"

    @classmethod
    def from_config(cls, store_cfg: Any) -> RedisStore:
        """A store for `cfg.store`; nothing connects until first use or `start()`."""
        client, pubsub_client = connect(store_cfg)
        cache_cfg = getattr(store_cfg, "cache", None)
        breaker_cfg = getattr(store_cfg, "circuit_breaker", None)
        store = cls(
            client,
            pubsub_client,
            key_prefix=getattr(store_cfg, "key_prefix", "sip700:"),
            timeout_ms=getattr(store_cfg, "timeout_ms", 200),
            cache=ResolutionCache(
                getattr(cache_cfg, "max_entries", 100_000),
                getattr(cache_cfg, "max_ttl_s", 60.0),
                getattr(cache_cfg, "negative_ttl_s", 1.0),
            ),
            breaker=CircuitBreaker(
                getattr(breaker_cfg, "failure_threshold", 5),
                getattr(breaker_cfg, "open_s", 1.0),
            ),
        )
        target = lean_target(getattr(store_cfg, "redis_url", None) or "redis://127.0.0.1:6379/0",
                             getattr(store_cfg, "sentinel", None),
                             getattr(store_cfg, "cluster", None))
        if target is not None:
            store.lean = LeanConnection(target)
        return store

    def keys(self, x: str) -> list[str]:
        """X's hash and expiry zset; {X} is the Cluster hash tag."""
        base = f"{self.key_prefix}{{{x}}}"
        return [base, base + ":e"]

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, wait_s: float | None = None) -> bool:
        """Load the scripts, start listening for invalidations; True once subscribed.

        Waits up to `wait_s`; a Redis that is down makes this return False, not raise (the
        store keeps retrying in the background).
        """
        self._ensure_listener()
        await self._load_scripts()
        if self.lean is not None:  # up before the first call: lookup_batch needs it
            try:
                async with asyncio.timeout(max(self.timeout_s * 5, 1.0)):
                    await self.lean.connect()
            except (OSError, TimeoutError, LookupReplyError) as exc:
                log.warning("redis_lookup_connect_failed", reason=type(exc).__name__)
        if self._channel_up is None:
            return False
        wait = max(self.timeout_s * 5, 1.0) if wait_s is None else wait_s
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._channel_up.wait()
        return self._channel_up.is_set()

    async def _load_scripts(self) -> None:
        # Without this the first calls each pay NOSCRIPT + SCRIPT LOAD inside their deadline.
        scripts = (self._resolve_script, self._bind_script, self._unbind_script, self._get_script)
        try:
            async with asyncio.timeout(max(self.timeout_s * 5, 1.0)):
                for script in scripts:
                    script.sha = await self._client.script_load(script.script)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("redis_script_load_failed", reason=type(exc).__name__)

    def _ensure_listener(self) -> None:
        if self._listener is None and self._pubsub_client is not None and not self._closed:
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        if self.lean is not None:
            self.lean.close()
        await self._client.aclose()

    # -- lookups ------------------------------------------------------------------------------

    def resolve_cached(self, x: str, caller: str, now: float) -> Resolution | None:
        """A fresh cached answer, or None (then await resolve())."""
        return self.cache.get(x, caller, now)

    async def resolve(self, x: str, caller: str) -> Resolution:
        """The answer from cache or Redis; StoreUnavailable (fast) when neither can give one."""
        now = time.time()
        x = normalize_number(x) or x
        caller = normalize_number(caller) or caller
        hit = self.cache.get(x, caller, now)
        if hit is not None:
            return hit
        if self._listener is None:
            self._ensure_listener()
        if not self.breaker.allow(now):
            return self._stale_or_raise(x, caller, now, "circuit open")
        try:
            return await self.cache.get_or_load(x, caller, lambda: self._fetch(x, caller))
        except StoreUnavailable as exc:
            return self._stale_or_raise(x, caller, time.time(), str(exc))

    def _stale_or_raise(self, x: str, caller: str, now: float, why: str) -> Resolution:
        stale = self.cache.get_stale(x, caller, now)
        if stale is None:
            raise StoreUnavailable(f"binding store unavailable: {why}")
        return stale

    async def _fetch(self, x: str, caller: str) -> Resolution:
        now = time.time()
        keys = self.keys(x)
        sha = self._resolve_script.sha
        reply = None
        if self.lean is not None and sha:
            try:
                reply = await self._call(
                    self.lean.call("EVALSHA", sha, 2, keys[0], keys[1], caller, _ms(now)), now)
            except LookupReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    self.breaker.record_failure(now, "ReplyError")
                    raise StoreUnavailable(f"redis error: {exc}") from exc
                # a restarted Redis forgot the script: redis-py's call below loads it again
        if reply is None:
            return await self._fetch_by_client(x, caller, now)
        return _answer(reply, now)

    async def _fetch_by_client(self, x: str, caller: str, now: float) -> Resolution:
        """The lookup through redis-py, which loads the script again when Redis forgot it."""
        reply = await self._call(self._resolve_script(keys=self.keys(x),
                                                      args=[caller, _ms(now)]), now)
        return _answer(reply, now)

    # -- a loop pass's misses in one write ------------------------------------------------------

    def lookup_batch(self, requests: list[tuple[Any, str, str]], done: BatchDone
                     ) -> tuple[list[tuple[Any, Resolution | None]], list[tuple[Any, str, str]]]:
        """Look up one event-loop pass's cache misses, `(tag, x, caller)` each, in one write.

        Returns the answers known at once (a fresh cache entry, or the circuit breaker's
        verdict: a stale answer or None) and the requests this path cannot take (no lean
        connection up, the script not loaded yet), which go through `resolve()`. Every other
        request's answer reaches `done([(tag, answer), ...])` once Redis replies, from the
        connection's reader, or when `timeout_ms` passes; None means the store could not
        answer and no stale answer was cached. The same semantics as `resolve()` (single
        flight, breaker, stale fallback, invalidation) without its task, shielded future,
        timeout context and write per lookup."""
        lean = self.lean
        sha = self._resolve_script.sha
        if lean is None or not sha or self._closed or not lean.connected:
            return [], requests
        if self._listener is None:
            self._ensure_listener()
        now = time.time()
        cache = self.cache
        breaker = self.breaker
        answered: list[tuple[Any, Resolution | None]] = []
        commands: list[tuple[str | bytes | int, ...]] = []
        sent: list[tuple[Any, str, str, Any]] = []
        for tag, x, caller in requests:
            x = normalize_number(x) or x
            caller = normalize_number(caller) or caller
            hit = cache.get(x, caller, now)
            if hit is not None:
                answered.append((tag, hit))
                continue
            flight = cache.in_flight(x, caller)
            if flight is not None:  # single flight: wait for the load already out
                cache.join(flight, self._joined(tag, x, caller, done))
                continue
            if not breaker.allow(now):
                answered.append((tag, cache.get_stale(x, caller, now)))
                continue
            keys = self.keys(x)
            commands.append(("EVALSHA", sha, 2, keys[0], keys[1], caller, _ms(now)))
            sent.append((tag, x, caller, cache.start_flight(x, caller)))
        if commands and not lean.send_each(
                commands, lambda replies: self._batch_replied(sent, done, replies),
                self.timeout_s):  # cannot happen after `connected`; never strand a flight
            for _, x, caller, flight in sent:
                cache.end_flight(x, caller, flight, None, StoreUnavailable("not connected"), now)
            return answered, [(tag, x, caller) for tag, x, caller, _ in sent]
        return answered, []

    def _joined(self, tag: Any, x: str, caller: str, done: BatchDone) -> Settled:
        def settled(answer: Resolution | None, error: BaseException | None) -> None:
            if answer is None:
                answer = self.cache.get_stale(x, caller, time.time())
            done([(tag, answer)])
        return settled

    def _batch_replied(self, sent: list[tuple[Any, str, str, Any]], done: BatchDone,
                       replies: list[Any] | BaseException) -> None:
        now = time.time()
        cache = self.cache
        breaker = self.breaker
        results: list[tuple[Any, Resolution | None]] = []
        if isinstance(replies, BaseException):  # timed out, or the connection was lost
            why = type(replies).__name__
            error = StoreUnavailable(f"redis: {why}")
            for tag, x, caller, flight in sent:
                breaker.record_failure(now, why)
                cache.end_flight(x, caller, flight, None, error, now)
                results.append((tag, cache.get_stale(x, caller, now)))
            done(results)
            return
        for (tag, x, caller, flight), reply in zip(sent, replies, strict=True):
            if isinstance(reply, LookupReplyError):
                if str(reply).startswith("NOSCRIPT"):  # a restarted Redis forgot the script
                    self._refetch(tag, x, caller, flight, done)
                    continue
                breaker.record_failure(now, "ReplyError")
                cache.end_flight(x, caller, flight, None,
                                 StoreUnavailable(f"redis error: {reply}"), now)
                results.append((tag, cache.get_stale(x, caller, now)))
                continue
            try:
                answer = _answer(reply, now)
            except (ValueError, KeyError, TypeError) as exc:  # not the script's reply shape
                breaker.record_failure(now, "BadReply")
                cache.end_flight(x, caller, flight, None, StoreUnavailable(str(exc)), now)
                results.append((tag, cache.get_stale(x, caller, now)))
                continue
            breaker.record_success()
            cache.end_flight(x, caller, flight, answer, None, now)
            results.append((tag, answer))
        if results:
            done(results)

    def _refetch(self, tag: Any, x: str, caller: str, flight: Any, done: BatchDone) -> None:
        """One request of a batch through redis-py, which loads the script again."""
        async def refetch() -> None:
            try:
                answer: Resolution | None = await self._fetch_by_client(x, caller, time.time())
                error: BaseException | None = None
            except StoreUnavailable as exc:
                answer, error = None, exc
            self.cache.end_flight(x, caller, flight, answer, error, time.time())
            done([(tag, answer if answer is not None
                   else self.cache.get_stale(x, caller, time.time()))])
        task = asyncio.get_running_loop().create_task(refetch())
        self._refetches.add(task)
        task.add_done_callback(self._refetches.discard)

    async def _call(self, command: Any, now: float, timeout_s: float | None = None) -> Any:
        """Await a Redis command within the deadline, feeding the circuit breaker."""
        try:
            async with asyncio.timeout(self.timeout_s if timeout_s is None else timeout_s):
                result = await command
        except ResponseError as exc:
            if str(exc).startswith("CONFLICT"):
                self.breaker.record_success()
                raise BindingConflict(str(exc).removeprefix("CONFLICT ")) from None
            self.breaker.record_failure(now, type(exc).__name__)
            raise StoreUnavailable(f"redis error: {exc}") from exc
        except (RedisError, OSError, TimeoutError) as exc:
            self.breaker.record_failure(now, type(exc).__name__)
            raise StoreUnavailable(f"redis: {type(exc).__name__}") from exc
        self.breaker.record_success()
        return result

    async def get(self, x: str) -> list[Binding]:
        """Live bindings on X (soonest expiry first)."""
        x = normalize_number(x) or x
        return await self._get(x, 10_000)

    async def _get(self, x: str, limit: int) -> list[Binding]:
        now = time.time()
        self._check_breaker(now)
        flat = await self._call(self._get_script(keys=self.keys(x), args=[_ms(now), limit]), now)
        out = []
        for i in range(0, len(flat), 5):
            kind, a, b, exp_ms, meta = flat[i : i + 5]
            out.append(Binding(kind, x, a, b or None, int(exp_ms) / 1000.0,
                               **parse_meta_value(meta)))
        return out

    async def list(self, x_prefix: str = "", limit: int = 1000) -> list[Binding]:
        """Live bindings whose X starts with `x_prefix`, at most `limit` (SCAN; for admins)."""
        pattern = (
            self.key_prefix.translate(_GLOB_SPECIAL)
            + "{"
            + x_prefix.translate(_GLOB_SPECIAL)
            + "*}"
        )
        out: list[Binding] = []
        start = len(self.key_prefix) + 1
        try:
            async with asyncio.timeout(max(self.timeout_s, 30.0)):
                async for key in self._client.scan_iter(match=pattern, count=1000):
                    out.extend(await self._get(key[start:-1], limit - len(out)))
                    if len(out) >= limit:
                        break
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}") from exc
        return out[:limit]

    # -- changes ------------------------------------------------------------------------------

    async def bind(self, binding: Binding) -> bool:
        """Store a binding; True if new, False if it renewed the same parties.

        BindingConflict if a party is bound otherwise on X; StoreUnavailable if Redis is down.
        """
        binding = validate_binding(binding)
        now = time.time()
        self._check_breaker(now)
        try:
            result = await self._call(self._bind_call(binding, now), now)
        finally:
            self.cache.invalidate_x(binding.x)
        return int(result) == 1

    def _bind_call(self, binding: Binding, now: float) -> Any:
        args = self._bind_args(binding, now, self.channel)
        return self._bind_script(keys=self.keys(binding.x), args=args)

    def _bind_args(self, binding: Binding, now: float, channel: str) -> list[str | int]:
        return [
            binding.kind,
            binding.a,
            binding.b or "",
            _ms(binding.expires_at),
            _ms(now),
            channel,
            f"{self.instance_id} {binding.x}",
            meta_value(binding),
        ]

    async def unbind(self, x: str, number: str) -> bool:
        """Remove the binding on X that `number` is party to (for AXN: its A)."""
        x = normalize_number(x) or x
        number = normalize_number(number) or number
        now = time.time()
        self._check_breaker(now)
        try:
            message = f"{self.instance_id} {x}"
            args = [number, _ms(now), self.channel, message]
            removed = await self._call(self._unbind_script(keys=self.keys(x), args=args), now)
        finally:
            self.cache.invalidate_x(x)
        return int(removed) == 1

    async def bind_many(
        self, bindings: Sequence[Binding], timeout_s: float = 30.0
    ) -> list[Exception | None]:
        """Bind a batch in one pipeline; per binding None or its error (BindingConflict…).

        Each binding is its own atomic script, so a refused one leaves nothing behind. One
        invalidation message names all the batch's X numbers.
        """
        if not bindings:
            return []
        now = time.time()
        self._check_breaker(now)
        sha = await self._call(self._client.script_load(self._bind_script.script), now, timeout_s)
        commands = [
            ("EVALSHA", sha, 2, *self.keys(b.x), *self._bind_args(b, now, "")) for b in bindings
        ]
        if isinstance(self._client, RedisCluster):
            pipe = self._client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            replies = await self._call(pipe.execute(raise_on_error=False), now, timeout_s)
        else:
            replies = await self._call(self._send_raw_pipeline(commands), now, timeout_s)
        xs = sorted({b.x for b in bindings})
        message = " ".join([self.instance_id, *xs])
        await self._call(self._client.publish(self.channel, message), now, timeout_s)
        for x in xs:
            self.cache.invalidate_x(x)
        out: list[Exception | None] = []
        for reply in replies:
            if isinstance(reply, ResponseError) and str(reply).startswith("CONFLICT"):
                out.append(BindingConflict(str(reply).removeprefix("CONFLICT ")))
            elif isinstance(reply, Exception):
                out.append(StoreUnavailable(f"redis error: {reply}"))
            else:
                out.append(None)
        return out

    async def _send_raw_pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Pipeline packed by hiredis: redis-py's Python packing costs ~40 µs per command."""
        pool = self._client.connection_pool
        connection = await pool.get_connection()
        try:
            payload = b"".join([hiredis.pack_command(command) for command in commands])
            await connection.send_packed_command(payload, check_health=False)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            await connection.disconnect()  # replies may be left unread on it
            raise
        finally:
            await pool.release(connection)

    def _check_breaker(self, now: float) -> None:
        if not self.breaker.allow(now):
            raise StoreUnavailable("binding store unavailable: circuit open")

    # -- invalidation channel -----------------------------------------------------------------

    def _on_invalidation(self, data: bytes) -> None:
        """Message: "<origin instance> <x> [<x> ...]"; "*" for x drops everything."""
        tokens = data.decode("ascii", "replace").split()
        if len(tokens) < 2 or tokens[0] == self.instance_id:
            return  # this instance invalidated its cache when its own change completed
        for x in tokens[1:]:
            if x == "*":
                self.cache.clear()
            else:
                self.cache.invalidate_x(x)

    def _set_channel_state(self, up: bool, reason: str = "") -> None:
        if up:
            if self._channel_state is False:
                self.cache.clear()  # invalidations may have been missed while down
            self.cache.trusted = True
            assert self._channel_up is not None
            self._channel_up.set()
        else:
            self.cache.trusted = False
            if self._channel_up is not None:
                self._channel_up.clear()
        if self._channel_state is not up:
            if up:
                log.info("invalidation_channel_up", channel=self.channel)
            elif self._channel_state is not None:
                log.warning("invalidation_channel_down", channel=self.channel, reason=reason)
            self._channel_state = up

    async def _listen(self) -> None:
        """Keep one subscription alive; reconnect with backoff; detect silent links by PING."""
        assert self._pubsub_client is not None
        loop = asyncio.get_running_loop()
        backoff = 0.05
        attempt = 0
        while not self._closed:
            client: aioredis.Redis | None = None
            pubsub = None
            try:
                client = self._pubsub_client(attempt)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                async with asyncio.timeout(max(self.timeout_s * 5, 1.0)):
                    await pubsub.subscribe(self.channel)
                self._set_channel_state(True)
                self.breaker.record_success()
                backoff = 0.05
                last_seen = last_ping = loop.time()
                while True:
                    message = await pubsub.get_message(timeout=0.25)
                    t = loop.time()
                    if message is not None:
                        last_seen = t
                        if message["type"] == b"message" or message["type"] == "message":
                            self._on_invalidation(message["data"])
                        continue
                    if t - last_seen > _PUBSUB_DEAD_AFTER_S:
                        raise ConnectionError("no reply on the pub/sub link")
                    if t - last_ping >= _PUBSUB_IDLE_PING_S:
                        last_ping = t
                        async with asyncio.timeout(max(self.timeout_s, 1.0)):
                            await pubsub.ping()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._set_channel_state(False, type(exc).__name__)
                attempt += 1
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(pubsub.aclose(), 1.0)
                if client is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(client.aclose(), 1.0)
