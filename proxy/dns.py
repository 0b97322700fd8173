"""Gateways given by name: RFC 3263 look-ups (NAPTR, SRV, A/AAAA) with dnspython's asyncio
resolver, kept fresh on TTL expiry. The core only ever sees the addresses (`Gateway.addresses`,
in the order to try them); this module is the shell's.

- A name with a port (`sip:gw.example:5070`): A and AAAA, that port.
- A name without one: NAPTR (services SIP+D2U / SIP+D2T for the transports we speak, by
  order then preference) → SRV; no NAPTR: SRV `_sip._udp` / `_sip._tcp` for the URI's
  transport; no SRV either: A and AAAA on port 5060 (RFC 3263 §4.1, §4.2). SRV targets are
  taken by priority, weight-ordered within one (a deterministic reading of RFC 2782's draw).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver
import structlog

from proxy.gateways import Gateway

log = structlog.get_logger("sip700.dns")

MIN_TTL = 5.0  # never re-resolve more often than this
SYSTEM_TTL = 60.0  # the system's resolver (/etc/hosts, nsswitch) tells no TTL
MAX_TTL = 3600.0
RETRY_S = 30.0  # after a failed refresh (old addresses kept meanwhile)
_NAPTR_SERVICE = {"udp": "SIP+D2U", "tcp": "SIP+D2T", "tls": "SIPS+D2T"}
_SRV_PREFIX = {"udp": "_sip._udp.", "tcp": "_sip._tcp.", "tls": "_sips._tcp."}


class DnsError(Exception):
    """A gateway name gave no usable address."""


@dataclass
class Answer:
    addresses: list[tuple[str, int]]
    ttl: float


def is_name(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def make_resolver(servers: Iterable[str] = (), timeout: float = 2.0
                  ) -> dns.asyncresolver.Resolver:
    """The given `host[:port]` servers (one port for all), or those of /etc/resolv.conf.

    With no servers configured, names with a port (and the last step of RFC 3263) go to the
    system's resolver instead (getaddrinfo: /etc/hosts, so `localhost` works)."""
    servers = list(servers)
    if not servers:
        try:
            resolver = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.system_hosts = True  # type: ignore[attr-defined]
    else:
        resolver = dns.asyncresolver.Resolver(configure=False)
        hosts, ports = [], set()
        for entry in servers:
            host, _, port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
            hosts.append(host or entry)
            ports.add(int(port) if port else 53)
        resolver.nameservers = hosts
        resolver.port = ports.pop() if len(ports) == 1 else 53
    resolver.lifetime = timeout
    resolver.timeout = timeout
    return resolver


async def resolve_gateway(resolver: dns.asyncresolver.Resolver, gw: Gateway) -> Answer:
    """The addresses of a gateway name, in the order to try them. Raises DnsError."""
    if gw.explicit_port:
        return await _hosts(resolver, gw.host, gw.port)
    srv_names: list[str] = []
    ttl = MAX_TTL
    try:
        naptr = await resolver.resolve(gw.host, "NAPTR")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers):
        naptr = None
    except dns.exception.Timeout:
        log.warning("dns_timeout", query=f"NAPTR {gw.host}")
        naptr = None
    if naptr is not None:
        ttl = min(ttl, float(naptr.rrset.ttl))
        wanted = _NAPTR_SERVICE.get(gw.transport)
        records = sorted(naptr, key=lambda r: (r.order, r.preference))
        srv_names = [r.replacement.to_text(omit_final_dot=True) for r in records
                     if r.flags.lower() == b"s" and r.service.upper().decode() == wanted]
    if not srv_names:
        srv_names = [_SRV_PREFIX.get(gw.transport, "_sip._udp.") + gw.host]
    for name in srv_names:
        try:
            srv = await resolver.resolve(name, "SRV")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers):
            continue
        except dns.exception.Timeout:
            log.warning("dns_timeout", query=f"SRV {name}")
            continue
        ttl = min(ttl, float(srv.rrset.ttl))
        addresses: list[tuple[str, int]] = []
        for record in sorted(srv, key=lambda r: (r.priority, -r.weight)):
            target = record.target.to_text(omit_final_dot=True)
            if target in ("", "."):
                continue
            try:
                answer = await _hosts(resolver, target, record.port)
            except DnsError:
                continue  # one dead target: the others still serve
            ttl = min(ttl, answer.ttl)
            addresses.extend(answer.addresses)
        if addresses:
            return Answer(addresses, ttl)
    answer = await _hosts(resolver, gw.host, 5060)
    return Answer(answer.addresses, min(ttl, answer.ttl))


