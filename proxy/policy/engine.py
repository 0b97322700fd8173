"""The policy decision, sans-IO: call facts and what the shell fetched in, a Decision out.

The shell drives three steps per call, each optional:
1. `local(facts, wall)`: blocklists (YAML and the Redis copy the shell keeps in sync) and time
   windows; no I/O.
2. `plan(facts)` → the counters one Redis script checks and updates atomically (rate limits,
   concurrency, bulk calling), then `counter_verdict(plan, reply)`.
3. the tenant's webhook (`webhook_for`), then `webhook_verdict(reply)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from proxy.numbers import normalize_number
from proxy.policy.blocklist import Blocklist
from proxy.policy.spec import PolicySpec, Refusal, Scope, WebhookSpec
from proxy.policy.windows import TimeWindow

MAX_CALL_S_LIMIT = 86_400  # a webhook's max_call_s above a day is a mistake: ignored


class CallFacts(NamedTuple):
    """What the policy knows of a call once its binding is found."""

    call_key: str  # the call's id in Redis (records' call_key of the caller's Call-ID)
    x: str
    caller: str
    callee: str
    tenant: str | None = None
    binding_id: str | None = None
    out_id: str | None = None
    leg: str = ""  # a_to_b | b_to_a | …


@dataclass(frozen=True, slots=True)
class Decision:
    """connect, or refuse with the rule's name, SIP status and reason."""

    connect: bool
    rule: str = ""
    code: int = 0
    reason: str = ""
    detail: str = ""  # for the log line: which list matched, which limit
    callee: str | None = None  # a webhook's override
    max_call_s: int | None = None  # a webhook's cap on this call's duration
    slot: str | None = None  # concurrency held: released when the call ends
    flag: str = ""  # bulk_caller: the pattern the regulator watches for


CONNECT = Decision(True)


class Counter(NamedTuple):
    kind: str  # rate | conc | bulk
    rule: str
    key: str
    limit: int
    window_ms: int
    refusal: Refusal | None
    scope: str  # "" global, else the tenant


class CounterPlan(NamedTuple):
    """The counters one script checks and, when all pass, updates."""

    rates: tuple[Counter, ...]
    concurrency: tuple[Counter, ...]
    bulk: Counter | None
    callee: str


