"""The tenant's per-call decision webhook: one POST per call, a strict time-out, a fallback.

A keep-alive connection pool per worker (aiohttp), a circuit breaker per endpoint (the
store's: after failure_threshold failures in a row no call waits for it during open_s), and
never a wait on the event loop: every call is a task bounded by the webhook's timeout_ms.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from proxy.bindings.breaker import CircuitBreaker
from proxy.policy.spec import WebhookSpec
from proxy.records.push import signature

MAX_REPLY_BYTES = 4096


class WebhookClient:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._breakers: dict[str, CircuitBreaker] = {}

    def _session_for(self, hook: WebhookSpec) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=hook.max_connections,
                                             keepalive_timeout=60)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    def breaker(self, hook: WebhookSpec) -> CircuitBreaker:
        b = self._breakers.get(hook.url)
        if b is None:
            b = self._breakers[hook.url] = CircuitBreaker(hook.failure_threshold, hook.open_s,
                                                          name=f"webhook {hook.url}")
        return b

    async def ask(self, hook: WebhookSpec, payload: dict[str, Any]) -> tuple[Any, str]:
        """(the reply's JSON, "") or (None, why it failed)."""
        breaker = self.breaker(hook)
        if not breaker.allow(time.monotonic()):
            return None, "circuit open"
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"}
        if hook.secret:
            headers["X-Sip700-Signature"] = signature(hook.secret, int(time.time()), body)
        try:
            async with asyncio.timeout(hook.timeout_s):
                async with self._session_for(hook).post(hook.url, data=body,
                                                        headers=headers) as resp:
                    if resp.status != 200:
                        failure = f"HTTP {resp.status}"
                        breaker.record_failure(time.monotonic(), failure)
                        return None, failure
                    text = await resp.content.read(MAX_REPLY_BYTES + 1)
        except TimeoutError:
            breaker.record_failure(time.monotonic(), "timeout")
            return None, "timeout"
        except (aiohttp.ClientError, OSError) as exc:
            failure = f"unreachable ({type(exc).__name__})"
            breaker.record_failure(time.monotonic(), failure)
            return None, failure
        breaker.record_success()
        if len(text) > MAX_REPLY_BYTES:
            return None, "reply too large"
        try:
            return json.loads(text), ""
        except ValueError:
            return None, "reply is not JSON"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
