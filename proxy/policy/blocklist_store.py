"""Blocklists kept in Redis: managed by `sip700 block` and the API, read by every worker.

Layout under the policy's key prefix: `block:g` (global) and `block:t:<tenant>` are sets of
`kind:value` entries, `block:scopes` the set of tenants with entries, `block:v` a counter
every change increments. Each worker polls the counter (policy.blocklist_poll_ms, 1 s at
most) and reloads the sets when it moved: a change is effective everywhere within a second.
"""

from __future__ import annotations

from typing import Any

from proxy.policy.blocklist import Blocklist


class BlocklistStore:
    def __init__(self, client: Any, key_prefix: str) -> None:
        self.client = client
        self.prefix = f"{key_prefix}block:"

    def _key(self, tenant: str | None) -> str:
        return f"{self.prefix}t:{tenant}" if tenant else f"{self.prefix}g"

    async def add(self, tenant: str | None, entry: str) -> bool:
        """True when the entry is new."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.sadd(self._key(tenant), entry)
            if tenant:
                pipe.sadd(f"{self.prefix}scopes", tenant)
            pipe.incr(f"{self.prefix}v")
            results = await pipe.execute()
        return bool(results[0])

    async def remove(self, tenant: str | None, entry: str) -> bool:
        """True when the entry was there."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.srem(self._key(tenant), entry)
            pipe.incr(f"{self.prefix}v")
            results = await pipe.execute()
        return bool(results[0])

    async def entries(self, tenant: str | None) -> list[str]:
        return sorted(_str(e) for e in await self.client.smembers(self._key(tenant)))

    async def version(self) -> str:
        return _str(await self.client.get(f"{self.prefix}v") or "0")

    async def load_all(self) -> dict[str, Blocklist]:
        """Every scope's list: "" for the global one, else the tenant's id."""
        tenants = sorted(_str(t) for t in await self.client.smembers(f"{self.prefix}scopes"))
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.smembers(self._key(None))
            for tenant in tenants:
                pipe.smembers(self._key(tenant))
            results = await pipe.execute()
        out = {}
        for scope, members in zip(["", *tenants], results, strict=True):
            if members:
                out[scope] = Blocklist.of(_str(m) for m in members)
        return out


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
