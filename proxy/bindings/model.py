"""Binding model: what a binding is, how a call on X resolves, and the store's errors.

Kept free of I/O so the memory store, the Redis store's client side and the tests share one
definition of the AXB / AXN semantics.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.numbers import mask_number, normalize_number

AXB = "axb"
AXN = "axn"
KINDS = (AXB, AXN)


class Outcome(enum.Enum):
    """What the proxy does with a call to X."""

    ROUTE = "route"  # forward to Resolution.callee
    NO_BINDING = "no_binding"  # X has no live binding: 404
    NOT_PARTY = "not_party"  # X is bound, the caller is in none of its bindings: 403


@dataclass(frozen=True, slots=True)
class Binding:
    """AXB: a and b reach each other through x. AXN: anyone but a reaches a; a reaches b if set."""

    kind: str
    x: str
    a: str
    b: str | None
    expires_at: float  # unix time

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


@dataclass(frozen=True, slots=True)
class Resolution:
    """The answer for one call. `expires_at`: do not reuse the answer after this unix time."""

    outcome: Outcome
    callee: str | None
    expires_at: float


class StoreUnavailable(Exception):
    """The binding store cannot answer now (Redis down, timeout, circuit open)."""


class BindingConflict(Exception):
    """The binding would break uniqueness on its X (a party already bound, or AXN/AXB mix)."""


class InvalidBinding(ValueError):
    """A binding with a bad number, kind, or TTL."""


def make_binding(
    kind: str, x: str, a: str, b: str | None, ttl: float | str, now: float | None = None
) -> Binding:
    """Normalise and validate the parts of a binding; `ttl` seconds from `now`."""
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
    return Binding(kind, x, a, b, now + ttl_s)


def validate_binding(binding: Binding) -> Binding:
    """The binding with its numbers normalised; InvalidBinding when it cannot be stored."""
    if binding.kind not in KINDS:
        raise InvalidBinding(f"unknown binding type {binding.kind!r}")
    x = _number("x", binding.x)
    a = _number("a", binding.a)
    b = None if binding.b is None or binding.b == "" else _number("b", binding.b)
    _check_parts(binding.kind, x, a, b)
    if (x, a, b) == (binding.x, binding.a, binding.b):
        return binding
    return Binding(binding.kind, x, a, b, binding.expires_at)


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
                return Resolution(Outcome.ROUTE, binding.a, binding.expires_at)
            if binding.b is not None:
                return Resolution(Outcome.ROUTE, binding.b, binding.expires_at)
            return Resolution(Outcome.NOT_PARTY, None, binding.expires_at)
        if caller == binding.a:
            return Resolution(Outcome.ROUTE, binding.b, binding.expires_at)
        if caller == binding.b:
            return Resolution(Outcome.ROUTE, binding.a, binding.expires_at)
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
