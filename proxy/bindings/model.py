"""Binding model: what a binding is, how a call on X resolves, and the store's errors.

Kept free of I/O so the memory store, the Redis store's client side and the tests share one
definition of the AXB / AXN semantics.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from proxy.numbers import mask_number, normalize_number

AXB = "axb"
AXN = "axn"
KINDS = (AXB, AXN)

# Who may call through an AXB binding: both parties, only A (reaching B), or only B (reaching A).
BOTH = "both"
A_TO_B = "a_to_b"
B_TO_A = "b_to_a"
DIRECTIONS = (BOTH, A_TO_B, B_TO_A)
N_TO_A = "n_to_a"  # AXN: anyone but A calling X reaches A (a call's leg, not a binding's)


class Outcome(enum.Enum):
    """What the proxy does with a call to X."""

    ROUTE = "route"  # forward to Resolution.callee
    NO_BINDING = "no_binding"  # X has no live binding: 404
    NOT_PARTY = "not_party"  # X is bound, the caller is in none of its bindings: 403
    DIRECTION_RESTRICTED = "direction_restricted"  # a party of a one-way binding, wrong way: 403


@dataclass(frozen=True, slots=True)
class Binding:
    """AXB: a and b reach each other through x. AXN: anyone but a reaches a; a reaches b if set.

    The optional fields come from the binding API (or a bindings file): `id` and `tenant` name
    the binding and its owner, `direction` restricts an AXB binding to one way, and the rest
    travel with every call for the layers after routing (call policy, records).
    """

    kind: str
    x: str
    a: str
    b: str | None
    expires_at: float  # unix time
    id: str | None = None
    tenant: str | None = None
    direction: str = BOTH
    max_call_s: int | None = None
    out_id: str | None = None
    order_id: str | None = None
    user_data: str | None = None
    # calls only between two local times: "08:00-22:00" (Asia/Shanghai) or
    # "08:00-22:00 Europe/Berlin"; end before start spans midnight (proxy/policy/windows.py)
    time_window: str | None = None

    def is_live(self, now: float) -> bool:
        return now < self.expires_at

    def parties(self) -> tuple[str, ...]:
        """Numbers that may not be party to another binding on the same X."""
        if self.kind == AXB:
            return (self.a, self.b) if self.b is not None else (self.a,)
        return (self.a,)

    def same_parties(self, other: Binding) -> bool:
        """True when `other` is this binding again (a renewal), possibly with a and b swapped."""
        if self.kind != other.kind or self.x != other.x:
            return False
        if self.kind == AXN:
            return self.a == other.a
        return {self.a, self.b} == {other.a, other.b}


    def meta(self) -> dict[str, str | int]:
        """The optional fields that are set (what a call's Resolution carries besides routing)."""
        out: dict[str, str | int] = {}
        for name in META_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.direction != BOTH:
            out["direction"] = self.direction
        return out


# Optional binding fields a call's Resolution carries (direction aside, which decides routing).
META_FIELDS = ("id", "tenant", "max_call_s", "out_id", "order_id", "user_data", "time_window")


@dataclass(frozen=True, slots=True)
class Resolution:
    """The answer for one call. `expires_at`: do not reuse the answer after this unix time.

    For ROUTE and DIRECTION_RESTRICTED answers, the binding's optional fields come along
    (`binding_id`, `tenant`, `direction`, `max_call_s`, …) for the layers after routing.
    """

    outcome: Outcome
    callee: str | None
    expires_at: float
    binding_id: str | None = None
    tenant: str | None = None
    direction: str = BOTH
    max_call_s: int | None = None
    out_id: str | None = None
    order_id: str | None = None
    user_data: str | None = None
    # which way a routed call goes (call records): a_to_b, b_to_a, n_to_a; '' when unknown
    leg: str = ""
    time_window: str | None = None  # the binding's own (calls outside it are refused)


def call_leg(binding: Binding, callee: str | None) -> str:
    """Which way a call routed to `callee` on `binding` goes: a_to_b, b_to_a or n_to_a."""
    if binding.kind == AXN:
        return N_TO_A if callee == binding.a else A_TO_B
    return B_TO_A if callee == binding.a else A_TO_B


def resolution_for(binding: Binding, outcome: Outcome, callee: str | None) -> Resolution:
    """The answer a call on `binding` gets, carrying the binding's optional fields."""
    return Resolution(outcome, callee, binding.expires_at, binding.id, binding.tenant,
                      binding.direction, binding.max_call_s, binding.out_id, binding.order_id,
                      binding.user_data, call_leg(binding, callee) if callee else "",
                      binding.time_window)


def resolution_from_meta(outcome: Outcome, callee: str | None, expires_at: float,
                         meta: dict[str, object], leg: str = "") -> Resolution:
    """A Resolution from a binding's stored optional fields (the Redis store's form)."""
    return Resolution(outcome, callee, expires_at, meta.get("id"),  # type: ignore[arg-type]
                      meta.get("tenant"), meta.get("direction") or BOTH,  # type: ignore[arg-type]
                      meta.get("max_call_s"), meta.get("out_id"),  # type: ignore[arg-type]
                      meta.get("order_id"), meta.get("user_data"), leg,  # type: ignore[arg-type]
                      meta.get("time_window"))  # type: ignore[arg-type]


class StoreUnavailable(Exception):
    """The binding store cannot answer now (Redis down, timeout, circuit open)."""


class BindingConflict(Exception):
    """The binding would break uniqueness on its X (a party already bound, or AXN/AXB mix)."""


class InvalidBinding(ValueError):
    """A binding with a bad number, kind, or TTL."""


def make_binding(
    kind: str, x: str, a: str, b: str | None, ttl: float | str, now: float | None = None,
    **optional: Any,
) -> Binding:
    """Normalise and validate the parts of a binding; `ttl` seconds from `now`.

    `optional`: the Binding's optional fields (id, tenant, direction, max_call_s, out_id,
    order_id, user_data)."""
    if kind not in KINDS:
        kind = kind.strip().lower() if isinstance(kind, str) else kind
        if kind not in KINDS:
            raise InvalidBinding(f"unknown binding type {kind!r} (expected axb or axn)")
    try:
        ttl_s = float(ttl)
    except (TypeError, ValueError):
        raise InvalidBinding(f"ttl {ttl!r} is not a number") from None
    if not 0 < ttl_s < 1e10:
        raise InvalidBinding(f"ttl {ttl!r} must be a positive number of seconds")
    if now is None:
        now = time.time()
    x = _number("x", x)
    a = _number("a", a)
    b = None if b is None or b == "" else _number("b", b)
    _check_parts(kind, x, a, b)
    if not optional:
        return Binding(kind, x, a, b, now + ttl_s)
    fields = _optional_fields(optional)
    _check_direction(kind, fields.get("direction", BOTH))
    return Binding(kind, x, a, b, now + ttl_s, **fields)


OPTIONAL_FIELDS = ("id", "tenant", "direction", "max_call_s", "out_id", "order_id", "user_data",
                   "time_window")
_TEXT_LIMITS = {"id": 64, "tenant": 64, "out_id": 128, "order_id": 128, "user_data": 1024}


def _optional_fields(optional: dict[str, Any]) -> dict[str, Any]:
    """Optional fields as the Binding keeps them; InvalidBinding names a bad one."""
    out: dict[str, Any] = {}
    for name, value in optional.items():
        if name not in OPTIONAL_FIELDS:
            raise InvalidBinding(f"unknown field {name!r}")
        if value is None or value == "":
            continue
        if name == "max_call_s":
            try:
                seconds = int(value)
            except (TypeError, ValueError):
                raise InvalidBinding(f"max_call_s {value!r} is not a whole number") from None
            if isinstance(value, bool) or seconds <= 0 or str(seconds) != str(value).strip():
                raise InvalidBinding(f"max_call_s {value!r} must be a positive whole number")
            out[name] = seconds
        elif name == "direction":
            out[name] = str(value).strip().lower()
        elif name == "time_window":
            out[name] = check_time_window(str(value))
        else:
            text = str(value)
            if len(text) > _TEXT_LIMITS[name] or any(ord(c) < 32 for c in text):
                raise InvalidBinding(
                    f"{name} must be at most {_TEXT_LIMITS[name]} characters, no control "
                    "characters")
            out[name] = text
    return out


TIME_WINDOW = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-3]):([0-5][0-9])"
                         r"(?: ([A-Za-z][A-Za-z0-9_+-]*(?:/[A-Za-z0-9_+-]+)*))?")
