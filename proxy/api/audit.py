"""The audit trail: every create, update, delete, allocation failure and console reveal, in a
Redis Stream (`audit.stream`), with each binding's entry ids in a list for its history.

An entry's fields: t (unix ms), action, tenant, key (key id: a prefix of the key's hash, never
the key), src (the client's address), rid (request id), id (binding id), reason (why a change
failed), before and after (the record as JSON, '' when there is none), request (what a failed
allocation asked for). With the Redis store the API's Lua scripts write the entry in the same
atomic step as the change; `append` is for the memory store and the console.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis.asyncio as aioredis

DAY_MS = 86_400_000


def stream_name(cfg: Any) -> str:
    return cfg.audit.stream or f"{cfg.store.key_prefix}audit"


def audit_url(cfg: Any) -> str:
    return cfg.audit.redis_url or cfg.store.redis_url


class AuditLog:
    """Writes and reads the audit stream."""

    def __init__(self, client: Any, stream: str, key_prefix: str, retention_days: int,
                 max_entries: int | None) -> None:
        self.client = client
        self.stream = stream
        self.key_prefix = key_prefix
        self.retention_ms = retention_days * DAY_MS
        self.max_entries = max_entries

    @classmethod
    def from_config(cls, cfg: Any, client: Any = None) -> AuditLog:
        if client is None:
            client = aioredis.Redis.from_url(audit_url(cfg), decode_responses=True,
                                             socket_timeout=2.0, socket_connect_timeout=2.0)
        return cls(client, stream_name(cfg), cfg.store.key_prefix, cfg.audit.retention_days,
                   cfg.audit.max_entries)

    def lua_args(self, now_ms: int) -> list[str | int]:
        """stream, minid, max_entries, history ttl: what the API's scripts need to append."""
        return [self.stream, f"{max(0, now_ms - self.retention_ms)}-0",
                self.max_entries or "", self.retention_ms]

    async def append(self, fields: dict[str, Any], binding_id: str = "") -> str:
        """Append one entry (and to the binding's history); returns the entry id."""
        now_ms = int(time.time() * 1000)
        entry = {"t": now_ms, **{k: "" if v is None else v for k, v in fields.items()}}
        entry["id"] = binding_id
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xadd(self.stream, entry, minid=f"{max(0, now_ms - self.retention_ms)}-0",
                      approximate=True)
            if self.max_entries:
                pipe.xtrim(self.stream, maxlen=self.max_entries, approximate=True)
            results = await pipe.execute()
        entry_id = results[0]
        if binding_id:
            key = f"{self.key_prefix}h:{binding_id}"
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.rpush(key, entry_id)
                pipe.pexpire(key, self.retention_ms)
                await pipe.execute()
        return entry_id

    async def history(self, binding_id: str, limit: int = 200) -> list[dict[str, Any]]:
        """A binding's entries, oldest first."""
        ids = await self.client.lrange(f"{self.key_prefix}h:{binding_id}", -limit, -1)
        if not ids:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.xrange(self.stream, entry_id, entry_id)
            found = await pipe.execute()
        return [entry(eid, fields) for rows in found for eid, fields in rows]

    async def latest(self, count: int = 20) -> list[dict[str, Any]]:
        """The newest entries, oldest first."""
        rows = await self.client.xrevrange(self.stream, count=count)
        return [entry(eid, fields) for eid, fields in reversed(rows)]

    async def query(self, *, start: str = "-", end: str = "+", tenant: str | None = None,
                    binding_id: str | None = None, action: str | None = None,
                    limit: int = 100) -> list[dict[str, Any]]:
        """Entries between two stream ids (or unix ms) matching the filters, oldest first."""
        if binding_id:
            rows = await self.history(binding_id, 10_000)
            return [r for r in rows if _matches(r, tenant, action)][:limit]
        out: list[dict[str, Any]] = []
        cursor = start
        while len(out) < limit:
            rows = await self.client.xrange(self.stream, cursor, end, count=1000)
            if not rows:
                break
            for eid, fields in rows:
                item = entry(eid, fields)
                if _matches(item, tenant, action):
                    out.append(item)
                    if len(out) >= limit:
                        break
            cursor = "(" + rows[-1][0]
        return out

    async def close(self) -> None:
        await self.client.aclose()


def _matches(item: dict[str, Any], tenant: str | None, action: str | None) -> bool:
    return (tenant is None or item.get("tenant") == tenant) and (
        action is None or item.get("action") == action)


def entry(entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """A stream entry as a dict: JSON fields decoded, the entry id under `entry`."""
    out: dict[str, Any] = {"entry": entry_id, **fields}
    for name in ("before", "after", "request"):
        value = out.get(name)
        if value:
            try:
                out[name] = json.loads(value)
            except ValueError:
                pass
        elif name in out:
            out[name] = None
    if "t" in out:
        out["t"] = int(out["t"])
    return out
