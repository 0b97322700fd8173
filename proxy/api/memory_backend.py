"""The binding API on the memory store (one proxy process, tests, small deployments).

Every operation runs synchronously under the event loop between two awaits, so a check and the
write that follows it are atomic here as a Lua script is in Redis. Allocation walks the
tenant's pool from a random point and takes the first number that can take the pair (exact,
O(1) typically, O(pool) when the pool is nearly exhausted). The audit entry is appended to the
Redis Stream right after the change (`audit.redis_url`, default the store's URL); if Redis is
down the change stands and the entry goes to the log instead (`audit_unwritten`).
With several workers, changes also go to a journal the other workers follow (journal.py).
"""

from __future__ import annotations

import heapq
import json
import random
import time
from typing import Any

import structlog

from proxy.api.audit import AuditLog
from proxy.api.journal import Journal, apply_change
from proxy.api.pools import Pools
from proxy.api.records import ApiError, AuditContext, dump_record, record_binding
from proxy.api.redis_backend import conflict
from proxy.bindings.model import AXN

log = structlog.get_logger("sip700.api")


class MemoryBackend:
    """Creates, changes and finds API bindings in a MemoryStore."""

    def __init__(self, cfg: Any, pools: Pools, store: Any, audit: AuditLog | None,
                 journal: Journal | None = None) -> None:
        self.cfg = cfg
        self.pools = pools
        self.store = store
        self.audit = audit
        self.journal = journal
        self.caps = {t.id: t.max_pairs_per_x for t in cfg.tenants}
        self.records: dict[str, dict[str, Any]] = {}
        self._by_key: dict[tuple[str, str, str], set[str]] = {}  # (kind, tenant, value) -> ids
        self._by_request: dict[tuple[str, str], str] = {}
        self._expiry: list[tuple[int, str]] = []
        self._pool_lists: dict[tuple[str, str], list[str]] = {}
        self.on_change = None

    async def start(self) -> None:
        if self.journal is not None:  # a restarted API worker: what the others already hold
            changes, _ = self.journal.read_from(0)
            now = time.time()
            for change in changes:
                apply_change(self.store, change, now)
                self._apply_records(change)

    async def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
        if self.audit is not None:
            await self.audit.close()

    async def ready(self) -> bool:
        return True

    # -- bookkeeping ---------------------------------------------------------------------------

    def _keys(self, record: dict[str, Any]) -> list[tuple[str, str, str]]:
        tenant = record["tenant"]
        keys = [("n", tenant, record["a"]), ("x", tenant, record["x"])]
        if record["b"]:
            keys.append(("n", tenant, record["b"]))
        if record.get("order_id"):
            keys.append(("o", tenant, record["order_id"]))
        return keys

    def _index(self, record: dict[str, Any]) -> None:
        self.records[record["id"]] = record
        for key in self._keys(record):
            self._by_key.setdefault(key, set()).add(record["id"])
        if record.get("request_id"):
            self._by_request[(record["tenant"], record["request_id"])] = record["id"]
        heapq.heappush(self._expiry, (record["exp_ms"], record["id"]))

    def _unindex(self, record: dict[str, Any]) -> None:
        self.records.pop(record["id"], None)
        for key in self._keys(record):
            ids = self._by_key.get(key)
            if ids is not None:
                ids.discard(record["id"])
                if not ids:
                    del self._by_key[key]

    def _apply_records(self, change: dict[str, Any]) -> None:
        for key in ("old", "del"):
            if change.get(key):
                self._unindex(change[key])
        if change.get("put"):
            self._index(change["put"])

    def _purge(self, now_ms: int) -> None:
        heap = self._expiry
        while heap and heap[0][0] <= now_ms:
            exp, binding_id = heapq.heappop(heap)
            record = self.records.get(binding_id)
            if record is not None and record["exp_ms"] == exp:
                self._unindex(record)
                self._by_request.pop((record["tenant"], record.get("request_id") or ""), None)

    def _commit(self, change: dict[str, Any], now: float) -> None:
        """Apply a change to this process's store and records, and to the journal."""
        apply_change(self.store, change, now)
        self._apply_records(change)
        if self.journal is not None:
            self.journal.append(change)
        x = (change.get("put") or change.get("del") or {}).get("x")
        if x and self.on_change is not None:
            self.on_change(x)

    async def _audit(self, fields: dict[str, Any], binding_id: str = "") -> None:
        if self.audit is None:
            return
        try:
            await self.audit.append(fields, binding_id)
        except Exception as exc:  # the change stands; the log keeps what the stream missed
            log.error("audit_unwritten", error=type(exc).__name__, action=fields.get("action"),
                      binding_id=binding_id, tenant=fields.get("tenant"))

    # -- operations ----------------------------------------------------------------------------

    def _pool(self, tenant: str, tag: str) -> list[str]:
        numbers = self._pool_lists.get((tenant, tag))
        if numbers is None:
            numbers = self._pool_lists[(tenant, tag)] = list(self.pools.numbers(tenant, tag))
        return numbers

    def _allocate(self, record: dict[str, Any], tags: list[str], now: float) -> str | None:
        kind, tenant = record["type"], record["tenant"]
        parties = (record["a"], record["b"]) if record["b"] else (record["a"],)
        cap = self.caps[tenant]
        can_take = self.store.can_take
        for tag in tags:
            numbers = self._pool(tenant, tag)
            if not numbers:
                continue
            start = random.randrange(len(numbers))
            for i in range(len(numbers)):
                x = numbers[(start + i) % len(numbers)]
                if can_take(x, kind, parties if kind != AXN else (), cap, now):
                    return x
        return None

    async def create(self, record: dict[str, Any], tags: list[str], ctx: AuditContext,
                     strict: bool = False) -> tuple[bool, dict[str, Any]]:
        now = time.time()
        now_ms = int(now * 1000)
        self._purge(now_ms)
        tenant = record["tenant"]
        rid = record.get("request_id")
        if rid:
            earlier = self._by_request.get((tenant, rid))
            if earlier is not None and earlier in self.records:
                return False, self.records[earlier]
        x = record["x"]
        reason = None
        if x:
            parties = (record["a"], record["b"]) if record["b"] else (record["a"],)
            if not self.store.can_take(x, record["type"], parties, self.caps[tenant], now):
                reason = "x_taken"
        else:
            x = self._allocate(record, tags, now)
            if x is None:
                reason = "no_free_x"
        if reason is not None:
            await self._audit({"action": "allocation_failed", "tenant": tenant,
                               "key": ctx.key_id, "src": ctx.source, "rid": rid or "",
                               "reason": reason, "request": dump_record(record)})
            raise conflict(reason, record, strict)
        stored = {**record, "x": x}
        self._commit({"put": stored}, now)
        await self._audit({"action": "create", "tenant": tenant, "key": ctx.key_id,
                           "src": ctx.source, "rid": rid or "", "before": "",
                           "after": dump_record(stored)}, stored["id"])
        return True, stored

    async def get(self, binding_id: str) -> dict[str, Any] | None:
        self._purge(int(time.time() * 1000))
        return self.records.get(binding_id)

    async def get_raw(self, binding_id: str) -> str | None:
        record = await self.get(binding_id)
        return None if record is None else dump_record(record)

    async def change(self, old_text: str, old: dict[str, Any], new: dict[str, Any] | None,
                     ctx: AuditContext) -> dict[str, Any] | None:
        now = time.time()
        current = self.records.get(old["id"])
        if current is None or dump_record(current) != old_text:
            return None if current is not None else _gone()
        if new is not None and new["type"] != AXN:
            entry_parties = {old["a"], old["b"]}
            others = [p for p in (new["a"], new["b"]) if p and p not in entry_parties]
            if others and not self.store.can_take(new["x"], new["type"], tuple(others),
                                                  10**9, now):
                await self._audit({"action": "update_failed", "tenant": old["tenant"],
                                   "key": ctx.key_id, "src": ctx.source,
                                   "rid": ctx.request_id, "reason": "conflict",
                                   "before": old_text, "after": dump_record(new)}, old["id"])
                raise ApiError(409, "party_bound", "a new party already has a live binding "
                                                   "on this binding's x", "a")
        change = {"old": old, "put": new} if new is not None else {"del": old}
        self._commit(change, now)
        await self._audit({"action": "update" if new is not None else "delete",
                           "tenant": old["tenant"], "key": ctx.key_id, "src": ctx.source,
                           "rid": ctx.request_id, "before": old_text,
                           "after": dump_record(new) if new is not None else ""}, old["id"])
        return new if new is not None else old

    async def find(self, tenants: list[str], *, number: str | None = None, x: str | None = None,
                   order_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        self._purge(int(time.time() * 1000))
        kind, value = (("n", number) if number is not None else
                       ("x", x) if x is not None else ("o", order_id))
        out: list[dict[str, Any]] = []
        for tenant in tenants:
            for binding_id in sorted(self._by_key.get((kind, tenant, value or ""), ())):
                out.append(self.records[binding_id])
        return out[:limit]


def _gone() -> None:
    raise ApiError(404, "not_found", "no such binding")


__all__ = ["MemoryBackend", "json", "record_binding"]
