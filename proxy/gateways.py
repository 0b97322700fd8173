"""The carrier leg's gateways: groups chosen by callee prefix, the order a call tries them in,
and what the proxy knows of each one's health (OPTIONS probing, 503 Retry-After, transport
failures). Sans-IO: the core asks for a call's candidates and reports what it saw.

Within a group the lowest priority comes first; among equal priorities the first pick is
weighted (smooth weighted round robin, as nginx does it: deterministic, and every gateway gets
its share in every window of sum-of-weights calls); the rest of the group follows as failover.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final


@dataclass(eq=False)
class Gateway:
    """One gateway address and its health."""

    uri: str  # as configured: the metric label and log field
    host: str
    port: int
    transport: str
    priority: int = 1
    weight: int = 1
    probed: bool = False  # OPTIONS probes decide `up`
    up: bool = True  # the probes' verdict (always True when not probed)
    down_until: float = 0.0  # monotonic: passive marks (503 Retry-After, transport failure)
    fails: int = 0  # consecutive failed probes
    oks: int = 0  # consecutive answered probes
    current: int = 0  # smooth weighted round robin state
    # a gateway given by name: the addresses DNS gave for it (RFC 3263 order), tried in turn;
    # empty for an IP address (host is the address) and for a name not resolved (yet)
    by_name: bool = False
    explicit_port: bool = True  # the URI names a port (no SRV look-up; it goes in the R-URI)
    addresses: list[tuple[str, int]] = field(default_factory=list)

    def available(self, now: float) -> bool:
        return self.up and self.down_until <= now

    def targets(self) -> list[tuple[str, int]]:
        """Where to send: the resolved addresses of a name, else host:port."""
        if self.by_name:
            return self.addresses
        return [(self.host, self.port)]


class GatewayGroup:
    """Gateways of one group, by priority level."""

    def __init__(self, name: str, gateways: Iterable[Gateway]) -> None:
        self.name = name
        self.gateways = list(gateways)
        levels: dict[int, list[Gateway]] = {}
        for gw in self.gateways:
            levels.setdefault(gw.priority, []).append(gw)
        self.levels = [levels[p] for p in sorted(levels)]

    def candidates(self, now: float) -> list[Gateway]:
        """The gateways a new call tries, in order; only those available now (empty: all
        down)."""
        out: list[Gateway] = []
        for level in self.levels:
            live = [gw for gw in level if gw.available(now)]
            if not live:
                continue
            if len(live) > 1:
                first = _smooth_pick(live)
                rest = sorted((gw for gw in live if gw is not first),
                              key=lambda g: -g.weight)
                out.append(first)
                out.extend(rest)
            else:
                out.append(live[0])
        return out


def _smooth_pick(live: list[Gateway]) -> Gateway:
    total = 0
    best = live[0]
    for gw in live:
        gw.current += gw.weight
        total += gw.weight
        if gw.current > best.current:
            best = gw
    best.current -= total
    return best


REFUSED: Final = "refused"


@dataclass
class Router:
    """Callee prefix → group (longest prefix wins); no match → the default group."""

    default: GatewayGroup
    groups: dict[str, GatewayGroup] = field(default_factory=dict)
    routes: dict[str, str] = field(default_factory=dict)  # prefix → group name or REFUSED
    _lengths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self._lengths = tuple(sorted({len(p) for p in self.routes}, reverse=True))

    def group_for(self, callee: str) -> GatewayGroup | None:
        """The callee's group; None when its prefix is refused."""
        routes = self.routes
        for length in self._lengths:
            target = routes.get(callee[:length])
            if target is not None:
                return None if target == REFUSED else self.groups[target]
        return self.default

    def addresses(self) -> set[str]:
        """Every IP the gateways have now (the far end of the trunk)."""
        return {host for gw in self.all_gateways() for host, _port in gw.targets()}

    def all_gateways(self) -> list[Gateway]:
        seen: dict[int, Gateway] = {}
        for group in (self.default, *self.groups.values()):
            for gw in group.gateways:
                seen.setdefault(id(gw), gw)
        return list(seen.values())


@dataclass
class ProbeSettings:
    enabled: bool | None = None  # None: auto (gateways of groups with more than one)
    interval: float = 10.0
    down_after: int = 3
    up_after: int = 2
    alive_codes: frozenset[int] = frozenset({200})


def probed_gateways(router: Router, settings: ProbeSettings) -> list[Gateway]:
    """Which gateways are probed: all (enabled), none (disabled), or under `auto` those of a
    group with more than one gateway (where failover has somewhere to go)."""
    if settings.enabled is False:
        return []
    if settings.enabled:
        return router.all_gateways()
    out: dict[int, Gateway] = {}
    for group in (router.default, *router.groups.values()):
        if len(group.gateways) > 1:
            for gw in group.gateways:
                out.setdefault(id(gw), gw)
    return list(out.values())


def record_probe(gw: Gateway, alive: bool, settings: ProbeSettings) -> bool | None:
    """Count one probe outcome; returns the new `up` when it changed, else None."""
    if alive:
        gw.fails = 0
        gw.oks += 1
        if not gw.up and gw.oks >= settings.up_after:
            gw.up = True
            return True
    else:
        gw.oks = 0
        gw.fails += 1
        if gw.up and gw.fails >= settings.down_after:
            gw.up = False
            return False
    return None