class PolicyEngine:
    """Decisions for one worker. `redis_blocklists` is replaced by the shell's sync task."""

    def __init__(self, spec: PolicySpec, middle_number: Callable[[str], bool]) -> None:
        self.spec = spec
        self.middle_number = middle_number
        self.redis_blocklists: dict[str, Blocklist] = {}  # "" global, else tenant id
        self._counters: dict[str, tuple[list, list, Any]] = {}  # owner → compiled counters

    def _tenant(self, facts: CallFacts) -> Scope | None:
        return self.spec.tenants.get(facts.tenant) if facts.tenant else None

    def default_refusal(self, facts: CallFacts) -> Refusal:
        t = self._tenant(facts)
        if t is not None and t.refusal is not None:
            return t.refusal
        g = self.spec.glob.refusal
        return g if g is not None else Refusal(403, "Call Policy")

    def refuse(self, facts: CallFacts, rule: str, refusal: Refusal | None, detail: str = "",
               flag: str = "") -> Decision:
        base = self.default_refusal(facts)
        code = refusal.code if refusal is not None and refusal.code else base.code
        reason = refusal.reason if refusal is not None and refusal.reason else base.reason
        return Decision(False, rule, code, reason, detail, flag=flag)

    # ---- step 1: no I/O ----------------------------------------------------------------------
    def local(self, facts: CallFacts, wall: float) -> Decision | None:
        """A refusal by blocklist or time window, or None (go on)."""
        g, t = self.spec.glob, self._tenant(facts)
        lists: list[tuple[Blocklist | None, Refusal | None]] = [(g.blocklist, g.block_refusal)]
        if t is not None:
            lists.append((t.blocklist, t.block_refusal))
        redis_lists = self.redis_blocklists
        if redis_lists:
            lists.append((redis_lists.get(""), None))
            if facts.tenant:
                lists.append((redis_lists.get(facts.tenant), None))
        for blocklist, refusal in lists:
            if blocklist:
                kind = blocklist.match(facts.caller, facts.callee, facts.x)
                if kind is not None:
                    return self.refuse(facts, "blocklist", refusal, detail=kind)
        window: TimeWindow | None
        if t is not None and t.time_window is not None:
            window, refusal = t.time_window, t.window_refusal
        else:
            window, refusal = g.time_window, g.window_refusal
        if window is not None and not window.allows(wall):
            return self.refuse(facts, "time_window", refusal)
        return None

    # ---- step 2: the counters in Redis -------------------------------------------------------
    def _compile_counters(self, owner: str, scope: Scope) -> tuple[list, list, Any]:
        """A scope's counters with their key prefixes made once: (per, key base, fields)."""
        p = self.spec.key_prefix
        # "l:", the rate limits' lists ("r:" held sorted sets before 2026-12-03: other keys,
        # so an older instance's counters never meet a newer one's type)
        rates = [(r.per, f"{p}l:{owner}:{r.name}:", r.name, r.max_calls, r.window_ms,
                  r.refusal) for r in scope.rates]
        conc = [(c.per, f"{p}c:{owner}:{c.name}:", c.name, c.max_calls, 0, c.refusal)
                for c in scope.concurrency]
        b = scope.bulk
        bulk = (f"{p}b:{owner}:", b.max_distinct, b.window_ms, b.refusal) if b else None
        return rates, conc, bulk

    def plan(self, facts: CallFacts) -> CounterPlan | None:
        """The counters this call touches, or None when no rule applies."""
        subjects = {"caller": facts.caller, "callee": facts.callee, "x": facts.x,
                    "tenant": facts.tenant or ""}
        rates: list[Counter] = []
        conc: list[Counter] = []
        bulk = None
        owners = [""]
        if facts.tenant and facts.tenant in self.spec.tenants:
            owners.append(facts.tenant)
        for owner in owners:
            compiled = self._counters.get(owner)
            if compiled is None:
                scope = self.spec.tenants[owner] if owner else self.spec.glob
                compiled = self._counters[owner] = self._compile_counters(owner, scope)
            scope_rates, scope_conc, scope_bulk = compiled
            for per, base, name, limit, window, refusal in scope_rates:
                subject = subjects[per]
                if subject:
                    rates.append(Counter("rate", name, base + subject, limit, window, refusal,
                                         owner))
            for per, base, name, limit, window, refusal in scope_conc:
                subject = subjects[per]
                if subject:
                    conc.append(Counter("conc", name, base + subject, limit, window, refusal,
                                        owner))
            if scope_bulk is not None:  # the tenant's detector replaces the global one
                base, limit, window, refusal = scope_bulk
                bulk = Counter("bulk", "bulk", base + facts.caller, limit, window, refusal,
                               owner)
        if not (rates or conc or bulk):
            return None
        return CounterPlan(tuple(rates), tuple(conc), bulk, facts.callee)

    def hold_key(self, call_key: str) -> str:
        """Where the concurrency counters a call holds are listed (for its release)."""
        return f"{self.spec.key_prefix}h:{call_key}"

    def counter_verdict(self, facts: CallFacts, plan: CounterPlan, reply: Any) -> Decision:
        """The script's answer: [b'ok', 0] or [b'rate'|b'conc'|b'bulk', index (1-based)]."""
        kind = _text(reply[0])
        if kind == "ok":  # made here, not replace()d: this is every call's path
            return Decision(True, callee=facts.callee,
                            slot=facts.call_key if plan.concurrency else None)
        index = int(reply[1]) - 1
        if kind == "rate":
            c = plan.rates[index]
            return self.refuse(facts, c.rule, c.refusal, detail=f"{c.limit} calls per "
                               f"{c.window_ms // 1000} s")
        if kind == "conc":
            c = plan.concurrency[index]
            return self.refuse(facts, c.rule, c.refusal, detail=f"{c.limit} calls at once")
        b = plan.bulk
        assert b is not None
        return self.refuse(facts, "bulk", b.refusal, flag="bulk_caller",
                           detail=f"over {b.limit} callees in {b.window_ms // 1000} s")

    # ---- step 3: the tenant's webhook --------------------------------------------------------
    def webhook_for(self, facts: CallFacts) -> WebhookSpec | None:
        t = self._tenant(facts)
        return t.webhook if t is not None else None

    def webhook_payload(self, facts: CallFacts) -> dict[str, Any]:
        return {"x": facts.x, "caller": facts.caller, "callee": facts.callee,
                "binding_id": facts.binding_id, "out_id": facts.out_id,
                "tenant": facts.tenant, "direction": facts.leg, "call_id": facts.call_key}

    def webhook_verdict(self, facts: CallFacts, hook: WebhookSpec, reply: Any,
                        failure: str = "") -> Decision:
        """Obey the reply; a failure (time-out, endpoint down, bad reply) gets the fallback."""
        if not failure:
            decision, failure = self._obey(facts, hook, reply)
            if decision is not None:
                return decision
        if hook.fallback == "connect":
            return replace(CONNECT, detail=f"webhook fallback: {failure}")
        return self.refuse(facts, "webhook", hook.refusal, detail=f"fallback: {failure}")

    def _obey(self, facts: CallFacts, hook: WebhookSpec, reply: Any
              ) -> tuple[Decision | None, str]:
        if not isinstance(reply, dict):
            return None, "reply is not a JSON object"
        action = reply.get("action")
        if action == "refuse":
            code = reply.get("code")
            reason = reply.get("reason")
            refusal = Refusal(code if isinstance(code, int) and not isinstance(code, bool)
                              and 400 <= code <= 699 else 0,
                              reason if isinstance(reason, str) and _safe_reason(reason)
                              else "")
            return self.refuse(facts, "webhook", refusal if refusal.code or refusal.reason
                               else hook.refusal, detail="tenant refused"), ""
        if action != "connect":
            return None, f"action is {action!r}, not connect or refuse"
        decision = CONNECT
        callee = reply.get("callee")
        if callee is not None:
            number = normalize_number(callee) if isinstance(callee, str) else None
            if number is None or self.middle_number(number) or not number.isdigit():
                return None, "callee is not a phone number outside the middle-number range"
            decision = replace(decision, callee=number)
        limit = reply.get("max_call_s")
        if limit is not None:
            if (not isinstance(limit, int) or isinstance(limit, bool)
                    or not 1 <= limit <= MAX_CALL_S_LIMIT):
                return None, f"max_call_s must be 1-{MAX_CALL_S_LIMIT}"
            decision = replace(decision, max_call_s=limit)
        return decision, ""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _safe_reason(value: Any) -> bool:
    """A reason phrase a tenant may put in our status line and Reason header."""
    return (isinstance(value, str) and 0 < len(value) <= 64 and value.isascii()
            and value.isprintable() and '"' not in value and "\\" not in value)