async def _hosts(resolver: dns.asyncresolver.Resolver, name: str, port: int) -> Answer:
    if getattr(resolver, "system_hosts", False):
        return await _system_hosts(name, port)
    addresses: list[tuple[str, int]] = []
    ttl = MAX_TTL
    errors = []
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(name, rdtype)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers) as exc:
            errors.append(f"{rdtype}: {type(exc).__name__}")
            continue
        except dns.exception.Timeout:
            errors.append(f"{rdtype}: timeout")
            continue
        ttl = min(ttl, float(answer.rrset.ttl))
        addresses.extend((r.to_text(), port) for r in answer)
    if not addresses:
        raise DnsError(f"{name}: no address ({', '.join(errors)})")
    return Answer(addresses, ttl)


async def _system_hosts(name: str, port: int) -> Answer:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            name, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise DnsError(f"{name}: no address ({exc})") from None
    addresses: list[tuple[str, int]] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = (str(sockaddr[0]), port)
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise DnsError(f"{name}: no address")
    return Answer(addresses, SYSTEM_TTL)


class GatewayResolver:
    """Resolves every gateway given by name, then keeps each fresh (TTL, bounded)."""

    def __init__(self, gateways: Iterable[Gateway], resolver: dns.asyncresolver.Resolver,
                 on_change: Callable[[], None] | None = None) -> None:
        self.gateways = [gw for gw in gateways if gw.by_name]
        self.resolver = resolver
        self.on_change = on_change
        self._tasks: list[asyncio.Task[None]] = []

    async def resolve_all(self) -> list[str]:
        """Resolve every name once; the problems (empty: all resolved)."""
        problems = []
        results = await asyncio.gather(*(resolve_gateway(self.resolver, gw)
                                         for gw in self.gateways), return_exceptions=True)
        for gw, result in zip(self.gateways, results, strict=True):
            if isinstance(result, BaseException):
                problems.append(f"{gw.uri}: {result}")
                continue
            gw.addresses = result.addresses
            log.info("gateway_resolved", gateway=gw.uri,
                     addresses=[f"{h}:{p}" for h, p in result.addresses], ttl=result.ttl)
            self._tasks.append(asyncio.get_running_loop().create_task(
                self._refresh(gw, result.ttl)))
        if self.on_change is not None:
            self.on_change()
        return problems

    async def _refresh(self, gw: Gateway, ttl: float) -> None:
        while True:
            await asyncio.sleep(min(max(ttl, MIN_TTL), MAX_TTL))
            started = time.monotonic()
            try:
                answer = await resolve_gateway(self.resolver, gw)
            except (DnsError, dns.exception.DNSException) as exc:
                log.warning("gateway_resolve_failed", gateway=gw.uri, error=str(exc),
                            kept=[f"{h}:{p}" for h, p in gw.addresses])
                ttl = RETRY_S
                continue
            ttl = answer.ttl
            if answer.addresses != gw.addresses:
                log.info("gateway_addresses_changed", gateway=gw.uri,
                         addresses=[f"{h}:{p}" for h, p in answer.addresses],
                         took_ms=round((time.monotonic() - started) * 1000, 1))
                gw.addresses = answer.addresses
                if self.on_change is not None:
                    self.on_change()

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