DEFAULT_WINDOW_TZ = "Asia/Shanghai"


def check_time_window(text: str) -> str:
    """A binding's time window, "HH:MM-HH:MM" with an optional IANA zone after a space
    (default Asia/Shanghai); InvalidBinding says what is wrong."""
    text = text.strip()
    m = TIME_WINDOW.fullmatch(text)
    if m is None:
        raise InvalidBinding(f"time_window {text!r} is not HH:MM-HH:MM [zone], e.g. "
                             "'08:00-22:00' or '08:00-22:00 Asia/Shanghai'")
    if m.group(1, 2) == m.group(3, 4):
        raise InvalidBinding(f"time_window {text!r}: start and end are the same time")
    zone = m.group(5)
    if zone is not None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise InvalidBinding(f"time_window {text!r}: unknown time zone {zone!r}") from None
    return text


def validate_binding(binding: Binding) -> Binding:
    """The binding with its numbers normalised; InvalidBinding when it cannot be stored."""
    if binding.kind not in KINDS:
        raise InvalidBinding(f"unknown binding type {binding.kind!r}")
    x = _number("x", binding.x)
    a = _number("a", binding.a)
    b = None if binding.b is None or binding.b == "" else _number("b", binding.b)
    _check_parts(binding.kind, x, a, b)
    _check_direction(binding.kind, binding.direction)
    if (x, a, b) == (binding.x, binding.a, binding.b):
        return binding
    return dataclasses.replace(binding, x=x, a=a, b=b)


