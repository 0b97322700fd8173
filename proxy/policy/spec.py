"""The policy configuration compiled for the hot path: plain objects, no pydantic lookups."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.policy.blocklist import Blocklist, parse_entry
from proxy.policy.windows import TimeWindow


@dataclass(frozen=True)
class Refusal:
    code: int
    reason: str


@dataclass(frozen=True)
class RateRule:
    name: str
    per: str  # caller | callee | x | tenant
    max_calls: int
    window_ms: int
    refusal: Refusal | None  # None: the scope's default refusal


@dataclass(frozen=True)
class ConcurrencyRule:
    name: str
    per: str  # x | tenant
    max_calls: int
    refusal: Refusal | None


@dataclass(frozen=True)
class BulkRule:
    max_distinct: int
    window_ms: int
    refusal: Refusal | None


@dataclass(frozen=True)
class WebhookSpec:
    url: str
    timeout_s: float
    fallback: str  # connect | refuse
    secret: str | None
    max_connections: int
    failure_threshold: int
    open_s: float
    refusal: Refusal | None


@dataclass
class Scope:
    """The rules of the global policy or of one tenant."""

    rates: tuple[RateRule, ...] = ()
    concurrency: tuple[ConcurrencyRule, ...] = ()
    blocklist: Blocklist = field(default_factory=Blocklist)
    block_refusal: Refusal | None = None
    time_window: TimeWindow | None = None
    window_refusal: Refusal | None = None
    bulk: BulkRule | None = None
    webhook: WebhookSpec | None = None
    refusal: Refusal | None = None  # this scope's default refusal


@dataclass
class PolicySpec:
    """Everything the engine and the shell need."""

    glob: Scope
    tenants: dict[str, Scope]
    key_prefix: str
    redis_url: str
    timeout_s: float = 0.2
    lease_ms: int = 120_000
    poll_s: float = 0.5
    on_error: str = "connect"
    error_refusal: Refusal = Refusal(503, "Call Policy Unavailable")

    @property
    def webhooks(self) -> dict[str, WebhookSpec]:
        return {t: s.webhook for t, s in self.tenants.items() if s.webhook is not None}

    @property
    def has_concurrency(self) -> bool:
        return bool(self.glob.concurrency) or any(s.concurrency for s in self.tenants.values())


def _refusal(rule: Any) -> Refusal | None:
    if rule is None or (rule.code is None and rule.reason is None):
        return None
    # a rule that sets only one of the two keeps the other from the default refusal
    return Refusal(rule.code or 0, rule.reason or "")


def _scope(p: Any) -> Scope:
    b = p.blocklist
    entries = [*(parse_entry("caller", n) for n in b.callers),
               *(parse_entry("callee", n) for n in b.callees),
               *(parse_entry("x", n) for n in b.x), *(f"prefix:{n}" for n in b.prefixes)]
    tw = p.time_window
    bulk = p.bulk
    hook = getattr(p, "webhook", None)
    refusal = getattr(p, "refusal", None)
    return Scope(
        rates=tuple(RateRule(r.name, r.per, r.max_calls, r.window_s * 1000, _refusal(r))
                    for r in p.rate_limits),
        concurrency=tuple(ConcurrencyRule(r.name, r.per, r.max_calls, _refusal(r))
                          for r in p.concurrency),
        blocklist=Blocklist.of(entries),
        block_refusal=_refusal(b),
        time_window=TimeWindow.parse(tw.start, tw.end, tw.tz) if tw is not None else None,
        window_refusal=_refusal(tw),
        bulk=(BulkRule(bulk.max_distinct_callees, bulk.window_s * 1000, _refusal(bulk))
              if bulk is not None else None),
        webhook=(WebhookSpec(hook.url, hook.timeout_ms / 1000, hook.fallback, hook.secret,
                             hook.max_connections, hook.circuit_breaker.failure_threshold,
                             hook.circuit_breaker.open_s, _refusal(hook))
                 if hook is not None else None),
        refusal=Refusal(refusal.code, refusal.reason) if refusal is not None else None,
    )


def policy_key_prefix(cfg: Any) -> str:
    return cfg.policy.key_prefix or f"{cfg.store.key_prefix}policy:"


def policy_redis_url(cfg: Any) -> str:
    return str(cfg.policy.redis_url or cfg.store.redis_url)


def compile_policy(cfg: Any) -> PolicySpec | None:
    """The policy of a Config, or None when it is off (the core then skips the step)."""
    if not cfg.policy_enabled:
        return None
    p = cfg.policy
    tenants = {t.id: _scope(t.policy) for t in cfg.tenants if t.policy is not None}
    return PolicySpec(
        glob=_scope(p), tenants=tenants,
        key_prefix=policy_key_prefix(cfg), redis_url=policy_redis_url(cfg),
        timeout_s=p.timeout_ms / 1000, lease_ms=p.concurrency_lease_s * 1000,
        poll_s=p.blocklist_poll_ms / 1000, on_error=p.on_error,
        error_refusal=Refusal(p.error_refusal.code, p.error_refusal.reason))
