"""The policy's shell: takes the calls the core queued in `policy_checks`, decides with the
engine (at most one Redis round trip, then the tenant's webhook if it has one), and calls
`core.complete_policy`. Background tasks keep the Redis blocklists in sync, release the
concurrency of ended calls and refresh the leases of answered ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import structlog

from proxy.bindings.breaker import CircuitBreaker
from proxy.bindings.redis_lookup import LeanConnection, LookupReplyError, lean_target
from proxy.policy.blocklist_store import BlocklistStore
from proxy.policy.engine import CONNECT, CallFacts, CounterPlan, Decision, PolicyEngine
from proxy.policy.redis_counters import RedisCounters
from proxy.policy.spec import PolicySpec, WebhookSpec
from proxy.policy.webhook import WebhookClient
from proxy.records.model import call_key

log = structlog.get_logger("sip700.policy")
OUT_DRAIN_S = 0.05  # ended calls' releases go out in batches this often


def redis_client(spec: PolicySpec) -> Any:
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(spec.redis_url, socket_timeout=spec.timeout_s,
                                   socket_connect_timeout=spec.timeout_s,
                                   client_name="sip700-policy")


class PolicyRunner:
    def __init__(self, core: Any, spec: PolicySpec, flush: Callable[[], None],
                 client: Any = None, wall: Callable[[], float] = time.time) -> None:
        self.core = core
        self.spec = spec
        self.flush = flush
        self.wall = wall
        self.engine = PolicyEngine(spec, core.settings.middle_number)
        self.client = client if client is not None else redis_client(spec)
        target = lean_target(spec.redis_url, None, None) if client is None else None
        self.lean = LeanConnection(target) if target is not None else None
        self.counters = RedisCounters(self.client, f"{spec.key_prefix}h:", spec.lease_ms,
                                      lean=self.lean, timeout_s=spec.timeout_s)
        self.blocklists = BlocklistStore(self.client, spec.key_prefix)
        self.webhooks = WebhookClient()
        self.breaker = CircuitBreaker(5, 2.0, name="policy redis")
        self.held: dict[str, None] = {}  # calls whose concurrency lease this worker renews
        self._tasks: set[asyncio.Task[Any]] = set()
        self._background: list[asyncio.Task[Any]] = []
        self._version = ""
        self._last_error = 0.0

    def _count(self, name: str) -> None:
        stats = self.core.stats
        stats[name] = stats.get(name, 0) + 1

    # ---- life --------------------------------------------------------------------------------
    async def start(self) -> None:
        with contextlib.suppress(Exception):  # a Redis down now is retried by the poller
            await self.sync_blocklists()
        loop = asyncio.get_running_loop()
        self._background = [loop.create_task(self._poll_blocklists()),
                            loop.create_task(self._drain_out())]
        if self.spec.has_concurrency:
            self._background.append(loop.create_task(self._refresh_leases()))

    def update(self, spec: PolicySpec) -> None:
        """A reloaded config's rules, for new calls (Redis, prefix and lease stay as started)."""
        spec.key_prefix, spec.redis_url, spec.lease_ms = (
            self.spec.key_prefix, self.spec.redis_url, self.spec.lease_ms)
        blocklists = self.engine.redis_blocklists
        self.spec = spec
        self.engine = PolicyEngine(spec, self.core.settings.middle_number)
        self.engine.redis_blocklists = blocklists

    async def close(self) -> None:
        for task in self._background:
            task.cancel()
        with contextlib.suppress(Exception):
            await self._send_out()
        await self.webhooks.close()
        if self.lean is not None:
            self.lean.close()
        with contextlib.suppress(Exception):
            await self.client.aclose()

    # ---- per call ----------------------------------------------------------------------------
    def submit(self, checks: list[tuple[Any, Any]]) -> None:
        """The calls the core queued: decided at once when no I/O is needed; the counters of
        the others go to Redis in one write for the whole batch (one task, not one a call);
        a tenant's webhook call has a task of its own."""
        wall = self.wall()
        engine, core = self.engine, self.core
        batch: list[tuple[Any, CallFacts, CounterPlan]] = []
        for relay, resolution in checks:
            facts = CallFacts(call_key(relay.request.call_id), relay.x, relay.caller,
                              resolution.callee, resolution.tenant, resolution.binding_id,
                              resolution.out_id, resolution.leg)
            decision = engine.local(facts, wall)
            if decision is None:
                plan = engine.plan(facts)
                hook = engine.webhook_for(facts)
                if hook is not None:
                    self._spawn(self._decide(relay, facts, plan, hook))
                    continue
                if plan is not None:
                    batch.append((relay, facts, plan))
                    continue
                decision = Decision(True, callee=facts.callee)
            core.complete_policy(relay, decision, time.monotonic())
        if batch:
            self._check_batch(batch)

    def _check_batch(self, batch: list[tuple[Any, CallFacts, CounterPlan]]) -> None:
        """The batch's counters in one write, answered from the Redis reader by callback
        (no task, coroutine or future per batch: this is every call's path); through a task
        when the connection is not up yet, or a script must be loaded."""
        if not self.breaker.allow(time.monotonic()):
            for relay, facts, _ in batch:
                self._complete(relay, facts, self._unavailable())
            return  # submit's caller (the transport's flush) sends what they produced
        calls = [(plan, facts) for _, facts, plan in batch]

        def done(replies: list[Any] | BaseException) -> None:
            try:
                self._checked(batch, replies)
            except Exception as exc:  # never into the Redis reader: the calls fail alone
                self._log_error("policy_internal_error", type(exc).__name__)
                for relay, facts, _ in batch:
                    if not relay.final_sent and relay.lookup_deadline is not None:
                        self._complete(relay, facts, self._unavailable())
            self.flush()

        try:
            sent = self.counters.send_checks(calls, int(self.wall() * 1000), done)
        except Exception as exc:  # a write on a closing connection: as a failed round trip
            self._log_error("policy_redis_failed", type(exc).__name__)
            sent = False
        if not sent:
            self._spawn(self._decide_batch(batch))

    def _checked(self, batch: list[tuple[Any, CallFacts, CounterPlan]],
                 replies: list[Any] | BaseException) -> None:
        """The replies of `_check_batch` (or the lost connection's, the time-out's error)."""
        if isinstance(replies, BaseException):
            replies = [replies] * len(batch)
        retry = [i for i, r in enumerate(replies)
                 if isinstance(r, LookupReplyError) and str(r).startswith("NOSCRIPT")]
        if retry:  # Redis restarted or flushed its scripts: those calls through redis-py
            self._spawn(self._decide_batch([batch[i] for i in retry]))
            skip = set(retry)
            batch = [b for i, b in enumerate(batch) if i not in skip]
            replies = [r for i, r in enumerate(replies) if i not in skip]
        decisions = self._verdicts([(facts, plan) for _, facts, plan in batch], replies)
        for (relay, facts, _), decision in zip(batch, decisions, strict=True):
            self._complete(relay, facts, decision)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _decide_batch(self, batch: list[tuple[Any, CallFacts, CounterPlan]]) -> None:
        decisions = await self._counters_many([(facts, plan) for _, facts, plan in batch])
        for (relay, facts, _), decision in zip(batch, decisions, strict=True):
            self._complete(relay, facts, decision)
        self.flush()

    async def _decide(self, relay: Any, facts: CallFacts, plan: CounterPlan | None,
                      hook: WebhookSpec) -> None:
        decision = CONNECT
        if plan is not None:
            decision = await self._counters(facts, plan)
        if decision.connect:
            reply, failure = await self.webhooks.ask(hook, self.engine.webhook_payload(facts))
            if failure:
                self._count("policy_webhook_failures")
                self._log_error("policy_webhook_failed", failure, tenant=facts.tenant)
            verdict = self.engine.webhook_verdict(facts, hook, reply, failure)
            decision = replace(verdict, slot=decision.slot)
        self._complete(relay, facts, decision)
        self.flush()

    def _complete(self, relay: Any, facts: CallFacts, decision: Decision) -> None:
        if decision.connect and decision.callee is None:
            decision = replace(decision, callee=facts.callee)
        if decision.connect and decision.slot:
            # renewed from now on, ringing included (an INVITE may ring longer than a lease);
            # its end (core.policy_out) stops the renewal
            self.held[decision.slot] = None
        self.core.complete_policy(relay, decision, time.monotonic())

    async def _counters(self, facts: CallFacts, plan: CounterPlan) -> Decision:
        return (await self._counters_many([(facts, plan)]))[0]

    async def _counters_many(self, calls: list[tuple[CallFacts, CounterPlan]]
                             ) -> list[Decision]:
        """Each call's verdict from its counters; where Redis failed, the configured
        fallback (and the breaker, as for the store, keeps calls from waiting on a dead
        Redis)."""
        replies: list[Any] = []
        if self.breaker.allow(time.monotonic()):
            try:
                replies = await self.counters.check_many(
                    [(plan, facts) for facts, plan in calls], int(self.wall() * 1000))
            except Exception as exc:  # time-out, connection: the whole batch
                replies = [exc] * len(calls)
        return self._verdicts(calls, replies)

    def _verdicts(self, calls: list[tuple[CallFacts, CounterPlan]], replies: list[Any]
                  ) -> list[Decision]:
        """Each call's decision from its script reply; an exception in its place (or no
        replies at all: the breaker is open) gets the fallback, and feeds the breaker."""
        decisions = []
        failed = ""
        for (facts, plan), reply in zip(calls, replies or [None] * len(calls), strict=True):
            if reply is not None and not isinstance(reply, BaseException):
                decisions.append(self.engine.counter_verdict(facts, plan, reply))
                continue
            if reply is not None:
                failed = type(reply).__name__
            decisions.append(self._unavailable())
        if failed:
            self.breaker.record_failure(time.monotonic(), failed)
            self._log_error("policy_redis_failed", failed)
        elif replies:
            self.breaker.record_success()
        return decisions

    def _unavailable(self) -> Decision:
        self._count("policy_unavailable")
        if self.spec.on_error == "refuse":
            r = self.spec.error_refusal
            return Decision(False, "unavailable", r.code, r.reason, "policy Redis unavailable")
        return CONNECT

    def _log_error(self, event: str, error: str, **fields: Any) -> None:
        now = time.monotonic()
        if now - self._last_error >= 1.0:  # one line a second at most, never one per call
            self._last_error = now
            log.warning(event, error=error, **fields)

    # ---- background --------------------------------------------------------------------------
    async def sync_blocklists(self) -> bool:
        """Reload the Redis blocklists if their version moved; True when it did."""
        version = await self.blocklists.version()
        if version == self._version:
            return False
        self.engine.redis_blocklists = await self.blocklists.load_all()
        self._version = version
        return True

    async def _poll_blocklists(self) -> None:
        while True:
            await asyncio.sleep(self.spec.poll_s)
            try:
                await self.sync_blocklists()
            except Exception as exc:
                self._log_error("policy_blocklist_sync_failed", type(exc).__name__)

    async def _drain_out(self) -> None:
        while True:
            await asyncio.sleep(OUT_DRAIN_S)
            try:
                await self._send_out()
            except Exception as exc:
                self._log_error("policy_release_failed", type(exc).__name__)

    async def _send_out(self) -> None:
        out = self.core.policy_out
        if not out:
            return
        self.core.policy_out = []
        ended = []
        for op, key in out:
            if op == "answered":
                self.held[key] = None
            else:
                self.held.pop(key, None)
                ended.append(key)
        if ended:
            await self.counters.release(ended)

    async def _refresh_leases(self) -> None:
        while True:
            await asyncio.sleep(self.spec.lease_ms / 3000)
            try:
                members = list(self.held)
                for i in range(0, len(members), 500):
                    gone = await self.counters.refresh(members[i:i + 500],
                                                       int(self.wall() * 1000))
                    for key in gone:
                        self.held.pop(key, None)
            except Exception as exc:
                self._log_error("policy_refresh_failed", type(exc).__name__)