def _check_direction(kind: str, direction: str) -> None:
    if direction not in DIRECTIONS:
        raise InvalidBinding(f"direction {direction!r} is not one of {', '.join(DIRECTIONS)}")
    if kind == AXN and direction != BOTH:
        raise InvalidBinding("an axn binding has no direction (only 'both')")


def _check_parts(kind: str, x: str, a: str, b: str | None) -> None:
    if kind == AXB and b is None:
        raise InvalidBinding("an axb binding needs b")
    if a == b:
        raise InvalidBinding("a and b are the same number")
    if x in (a, b):
        raise InvalidBinding("x cannot be bound to itself")


def _number(name: str, text: str) -> str:
    # Fast path for what files and APIs usually carry: already national mobile or 700 digits.
    if (
        isinstance(text, str)
        and text.isascii()
        and text.isdigit()
        and ((len(text) == 11 and text[0] == "1") or (len(text) == 15 and text.startswith("700")))
    ):
        return text
    number = normalize_number(text) if isinstance(text, str) else None
    if number is None:
        shown = mask_number(text) if isinstance(text, str) else type(text).__name__
        raise InvalidBinding(f"{name} {shown!r} is not a phone number")
    return number


def resolve_among(bindings: Iterable[Binding], caller: str, now: float) -> Resolution:
    """Resolve a call from `caller` to X given the bindings on X (expired ones are ignored).

    The reference semantics; the stores implement the same rules with indexed lookups.
    """
    live = False
    for binding in bindings:
        if not binding.is_live(now):
            continue
        live = True
        if binding.kind == AXN:
            if caller != binding.a:
                return resolution_for(binding, Outcome.ROUTE, binding.a)
            if binding.b is not None:
                return resolution_for(binding, Outcome.ROUTE, binding.b)
            return resolution_for(binding, Outcome.NOT_PARTY, None)
        if caller == binding.a:
            if binding.direction == B_TO_A:
                return resolution_for(binding, Outcome.DIRECTION_RESTRICTED, None)
            return resolution_for(binding, Outcome.ROUTE, binding.b)
        if caller == binding.b:
            if binding.direction == A_TO_B:
                return resolution_for(binding, Outcome.DIRECTION_RESTRICTED, None)
            return resolution_for(binding, Outcome.ROUTE, binding.a)
    return Resolution(Outcome.NOT_PARTY if live else Outcome.NO_BINDING, None, now)


def check_conflict(existing: Iterable[Binding], new: Binding, now: float) -> list[Binding]:
    """Live bindings on new.x that `new` replaces (its own renewal); BindingConflict otherwise."""
    replaced: list[Binding] = []
    parties = set(new.parties())
    for old in existing:
        if not old.is_live(now):
            continue
        if old.same_parties(new):
            replaced.append(old)
        elif new.kind == AXN or old.kind == AXN:
            raise BindingConflict(f"x {new.x} already carries an {old.kind} binding")
        elif parties.intersection(old.parties()):
            raise BindingConflict(f"a party is already bound on x {new.x}")
    return replaced
