"""Starting the API: inside `sip700 run` (worker 0, any store) or standalone (`sip700 api`).

Where it runs with several workers: in worker 0 only. With the Redis store every worker reads
Redis, and the API's scripts publish each change on the invalidation channel that every
worker's cache listens to. With the memory store each worker holds its own copy, so worker 0
also appends each change to a journal in the run's private directory, which the other workers
follow (journal.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.log import server_logger

from proxy.api.app import build_app
from proxy.api.audit import AuditLog
from proxy.api.journal import Journal
from proxy.api.pools import Pools
from proxy.numbers import mask_numbers_in

log = structlog.get_logger("sip700.api")
JOURNAL_NAME = "api-journal"


class RequestErrorLog:
    """The logger aiohttp's request handler writes to (`AppRunner(logger=…)`).

    A request its HTTP parser refuses (a bad Content-Length, a line too long, not HTTP) is the
    client's error, and aiohttp has answered it 400: one `api_bad_http` warning with the
    reason (its first line, number-like digit runs masked), not a traceback. Anything else
    goes to aiohttp's own `aiohttp.server` logger, as before.
    """

    def debug(self, msg: str, *args: Any, **kw: Any) -> None:
        server_logger.debug(msg, *args, **kw)

    def exception(self, msg: str, *args: Any, exc_info: Any = None, **kw: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            reason = (str(exc_info.message).strip().splitlines() or [""])[0][:200]
            log.warning("api_bad_http", status=exc_info.code,
                        reason=mask_numbers_in(reason),
                        remote=str(args[0]) if args else "")
            return
        server_logger.exception(msg, *args, exc_info=exc_info, **kw)


class ApiServer:
    """A running API: the backend and the HTTP site."""

    def __init__(self, backend: Any, runner: web.AppRunner) -> None:
        self.backend = backend
        self.runner = runner

    async def close(self) -> None:
        await self.runner.cleanup()
        await self.backend.close()


def make_backend(cfg: Any, store: Any = None, journal_dir: str | None = None) -> Any:
    """The backend for the configured store (the memory one needs the process's store)."""
    pools = Pools(cfg)
    if cfg.store.backend == "redis":
        from proxy.api.redis_backend import RedisBackend

        backend = RedisBackend(cfg, pools)
        cache = getattr(store, "cache", None)
        if cache is not None:  # this process's own cache: no wait for the pub/sub echo
            backend.on_change = cache.invalidate_x
        return backend
    from proxy.api.memory_backend import MemoryBackend

    journal = Journal(Path(journal_dir) / JOURNAL_NAME) if journal_dir else None
    return MemoryBackend(cfg, pools, store, AuditLog.from_config(cfg), journal)


async def start_api(cfg: Any, store: Any = None, journal_dir: str | None = None,
                    reuse_port: bool = False) -> ApiServer:
    """Start the API on `api.listen`."""
    backend = make_backend(cfg, store, journal_dir)
    await backend.start()
    app = build_app(cfg, backend, backend.audit)
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           logger=RequestErrorLog())
    await runner.setup()
    endpoint = cfg.api.listen
    from proxy.config import parse_host_port

    host, port = parse_host_port(endpoint)
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port, backlog=1024)
    await site.start()
    log.info("api_listening", listen=endpoint, backend=cfg.store.backend)
    return ApiServer(backend, runner)


def journal_follower(cfg: Any, store: Any, journal_dir: str) -> Any:
    """For a worker other than 0 with the memory store and the API on: follow worker 0."""
    from proxy.api.journal import JournalFollower

    follower = JournalFollower(Journal(Path(journal_dir) / JOURNAL_NAME), store)
    follower.start()
    return follower
