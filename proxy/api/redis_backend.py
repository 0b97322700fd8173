"""The binding API on the Redis store: one Lua script per change (see api/redis_scripts.py).

Every script publishes the X it changed on the store's invalidation channel, so every proxy
instance drops its cached answers for X at once (the same mechanism as `sip700 unbind`).
Scripts go over the lean pipelined connection the proxy's lookups use (redis-py costs far
more per command); redis-py is the fallback (Sentinel, TLS) and serves the reads.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import structlog
from redis.exceptions import RedisError, ResponseError

from proxy.api import redis_scripts
from proxy.api.audit import AuditLog
from proxy.api.pools import Pools
from proxy.api.records import ApiError, AuditContext, dump_record, record_binding
from proxy.bindings.redis_connect import connect
from proxy.bindings.redis_lookup import LeanConnection, LookupReplyError, lean_target
from proxy.bindings.redis_scripts import GET as GET_X
from proxy.bindings.redis_store import meta_value, parse_meta_value

log = structlog.get_logger("sip700.api")
_SYNC_BATCH = 5000


def unavailable(exc: BaseException) -> ApiError:
    return ApiError(503, "store_unavailable", f"binding store unavailable ({type(exc).__name__})",
                    headers={"Retry-After": "1"})


class RedisBackend:
    """Creates, changes and finds API bindings in Redis."""

    def __init__(self, cfg: Any, pools: Pools, client: Any = None) -> None:
        store = cfg.store
        self.cfg = cfg
        self.pools = pools
        self.prefix = store.key_prefix
        self.channel = f"{store.key_prefix}invalidate"
        self.origin = f"api-{uuid.uuid4().hex[:12]}"
        self.timeout_s = max(store.timeout_ms / 1000.0, 1.0)
        if client is None:
            client, _ = connect(store)
        self.client = client
        self.audit = AuditLog.from_config(cfg, client)
        target = lean_target(store.redis_url, store.sentinel, store.cluster)
        self.lean = LeanConnection(target) if target is not None else None
        self._scripts = {name: client.register_script(text) for name, text in (
            ("create", redis_scripts.CREATE), ("change", redis_scripts.CHANGE),
            ("sync", redis_scripts.SYNC_POOL), ("get_x", GET_X))}
        self.caps = {t.id: t.max_pairs_per_x for t in cfg.tenants}
        self.index_ttl_ms = (cfg.api.max_ttl_s + 60) * 1000
        self.on_change = None  # callable(x): the embedded API's own process cache

    # -- life --------------------------------------------------------------------------------

    async def start(self) -> None:
        for script in self._scripts.values():
            script.sha = await self.client.script_load(script.script)
        await self.sync_pools()

    async def close(self) -> None:
        if self.lean is not None:
            self.lean.close()
        await self.client.aclose()

    async def ready(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                return bool(await self.client.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def sync_pools(self) -> None:
        """Rebuild a tenant's pool sets in Redis when its configured numbers changed."""
        sync = self._scripts["sync"]
        for tenant, tags in self.pools.areas.items():
            for tag in tags:
                digest = self.pools.digest(tenant, tag)
                base = [self.prefix, 0, tenant, tag]
                if await sync(args=[*base, "?" + digest]) == 1:
                    continue
                await sync(args=[*base, "start"])
                batch: list[str] = []
                for number in self.pools.numbers(tenant, tag):
                    batch.append(number)
                    if len(batch) >= _SYNC_BATCH:
                        await sync(args=[*base, "+", *batch])
                        batch = []
                if batch:
                    await sync(args=[*base, "+", *batch])
                await sync(args=[*base, "=" + digest])
                log.info("api_pool_synced", tenant=tenant, area=tag)

    # -- scripts -----------------------------------------------------------------------------

    async def _run(self, name: str, args: list[Any]) -> Any:
        script = self._scripts[name]
        try:
            async with asyncio.timeout(self.timeout_s):
                if self.lean is not None and script.sha:
                    try:
                        return await self.lean.call("EVALSHA", script.sha, 0, *args)
                    except LookupReplyError as exc:
                        if not str(exc).startswith("NOSCRIPT"):
                            raise ApiError(503, "store_error", "binding store error") from exc
                return await script(keys=[], args=args)
        except ApiError:
            raise
        except ResponseError as exc:
            log.error("api_script_error", script=name, error=str(exc)[:200])
            raise ApiError(503, "store_error", "binding store error") from exc
        except (RedisError, OSError, TimeoutError, ConnectionError) as exc:
            raise unavailable(exc) from exc

    def area_tag(self, x: str) -> str:
        owner = self.pools.owner(x)
        return owner[1] if owner is not None else "-"

    @staticmethod
    def _text(value: Any) -> str:
        return value.decode() if isinstance(value, bytes) else value

    # -- operations --------------------------------------------------------------------------

    async def create(self, record: dict[str, Any], tags: list[str], ctx: AuditContext,
                     strict: bool = False) -> tuple[bool, dict[str, Any]]:
        """(True, record) created, (False, record) an earlier one for the same request_id.

        ApiError 409 when the given x cannot take the pair or no X is free."""
        now_ms = int(time.time() * 1000)
        tenant = record["tenant"]
        binding = record_binding({**record, "x": record["x"] or "0"})
        args = [self.prefix, now_ms, tenant, record.get("request_id") or "", record["id"],
                record["type"], record["a"], record["b"] or "", record["exp_ms"],
                record["x"], " ".join(tags), self.caps[tenant], meta_value(binding),
                dump_record({**record, "x": ""}), record.get("order_id") or "",
                *self.audit.lua_args(now_ms), ctx.key_id, ctx.source, self.channel,
                self.origin, self.index_ttl_ms]
        status, payload = await self._run("create", args)
        payload = self._text(payload)
        if int(status) == 0:
            raise conflict(payload, record, strict)
        stored = json.loads(payload)
        if int(status) == 1 and self.on_change is not None:
            self.on_change(stored["x"])
        return int(status) == 1, stored

    async def get(self, binding_id: str) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(self.timeout_s):
                text = await self.client.get(f"{self.prefix}b:{binding_id}")
        except (RedisError, OSError, TimeoutError) as exc:
            raise unavailable(exc) from exc
        return json.loads(text) if text else None

    async def change(self, old_text: str, old: dict[str, Any], new: dict[str, Any] | None,
                     ctx: AuditContext) -> dict[str, Any] | None:
        """Replace (or, with new None, delete) a record read as `old_text`.

        Returns the stored record; None when it changed since it was read (read and retry)."""
        now_ms = int(time.time() * 1000)
        tenant = old["tenant"]
        target = new or old
        args = [self.prefix, now_ms, old["id"], old_text, dump_record(new) if new else "",
                tenant, old["type"], old["x"], old["a"], old["b"] or "", target["a"],
                target["b"] or "", target["exp_ms"],
                meta_value(record_binding(target)), self.area_tag(old["x"]),
                self.caps.get(tenant, 1), old.get("order_id") or "",
                *self.audit.lua_args(now_ms), ctx.key_id, ctx.source, ctx.request_id,
                self.channel, self.origin, self.index_ttl_ms]
        status, payload = await self._run("change", args)
        payload = self._text(payload)
        if int(status) == 0:
            if payload == "retry":
                return None
            if payload == "not_found":
                raise ApiError(404, "not_found", "no such binding")
            raise ApiError(409, "party_bound", "a new party already has a live binding on "
                                               "this binding's x", "a")
        if self.on_change is not None:
            self.on_change(old["x"])
        return json.loads(payload) if payload else old

    async def get_raw(self, binding_id: str) -> str | None:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self.client.get(f"{self.prefix}b:{binding_id}")
        except (RedisError, OSError, TimeoutError) as exc:
            raise unavailable(exc) from exc

    async def find(self, tenants: list[str], *, number: str | None = None, x: str | None = None,
                   order_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Live records of these tenants with that party, on that X, or for that order."""
        now_ms = int(time.time() * 1000)
        try:
            async with asyncio.timeout(max(self.timeout_s, 5.0)):
                ids: list[str] = []
                if x is not None:
                    flat = await self._scripts["get_x"](
                        keys=[f"{self.prefix}{{{x}}}", f"{self.prefix}{{{x}}}:e"],
                        args=[now_ms, limit])
                    for i in range(4, len(flat), 5):
                        meta = parse_meta_value(flat[i])
                        if meta.get("id") and meta.get("tenant") in tenants:
                            ids.append(meta["id"])
                else:
                    kind, value = ("n", number) if number is not None else ("o", order_id)
                    async with self.client.pipeline(transaction=False) as pipe:
                        for tenant in tenants:
                            pipe.zrangebyscore(f"{self.prefix}{kind}:{tenant}:{value}",
                                               f"({now_ms}", "+inf", start=0, num=limit)
                        for found in await pipe.execute():
                            ids.extend(found)
                if not ids:
                    return []
                texts = await self.client.mget([f"{self.prefix}b:{i}" for i in ids[:limit]])
        except (RedisError, OSError, TimeoutError) as exc:
            raise unavailable(exc) from exc
        records = [json.loads(t) for t in texts if t]
        return [r for r in records if r["tenant"] in tenants and r["exp_ms"] > now_ms]


def conflict(reason: str, record: dict[str, Any], strict: bool) -> ApiError:
    """The 409 for a create the store refused."""
    if reason == "x_taken":
        return ApiError(409, "x_unavailable",
                        "x cannot take this binding: a party already has a live binding on it, "
                        "it carries an axn binding, or it is at max_pairs_per_x", "x")
    if record.get("area") and strict:
        return ApiError(409, "no_free_x", f"no free middle number in area {record['area']} "
                                          "of your pool (area_match: strict)", "area")
    return ApiError(409, "no_free_x", "no free middle number in your pool for these parties "
                                      "(every number is at max_pairs_per_x or already binds "
                                      "a or b)")
