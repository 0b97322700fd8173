"""Blocklists: numbers refused as caller, as callee, as X, or as any party by prefix.

Entries are `kind:value` strings (`caller:13800000001`, `prefix:170`), the form they take in
YAML-compiled sets, in Redis sets and in the API. A `Blocklist` is one scope (global or one
tenant); matching is a few set lookups and a prefix walk over at most 20 digits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from proxy.numbers import normalize_number

KINDS = ("caller", "callee", "x", "prefix")


class BadEntry(ValueError):
    """A blocklist entry that is not `kind` + a number (or digits, for a prefix)."""


def parse_entry(kind: str, value: str) -> str:
    """`kind:value` in canonical form (numbers normalised); BadEntry naming the problem."""
    if kind not in KINDS:
        raise BadEntry(f"kind must be one of {', '.join(KINDS)} (got {kind!r})")
    if kind == "prefix":
        if not (value.isascii() and value.isdigit() and 1 <= len(value) <= 20):
            raise BadEntry(f"a prefix is 1-20 digits of a national-format number ({value!r})")
        return f"prefix:{value}"
    number = normalize_number(value)
    if number is None:
        raise BadEntry(f"not a phone number ({value!r})")
    return f"{kind}:{number}"


@dataclass
class Blocklist:
    """One scope's entries, split for matching."""

    callers: set[str] = field(default_factory=set)
    callees: set[str] = field(default_factory=set)
    x: set[str] = field(default_factory=set)
    prefixes: set[str] = field(default_factory=set)
    _lengths: tuple[int, ...] = ()  # the lengths of the prefixes, shortest first

    @classmethod
    def of(cls, entries: Iterable[str]) -> Blocklist:
        out = cls()
        for entry in entries:
            out.add(entry)
        return out

    def add(self, entry: str) -> None:
        kind, _, value = entry.partition(":")
        if kind == "caller":
            self.callers.add(value)
        elif kind == "callee":
            self.callees.add(value)
        elif kind == "x":
            self.x.add(value)
        elif kind == "prefix":
            self.prefixes.add(value)
            self._lengths = tuple(sorted({*self._lengths, len(value)}))

    def __bool__(self) -> bool:
        return bool(self.callers or self.callees or self.x or self.prefixes)

    def entries(self) -> list[str]:
        return sorted([*(f"caller:{n}" for n in self.callers),
                       *(f"callee:{n}" for n in self.callees), *(f"x:{n}" for n in self.x),
                       *(f"prefix:{p}" for p in self.prefixes)])

    def match(self, caller: str, callee: str, x: str) -> str | None:
        """Which list refuses this call (caller, callee, x, prefix), or None."""
        if caller in self.callers:
            return "caller"
        if callee in self.callees:
            return "callee"
        if x in self.x:
            return "x"
        if self.prefixes:
            prefixes = self.prefixes
            for n in self._lengths:
                if caller[:n] in prefixes or callee[:n] in prefixes or x[:n] in prefixes:
                    return "prefix"
        return None
