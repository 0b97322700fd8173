"""Tenants' number pools from the config: membership, area tags, the numbers of each area."""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

NO_AREA = "-"  # the tag of pool entries without an area


@dataclass(frozen=True, slots=True)
class Span:
    first: int
    last: int
    width: int
    tenant: str
    area: str  # tag: the area code, or NO_AREA


class Pools:
    """Which tenant and area own a middle number; each tenant's areas and their numbers."""

    def __init__(self, cfg: Any) -> None:
        spans: list[Span] = []
        self.areas: dict[str, list[str]] = {}  # tenant -> area tags in config order
        for tenant in cfg.tenants:
            tags = self.areas.setdefault(tenant.id, [])
            for pool in tenant.pools:
                tag = pool.area or NO_AREA
                if tag not in tags:
                    tags.append(tag)
                if pool.range is not None:
                    first, _, last = pool.range.replace(" ", "").partition("-")
                    spans.append(Span(int(first), int(last), len(first), tenant.id, tag))
                for number in pool.numbers or ():
                    spans.append(Span(int(number), int(number), len(number), tenant.id, tag))
        spans.sort(key=lambda s: s.first)
        self._spans = spans
        self._starts = [s.first for s in spans]

    def owner(self, x: str) -> tuple[str, str] | None:
        """(tenant, area tag) of a pool number, or None when no pool holds it."""
        if not x.isdigit():
            return None
        value = int(x)
        i = bisect.bisect_right(self._starts, value) - 1
        if i < 0:
            return None
        span = self._spans[i]
        if value > span.last or len(x) != span.width:
            return None
        return span.tenant, span.area

    def numbers(self, tenant: str, area: str) -> Iterator[str]:
        """Every number of a tenant's pool entries with this area tag."""
        for span in self._spans:
            if span.tenant == tenant and span.area == area:
                for value in range(span.first, span.last + 1):
                    yield str(value).zfill(span.width)

    def digest(self, tenant: str, area: str) -> str:
        """Identifies the configured numbers of (tenant, area): the sets are rebuilt on change."""
        h = hashlib.sha256()
        for span in self._spans:
            if span.tenant == tenant and span.area == area:
                h.update(f"{span.first}-{span.last}/{span.width};".encode())
        return h.hexdigest()[:32]

    def search_order(self, tenant: str, area: str | None, strict: bool) -> list[str]:
        """Area tags to allocate from, in order: the wanted area first (alone when strict)."""
        tags = self.areas.get(tenant, [])
        if area is None:
            return list(tags)
        if area not in tags:
            return [] if strict else list(tags)
        return [area] if strict else [area, *(t for t in tags if t != area)]
