"""The binding-store interface the proxy core uses, and the factory that picks a backend."""

from __future__ import annotations

from typing import Any, Protocol

import structlog

from proxy.bindings.model import Binding, Resolution

log = structlog.get_logger("sip700.bindings")


class BindingStore(Protocol):
    """What the proxy needs from a binding store (memory or Redis)."""

    def resolve_cached(self, x: str, caller: str, now: float) -> Resolution | None:
        """Answer from local memory only, without I/O; None means: await resolve()."""

    async def resolve(self, x: str, caller: str) -> Resolution:
        """Answer for a call from `caller` to `x`; may raise StoreUnavailable (fast)."""

    async def bind(self, binding: Binding) -> bool:
        """Store a binding; True if new, False if it renewed the same parties.

        BindingConflict on a clash, InvalidBinding on a bad number, StoreUnavailable (Redis).
        """

    async def unbind(self, x: str, number: str) -> bool:
        """Remove the binding on X that `number` is party to; False when none was live."""

    async def get(self, x: str) -> list[Binding]:
        """Live bindings on X."""

    async def list(self, x_prefix: str = "", limit: int = 1000) -> list[Binding]:
        """Live bindings whose X starts with `x_prefix`, at most `limit`."""

    async def close(self) -> None:
        """Release connections and background tasks."""


def open_store(cfg: Any) -> BindingStore:
    """The store `cfg.store.backend` names ('memory' or 'redis'); accepts a config or its `.store`.

    The memory store loads `bindings_file` here and logs what it skipped; the Redis store
    connects lazily (call `await store.start()` to connect and subscribe before traffic).
    """
    store_cfg = getattr(cfg, "store", cfg)
    backend = getattr(store_cfg, "backend", "memory")
    if backend == "memory":
        from proxy.bindings.memory import MemoryStore

        store = MemoryStore()
        path = getattr(store_cfg, "bindings_file", None)
        if path:
            loaded, problems = store.load_file(path)
            for problem in problems[:100]:
                log.warning("binding_file_row_skipped", problem=str(problem))
            log.info("bindings_loaded", file=str(path), loaded=loaded, skipped=len(problems))
        return store
    if backend == "redis":
        from proxy.bindings.redis_store import RedisStore

        return RedisStore.from_config(store_cfg)
    raise ValueError(f"unknown store backend {backend!r} (expected memory or redis)")
