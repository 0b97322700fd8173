"""The YAML routing config: schema, validation and loading.

Admins edit this file by hand, so every problem is reported at once and names the file, the key
path and the bad value (`proxy.yaml: carrier.gateways[0]: not a SIP URI ('http://x')`). The proxy
reads the config once at start-up; a bad edit is caught by `sip700 check-config` before a restart,
never by a running proxy.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import ipaddress
import os
import re
import sys
import typing
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple
from urllib.parse import SplitResult, urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    Strict,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

__all__ = [
    "CarrierConfig",
    "Config",
    "ConfigError",
    "HostPort",
    "ListenEndpoint",
    "SipTarget",
    "StoreConfig",
    "check_config",
    "load_config",
    "parse_host_port",
    "parse_listen",
    "parse_sip_uri",
]

DIALOG_KEY_BYTES = 32  # AES-256-GCM
DEFAULT_SIP_PORT = 5060
DEFAULT_SIPS_PORT = 5061  # TLS (RFC 3261 §19.1.2)
TRANSPORTS = ("udp", "tcp", "tls")


class ConfigError(Exception):
    """The config cannot be used; `problems` holds one line per problem found."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# ---------------------------------------------------------------------------------------------
# Addresses: listen entries, host[:port], gateway SIP URIs.
# ---------------------------------------------------------------------------------------------

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_HOSTNAME_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_TOKEN = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")  # RFC 3261 §25.1 token


def _q(value: str) -> str:
    """Quote a config value as the admin typed it (repr would double every regex backslash)."""
    if value.isprintable() and "'" not in value:
        return f"'{value}'"
    return repr(value)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class HostPort(NamedTuple):
    """A host (IP literal without brackets, or a DNS name) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{_bracketed(self.host)}:{self.port}"


class ListenEndpoint(NamedTuple):
    """One socket the proxy binds: `udp:127.0.0.1:5060`, `tls:127.0.0.1:5061`."""

    transport: Literal["udp", "tcp", "tls"]
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.transport}:{_bracketed(self.host)}:{self.port}"


class SipTarget(NamedTuple):
    """A gateway parsed from `sip:host[:port][;transport=udp|tcp|tls][;other-params]` or
    `sips:host[:port][;other-params]` (TLS)."""

    scheme: str
    host: str
    port: int
    transport: Literal["udp", "tcp", "tls"]
    params: tuple[tuple[str, str | None], ...]

    def __str__(self) -> str:
        params = "".join(f";{k}" if v is None else f";{k}={v}" for k, v in self.params)
        return f"{self.scheme}:{_bracketed(self.host)}:{self.port}{params}"


def _check_host(host: str) -> str:
    """The host with IPv6 brackets removed; ValueError if it is neither an IP nor a DNS name."""
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError("unclosed '[' in IPv6 address")
        try:
            return str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise ValueError(f"not an IPv6 address: {host}") from None
    if ":" in host:
        raise ValueError("an IPv6 address must be in brackets, e.g. [::1]")
    if host.replace(".", "").isdigit():
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError(f"not an IPv4 address: {host}") from None
    name = host[:-1] if host.endswith(".") else host
    if (
        not name
        or len(name) > 253
        or not all(_HOSTNAME_LABEL.fullmatch(p) for p in name.split("."))
    ):
        raise ValueError(f"not a host name or IP address: {_q(host)}")
    return host


def _check_port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError("port must be 1-65535")
    return int(text)


def _split_host_port(text: str) -> tuple[str, str | None]:
    """Split `host`, `host:port`, `[v6]` or `[v6]:port`; the port stays text."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            return text, None  # _check_host reports the unclosed bracket
        rest = text[close + 1 :]
        if not rest:
            return text, None
        if not rest.startswith(":"):
            raise ValueError(f"unexpected {_q(rest)} after IPv6 address")
        return text[: close + 1], rest[1:]
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, port
    return text, None  # no colon, or a bare IPv6 address that _check_host rejects


def parse_host_port(text: str, *, default_port: int | None = None) -> HostPort:
    """Parse `host[:port]` (IPv6 as `[::1]:5060`); the port is required if no default is given."""
    host, port = _split_host_port(text.strip())
    if port is None and default_port is None:
        raise ValueError("expected host:port")
    return HostPort(_check_host(host), default_port if port is None else _check_port(port))


def parse_listen(text: str) -> ListenEndpoint:
    """Parse a listen entry `transport:host[:port]`; the port defaults to 5060 (tls: 5061)."""
    transport, sep, rest = text.strip().partition(":")
    transport = transport.lower()
    if not sep or transport not in TRANSPORTS:
        raise ValueError("expected transport:host:port with transport udp, tcp or tls")
    default = DEFAULT_SIPS_PORT if transport == "tls" else DEFAULT_SIP_PORT
    host, port = parse_host_port(rest, default_port=default)
    return ListenEndpoint(typing.cast(Literal["udp", "tcp", "tls"], transport), host, port)


def parse_sip_uri(text: str) -> SipTarget:
    """Parse a gateway URI `sip:host[:port][;params]` (RFC 3261 §19.1, without a user part).

    `sips:` means TLS, and so does `;transport=tls` on a `sip:` URI; either defaults to port
    5061 (RFC 3263 §4.2).
    """
    scheme, sep, rest = text.strip().partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in ("sip", "sips"):
        raise ValueError("not a SIP URI")
    if "@" in rest:
        raise ValueError("a gateway URI has no user part")
    if "?" in rest:
        raise ValueError("a gateway URI has no headers")
    hostport, *raw_params = rest.split(";")
    params: list[tuple[str, str | None]] = []
    for raw in raw_params:
        name, eq, value = raw.partition("=")
        if not _TOKEN.fullmatch(name) or (eq and not _TOKEN.fullmatch(value)):
            raise ValueError(f"bad URI parameter {_q(raw)}")
        params.append((name.lower(), value if eq else None))
    given = dict(params).get("transport")
    transport = (given or "udp").lower()
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be udp, tcp or tls, not {_q(transport)}")
    if scheme == "sips":
        # RFC 3261 §26.2.2: sips: is TLS on every hop (;transport=tcp means TLS over TCP)
        if given is not None and transport == "udp":
            raise ValueError("sips: is TLS, it cannot use transport=udp")
        transport = "tls"
    default = DEFAULT_SIPS_PORT if transport == "tls" else DEFAULT_SIP_PORT
    host, port = parse_host_port(hostport, default_port=default)
    return SipTarget(
        scheme, host, port, typing.cast(Literal["udp", "tcp", "tls"], transport),
        tuple(params)
    )


def _wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# Field types. Scalars are strict so `workers: true` or `timeout_ms: "200"` is an error, not a
# silent conversion; lists arrive from YAML as lists and are kept as tuples (the config is frozen).
# ---------------------------------------------------------------------------------------------


def _with_value(check: typing.Callable[[str], object]) -> typing.Callable[[str], str]:
    """Run a parser for its errors, adding the bad value to the message."""

    def validate(value: str) -> str:
        try:
            check(value)
        except ValueError as exc:
            raise ValueError(f"{exc} ({_q(value)})") from None
        return value

    return validate


_check_gateway = _with_value(parse_sip_uri)


def _check_cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f"not an IPv4/IPv6 network in CIDR form ({_q(value)})") from None
    return value


def _check_reason(value: str) -> str:
    if not value.strip():
        raise ValueError("reason must not be empty")
    if len(value) > 128:
        raise ValueError(f"reason is longer than 128 characters ({_q(value[:40])}...)")
    if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in value):
        raise ValueError(f"reason must not contain control characters or line breaks ({_q(value)})")
    return value


def _check_logger_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*", value):
        raise ValueError(f"not a logger name such as sip700.calls ({_q(value)})")
    return value


def _check_nonblank_token(value: str) -> str:
    if not value or any(c.isspace() or ord(c) < 32 for c in value):
        raise ValueError(f"must be non-empty, without spaces or control characters ({_q(value)})")
    return value


Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
PositiveFloat = Annotated[float, Strict(), Field(gt=0)]
NonNegativeFloat = Annotated[float, Strict(), Field(ge=0)]
ListenStr = Annotated[Str, AfterValidator(_with_value(parse_listen))]
HostPortStr = Annotated[Str, AfterValidator(_with_value(parse_host_port))]
GatewayStr = Annotated[Str, AfterValidator(_check_gateway)]
CidrStr = Annotated[Str, AfterValidator(_check_cidr)]
TokenStr = Annotated[Str, AfterValidator(_check_nonblank_token)]


def _no_duplicates(values: tuple[str, ...], normalise: typing.Callable[[str], object]) -> None:
    seen: dict[object, int] = {}
    for index, value in enumerate(values):
        key = normalise(value)
        if key in seen:
            raise ValueError(f"duplicate entry {_q(value)} (items {seen[key]} and {index})")
        seen[key] = index


def _base_dir(info: ValidationInfo) -> Path:
    """Relative paths resolve against the config file's directory (passed as context)."""
    context = info.context or {}
    return Path(context.get("base_dir") or Path.cwd())


def available_cpus() -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota
    (a container's `--cpus`), not the host's core count."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _quota_cpus()
    if quota is not None:
        cpus = min(cpus, quota)
    return max(1, cpus)


def _quota_cpus() -> int | None:
    """The cgroup CPU quota in whole CPUs, rounded up (1.5 CPUs → 2); None if unlimited."""
    quota = _cgroup_cpu_quota()
    return None if quota is None else max(1, int(quota + 0.999))


def _cgroup_cpu_quota() -> float | None:
    """The cgroup CPU quota in CPUs (v2 `cpu.max`, v1 `cpu.cfs_quota_us`), None if unlimited."""
    try:  # cgroup v2: "max 100000" or "150000 100000"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        base = Path("/sys/fs/cgroup/cpu,cpuacct")
        if not base.is_dir():
            base = Path("/sys/fs/cgroup/cpu")
        quota_us = int((base / "cpu.cfs_quota_us").read_text())
        period_us = int((base / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def _auto_workers(value: Any) -> Any:
    """`workers: auto` means one worker per CPU this process may use (affinity and cgroup
    quota: in a container, its CPU limit, not the host's cores)."""
    if value == "auto":
        return min(available_cpus(), 1024)
    return value


def _check_cpu_affinity(value: Any) -> Any:
    """`worker_cpu_affinity`: 'auto', false (YAML reads an unquoted `off` or `no` as false;
    'off' quoted is taken too), or a non-empty list of distinct CPU numbers."""
    if value is False or value == "off":
        return "off"
    if value == "auto":
        return value
    if isinstance(value, str):
        raise ValueError(f"must be 'auto', false or a list of CPU numbers (got {_q(value)})")
    if not isinstance(value, list | tuple) or not value:
        raise ValueError("must be 'auto', false or a non-empty list of CPU numbers")
    for cpu in value:
        if type(cpu) is not int or not 0 <= cpu < 4096:
            raise ValueError(f"CPU numbers are integers 0-4095 (got {cpu!r})")
    if len(set(value)) != len(value):
        raise ValueError(f"a CPU is listed twice ({list(value)})")
    return tuple(value)


def plan_worker_cpus(setting: str | tuple[int, ...], workers: int, allowed: set[int],
                     quota: int | None) -> tuple[tuple[int, ...] | None, str]:
    """The CPU of each worker under `worker_cpu_affinity`, or None and why not.

    `allowed`: the CPUs this process may run on (its affinity mask); `quota`: a cgroup CPU quota
    in whole CPUs (None: none). `auto` pins only where the workers are one per allowed CPU and
    no quota shares those CPUs with others: then each worker keeps its caches and nobody else
    is kept off a CPU. A listed CPU outside `allowed` is a ValueError naming the key.
    """
    if setting == "off":
        return None, "worker_cpu_affinity: false"
    if setting == "auto":
        if workers < 2:
            return None, "one worker"
        if len(allowed) != workers:
            return None, f"{workers} workers for {len(allowed)} CPUs (auto pins one per CPU)"
        if quota is not None and quota < len(allowed):
            return None, f"a cgroup CPU quota of {quota} CPUs shares the {len(allowed)} CPUs"
        return tuple(sorted(allowed)), "one worker per CPU"
    assert not isinstance(setting, str)
    outside = [cpu for cpu in setting if cpu not in allowed]
    if outside:
        mine = ", ".join(map(str, sorted(allowed)))
        raise ValueError(f"worker_cpu_affinity: CPU {', '.join(map(str, outside))} is not one "
                         f"this process may use ({mine})")
    return tuple(setting[i % len(setting)] for i in range(workers)), "listed"


def _decode_dialog_key(text: str) -> bytes:
    """Decode a base64 dialog key; the message never shows the key itself."""
    try:
        key = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64 (value hidden)") from None
    if len(key) != DIALOG_KEY_BYTES:
        raise ValueError(
            f"decodes to {len(key)} bytes, need {DIALOG_KEY_BYTES} (value hidden);"
            " make one with: openssl rand -base64 32"
        )
    return key


# ---------------------------------------------------------------------------------------------
# Schema.
# ---------------------------------------------------------------------------------------------


class _Section(BaseModel):
    """Every section: unknown keys are errors, values are read-only after loading."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_section_is_defaults(cls, data: Any) -> Any:
        # `metrics:` with every key commented out is YAML null: treat it as an empty section.
        return {} if data is None else data


class GatewayEntry(NamedTuple):
    """One `carrier.gateways` / `carrier.groups.<name>` entry: a URI string, or
    `{uri, priority, weight}` (priority None: from `carrier.strategy`, see `ranked`)."""

    uri: str
    priority: int | None = None
    weight: int = 1


_GATEWAY_KEYS = ("uri", "priority", "weight")


def _gateway_entry(value: Any) -> GatewayEntry:
    if isinstance(value, GatewayEntry):
        return value
    if isinstance(value, tuple) and len(value) == 3:  # a dumped entry (model_dump): re-check
        uri, priority, weight = value
        value = {"uri": uri, "weight": weight} if priority is None else {
            "uri": uri, "priority": priority, "weight": weight}
        entry = _gateway_entry(value)
        return entry if priority is not None else GatewayEntry(entry.uri, None, entry.weight)
    if isinstance(value, str):
        return GatewayEntry(_check_gateway(value))
    if not isinstance(value, dict):
        raise ValueError(f"a SIP URI or {{uri, priority, weight}}, not {type(value).__name__}")
    unknown = [k for k in value if k not in _GATEWAY_KEYS]
    if unknown:
        raise ValueError(f"unknown key {_q(str(unknown[0]))} (expected uri, priority, weight)")
    uri = value.get("uri")
    if not isinstance(uri, str):
        raise ValueError("uri: a SIP URI is required")
    priority = value.get("priority", 1)
    weight = value.get("weight", 1)
    if type(priority) is not int or not 0 <= priority <= 1000:
        raise ValueError(f"priority must be an integer 0-1000 ({_q(str(priority))})")
    if type(weight) is not int or not 1 <= weight <= 1000:
        raise ValueError(f"weight must be an integer 1-1000 ({_q(str(weight))})")
    return GatewayEntry(_check_gateway(uri), priority, weight)


GatewayItem = Annotated[GatewayEntry, BeforeValidator(_gateway_entry)]
GroupName = Annotated[Str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


def _check_prefix(value: str) -> str:
    if not (value.isascii() and value.isdigit() and len(value) <= 15):
        raise ValueError(f"a prefix is 1-15 digits of the callee's national number ({_q(value)})")
    return value


class RouteSpec(_Section):
    """A callee prefix and where its calls go: a gateway group, or refused outright."""

    prefix: Annotated[Str, AfterValidator(_check_prefix)]
    group: GroupName | None = None
    refuse: Bool = False

    @model_validator(mode="after")
    def _one_action(self) -> RouteSpec:
        if (self.group is None) == (not self.refuse):
            raise ValueError("a route needs exactly one of group: NAME or refuse: true")
        return self


class ProbeConfig(_Section):
    """OPTIONS probing of every gateway (RFC 3261 §11), like Kamailio's dispatcher."""

    enabled: Literal["auto"] | Bool = "auto"  # auto: groups with more than one gateway
    interval_s: Annotated[float, Strict(), Field(ge=0.1, le=3600)] = 10.0
    down_after: Annotated[int, Strict(), Field(ge=1, le=100)] = 3
    up_after: Annotated[int, Strict(), Field(ge=1, le=100)] = 2
    alive_codes: tuple[Annotated[int, Strict(), Field(ge=100, le=699)], ...] = Field(
        default=(200,), min_length=1)


class DnsConfig(_Section):
    """How gateway names are resolved (RFC 3263)."""

    servers: tuple[HostPortStr, ...] = ()  # empty: the system's resolver (/etc/resolv.conf)
    timeout_ms: Annotated[int, Strict(), Field(ge=100, le=30_000)] = 2000


def uri_has_port(uri: str) -> bool:
    """Whether a gateway URI names its port (`sip:gw.example:5070`), or leaves it to DNS."""
    hostport = uri.split(":", 1)[1].split(";", 1)[0]
    if hostport.startswith("["):
        return "]:" in hostport
    return ":" in hostport


class CarrierConfig(_Section):
    """The carrier leg: where translated calls are sent."""

    gateways: tuple[GatewayItem, ...] = Field(min_length=1)
    strategy: Literal["round_robin", "failover"] = "round_robin"
    groups: dict[GroupName, tuple[GatewayItem, ...]] = {}
    routes: tuple[RouteSpec, ...] = ()
    branch_timeout_ms: Annotated[int, Strict(), Field(ge=50, le=60_000)] = 2000
    retry_after_s: Annotated[int, Strict(), Field(ge=0, le=86400)] = 5
    probe: ProbeConfig = ProbeConfig()
    dns: DnsConfig = DnsConfig()

    @field_validator("gateways")
    @classmethod
    def _unique_gateways(cls, value: tuple[GatewayEntry, ...]) -> tuple[GatewayEntry, ...]:
        _no_duplicates(tuple(g.uri for g in value), lambda uri: parse_sip_uri(uri)[:4])
        return value

    @field_validator("groups")
    @classmethod
    def _groups_valid(cls, value: dict[str, tuple[GatewayEntry, ...]]
                      ) -> dict[str, tuple[GatewayEntry, ...]]:
        for name, entries in value.items():
            if not entries:
                raise ValueError(f"group {_q(name)} has no gateways")
            try:
                _no_duplicates(tuple(g.uri for g in entries),
                               lambda uri: parse_sip_uri(uri)[:4])
            except ValueError as exc:
                raise ValueError(f"group {_q(name)}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _routes_valid(self) -> CarrierConfig:
        seen: dict[str, int] = {}
        for i, route in enumerate(self.routes):
            if route.prefix in seen:
                raise ValueError(f"routes[{i}]: prefix {_q(route.prefix)} is already routed by "
                                 f"routes[{seen[route.prefix]}]")
            seen[route.prefix] = i
            if route.group is not None and route.group not in self.groups:
                known = ", ".join(sorted(self.groups)) or "none defined"
                raise ValueError(f"routes[{i}]: no group {_q(route.group)} in carrier.groups "
                                 f"({known})")
        return self

    def ranked(self, entries: tuple[GatewayEntry, ...]) -> tuple[tuple[SipTarget, int, int], ...]:
        """(target, priority, weight) per entry: an entry without a priority gets 1 under
        round_robin (all equal, spread) and its list position under failover (in order)."""
        out = []
        for i, entry in enumerate(entries):
            priority = entry.priority
            if priority is None:
                priority = i if self.strategy == "failover" else 1
            out.append((parse_sip_uri(entry.uri), priority, entry.weight))
        return tuple(out)

    @cached_property
    def targets(self) -> tuple[SipTarget, ...]:
        """Every gateway, parsed: the default list in config order, then the groups'."""
        seen: dict[tuple, SipTarget] = {}
        for entry in (*self.gateways, *(e for g in self.groups.values() for e in g)):
            target = parse_sip_uri(entry.uri)
            seen.setdefault(target[:4], target)
        return tuple(seen.values())


class SentinelConfig(_Section):
    """Redis Sentinel: the proxy asks these sentinels where the master of `service_name` is."""

    addresses: tuple[HostPortStr, ...] = Field(min_length=1)
    service_name: TokenStr

    @cached_property
    def endpoints(self) -> tuple[HostPort, ...]:
        return tuple(parse_host_port(a) for a in self.addresses)


class ClusterConfig(_Section):
    """Redis Cluster: any reachable startup node reveals the rest of the cluster."""

    startup_nodes: tuple[HostPortStr, ...] = Field(min_length=1)

    @cached_property
    def endpoints(self) -> tuple[HostPort, ...]:
        return tuple(parse_host_port(a) for a in self.startup_nodes)


class CacheConfig(_Section):
    """The per-process binding cache in front of the store."""

    max_entries: NonNegativeInt = 1_000_000
    max_ttl_s: NonNegativeFloat = 300
    negative_ttl_s: NonNegativeFloat = 1.0

    @field_validator("negative_ttl_s")
    @classmethod
    def _negative_within_max(cls, value: float, info: ValidationInfo) -> float:
        max_ttl = info.data.get("max_ttl_s")
        if max_ttl is not None and value > max_ttl:
            raise ValueError(f"must not exceed store.cache.max_ttl_s ({value} > {max_ttl})")
        return value


class CircuitBreakerConfig(_Section):
    """Stop calling a failing store for a while instead of making every call wait for it."""

    failure_threshold: PositiveInt = 5
    open_s: PositiveFloat = 2.0


def _mask_url_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return SplitResult(parts.scheme, netloc, parts.path, parts.query, parts.fragment).geturl()


def _optional_redis_url(value: str | None) -> str | None:
    """An optional `redis_url` key: checked, its password masked in the error."""
    if value is not None:
        try:
            _check_redis_url(value)
        except ValueError as exc:
            raise ValueError(f"{exc} ({_q(_mask_url_password(value))})") from None
    return value


def _check_redis_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("scheme must be redis://, rediss:// or unix://")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("unix:// needs a socket path, e.g. unix:///run/redis.sock")
        return
    if not parts.hostname:
        raise ValueError("no host")
    try:
        parts.port  # noqa: B018 - urlsplit validates the port lazily
    except ValueError:
        raise ValueError("port must be 1-65535") from None
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ValueError(f"database must be a number, not {_q(db)}")


class StoreConfig(_Section):
    """Where bindings live: in memory (loaded from a file) or in Redis."""

    backend: Literal["memory", "redis"] = "memory"
    bindings_file: Path | None = Field(default=None, validate_default=True)
    redis_url: Str = "redis://127.0.0.1:6379/0"
    key_prefix: TokenStr = "sip700:"
    sentinel: SentinelConfig | None = None
    cluster: ClusterConfig | None = None
    timeout_ms: PositiveInt = 200
    # a lookup the store has not answered by then ends in store_unavailable (never a hang)
    lookup_deadline_ms: PositiveInt = 1000
    retry_after_s: NonNegativeInt = 5
    cache: CacheConfig = CacheConfig()
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()

    @field_validator("bindings_file")
    @classmethod
    def _bindings_file_for_memory(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        backend = info.data.get("backend")
        if backend == "redis" and value is not None:
            raise ValueError("only used with store.backend memory; remove it or change backend")
        if backend != "memory":
            return value
        if value is None:
            raise ValueError("required when store.backend is memory")
        path = _base_dir(info) / value
        if not path.is_file():
            raise ValueError(f"no such file ({_q(str(value))}, looked for {_q(str(path))})")
        return path.resolve()

    @field_validator("redis_url")
    @classmethod
    def _valid_redis_url(cls, value: str) -> str:
        try:
            _check_redis_url(value)
        except ValueError as exc:
            raise ValueError(f"{exc} ({_q(_mask_url_password(value))})") from None
        return value

    @field_validator("sentinel")
    @classmethod
    def _sentinel_needs_redis(
        cls, value: SentinelConfig | None, info: ValidationInfo
    ) -> SentinelConfig | None:
        if value is not None and info.data.get("backend") == "memory":
            raise ValueError("only used with store.backend redis")
        return value

    @field_validator("cluster")
    @classmethod
    def _cluster_alone(
        cls, value: ClusterConfig | None, info: ValidationInfo
    ) -> ClusterConfig | None:
        if value is None:
            return value
        if info.data.get("backend") == "memory":
            raise ValueError("only used with store.backend redis")
        if info.data.get("sentinel") is not None:
            raise ValueError("cannot be combined with store.sentinel; choose one")
        db = urlsplit(info.data.get("redis_url") or "").path.lstrip("/")
        if db not in ("", "0"):
            raise ValueError(f"Redis Cluster has only database 0; store.redis_url selects {db}")
        return value


class ResponseSpec(_Section):
    """A final response the proxy sends itself."""

    code: Annotated[int, Strict(), Field(ge=300, le=699)]
    reason: Annotated[Str, AfterValidator(_check_reason)]


class ResponsesConfig(_Section):
    """The proxy's own rejections, by cause."""

    no_binding: ResponseSpec = ResponseSpec(code=404, reason="No Binding")
    not_party: ResponseSpec = ResponseSpec(code=403, reason="Not A Party Of This Binding")
    direction_restricted: ResponseSpec = ResponseSpec(code=403, reason="Direction Restricted")
    not_middle_number: ResponseSpec = ResponseSpec(code=404, reason="Not A Middle Number")
    untrusted_peer: ResponseSpec = ResponseSpec(code=403, reason="Untrusted Peer")
    store_unavailable: ResponseSpec = ResponseSpec(code=503, reason="Binding Store Unavailable")
    no_gateway: ResponseSpec = ResponseSpec(code=503, reason="No Gateway Available")
    route_refused: ResponseSpec = ResponseSpec(code=403, reason="Destination Not Allowed")
    overloaded: ResponseSpec = ResponseSpec(code=503, reason="Overloaded")


class PrivacyConfig(_Section):
    """How identities are hidden, and the key that seals each dialog's rewrite rule."""

    to_header: Literal["middle_number", "callee"] = "middle_number"
    mask_numbers_in_logs: Bool = True
    max_dialog_s: PositiveInt = 43200
    unreadable_body: Literal["strip", "reject"] = "strip"
    isup: Literal["strip", "rewrite"] = "strip"
    refer: Literal["reject", "pass"] = "reject"
    add_asserted_identity: Bool = True
    dialog_key: SecretStr | None = None
    dialog_key_file: Path | None = None

    @field_validator("dialog_key")
    @classmethod
    def _valid_dialog_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _decode_dialog_key(value.get_secret_value())
        return value

    @field_validator("dialog_key_file")
    @classmethod
    def _valid_dialog_key_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        if info.data.get("dialog_key") is not None:
            raise ValueError("set privacy.dialog_key or privacy.dialog_key_file, not both")
        path = _base_dir(info) / value
        try:
            text = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not base64 text"
            raise ValueError(f"cannot read {_q(str(path))}: {reason}") from None
        try:
            _decode_dialog_key(text)
        except ValueError as exc:
            raise ValueError(f"{_q(str(path))}: {exc}") from None
        return path.resolve()

    @cached_property
    def dialog_key_bytes(self) -> bytes | None:
        """The 32-byte dialog key, or None: the proxy then makes a random one (and warns)."""
        if self.dialog_key is not None:
            return _decode_dialog_key(self.dialog_key.get_secret_value())
        if self.dialog_key_file is not None:
            return _decode_dialog_key(self.dialog_key_file.read_text(encoding="ascii"))
        return None


class TimersConfig(_Section):
    """RFC 3261 §17 transaction timers and the §16.6 proxy timer C."""

    t1_ms: PositiveInt = 500
    t2_ms: PositiveInt = Field(default=4000, validate_default=True)
    t4_ms: PositiveInt = 5000
    timer_c_s: PositiveFloat = 180
    max_invite_lifetime_s: PositiveFloat = 300
    # RFC 3261 §17.2.1: the 100 Trying to an INVITE is held this long and sent only if no
    # other response went upstream meanwhile (0: sent at once, before the lookup)
    trying_after_ms: Annotated[int, Strict(), Field(ge=0, le=200)] = 200

    @field_validator("t2_ms")
    @classmethod
    def _t2_not_below_t1(cls, value: int, info: ValidationInfo) -> int:
        t1 = info.data.get("t1_ms")
        if t1 is not None and value < t1:
            raise ValueError(f"must be >= timers.t1_ms ({value} < {t1})")
        return value


def _existing_file(value: Path | None, info: ValidationInfo) -> Path | None:
    """A file path resolved against the config's directory; it must exist."""
    if value is None:
        return None
    path = _base_dir(info) / value
    if not path.is_file():
        raise ValueError(f"no such file ({_q(str(value))}, looked for {_q(str(path))})")
    return path.resolve()


class TlsConfig(_Section):
    """TLS for `tls:` listen entries and `sips:` / `;transport=tls` gateways (RFC 3261 §26.2)."""

    # PEM: our certificate (chain, leaf first) and its unencrypted private key. Required with a
    # tls: listen entry; also presented to TLS gateways that ask for a client certificate.
    certificate_file: Path | None = None
    private_key_file: Path | None = None
    # PEM bundle of the CAs that sign our peers' certificates; null: the system's CAs
    ca_file: Path | None = None
    # certificates of peers that connect to us: not asked for, checked if sent, or required
    verify_clients: Literal["none", "optional", "required"] = "none"
    # check a TLS gateway's (or peer's) certificate and that it names the host we connect to
    verify_servers: Bool = True
    min_version: Literal["1.2", "1.3"] = "1.2"
    # an accepted connection that has not finished its handshake by then is closed
    handshake_timeout_s: PositiveFloat = 10

    _files = field_validator("certificate_file", "private_key_file", "ca_file")(
        _existing_file)

    @model_validator(mode="after")
    def _files_load(self) -> TlsConfig:
        from proxy.tls import load_problem  # ssl is imported only where TLS is configured

        if (self.certificate_file is None) != (self.private_key_file is None):
            raise ValueError("certificate_file and private_key_file go together: set both")
        problem = load_problem(self.certificate_file, self.private_key_file, self.ca_file)
        if problem is not None:
            raise ValueError(problem)
        return self


class LowLoadConfig(_Section):
    """One worker takes every new call while the load is low (proxy/steering.py)."""

    enabled: Bool = True
    # every worker's CPU summed, in % of one core, held hold_s: one worker takes new calls
    # (65: one worker then runs at 55-60 %, and the load may grow by a third before it leaves)
    enter_percent: Annotated[float, Strict(), Field(gt=0, le=100)] = 65.0
    # one worker's CPU over a second above this (or any shedding): spread over every worker
    leave_percent: Annotated[float, Strict(), Field(gt=0, le=100)] = 80.0
    hold_s: Annotated[float, Strict(), Field(ge=1, le=3600)] = 10.0

    @model_validator(mode="after")
    def _hysteresis(self) -> LowLoadConfig:
        if self.enter_percent >= self.leave_percent:
            raise ValueError(f"enter_percent ({self.enter_percent:g}) must be under "
                             f"leave_percent ({self.leave_percent:g}): one worker carrying "
                             f"what made it enter must not leave at once")
        return self


class TransportConfig(_Section):
    """Socket tuning."""

    udp_rcvbuf_bytes: PositiveInt = 4 * 1024 * 1024
    udp_sndbuf_bytes: PositiveInt = 4 * 1024 * 1024
    tcp_idle_timeout_s: PositiveFloat = 300
    max_message_bytes: Annotated[int, Strict(), Field(ge=1024, le=65535)] = 65535
    # per worker: accepted connections in all, and from one source IP; more are closed at once
    tcp_max_connections: PositiveInt = 4096
    tcp_max_connections_per_source: PositiveInt = 256
    # output waiting for one peer that does not read; past it the connection is closed. At
    # least one largest message (65535) plus headroom.
    tcp_max_output_bytes: Annotated[int, Strict(), Field(ge=65536)] = 1048576
    # with several workers, worker i also listens on worker_port_base + i (on the listen hosts)
    # and names that port in its Via and Record-Route, so what answers or follows a call comes
    # straight back to the worker holding it. null: the first listen port + 1.
    worker_port_base: Annotated[int, Strict(), Field(ge=1024, le=65535)] | None = None
    # RFC 3261 §18.1.1: a request within 200 bytes of the path MTU (null: unknown, so larger
    # than 1300 bytes) goes over TCP when its next hop takes TCP
    path_mtu_bytes: Annotated[int, Strict(), Field(ge=576, le=65535)] | None = None
    # every UDP next hop also takes TCP on the same port (RFC 3261 §18 asks it of every SIP
    # element); false: only gateways also configured with ;transport=tcp
    large_requests_over_tcp: Bool = False
    tls: TlsConfig = TlsConfig()
    low_load: LowLoadConfig = LowLoadConfig()

    @cached_property
    def large_request_bytes(self) -> int:
        """A request over this many bytes is too large for UDP (RFC 3261 §18.1.1)."""
        return 1300 if self.path_mtu_bytes is None else self.path_mtu_bytes - 200


class OverloadConfig(_Section):
    """Shedding new calls before the event loop falls behind (calls in progress first)."""

    enabled: Bool = True
    max_loop_lag_ms: Annotated[int, Strict(), Field(ge=10, le=60_000)] = 200
    max_pending_lookups: Annotated[int, Strict(), Field(ge=1, le=10_000_000)] = 5000
    # how long the oldest datagram in a UDP receive queue has waited there (the kernel's
    # arrival stamp): what a caller's INVITE feels before any of our code sees it. 300: an
    # INVITE that waited less still hears from us within T1 (500 ms) with the 100 Trying held
    # timers.trying_after_ms (200) at most
    max_receive_wait_ms: Annotated[int, Strict(), Field(ge=10, le=60_000)] = 300
    # datagrams waiting in the kernel's UDP receive queue (KiB of kernel memory, ~1.3 KiB
    # per small datagram, ~2.3 KiB per INVITE with SDP); drops by a full queue count too.
    # A memory bound: the wait above is the signal (2 MiB, the default until 2026-12-06,
    # meant anything from 100 to 500 ms of wait, by the rate and the mix of messages)
    max_receive_queue_kb: Annotated[int, Strict(), Field(ge=16, le=1_048_576)] = 8192
    retry_after_s: Annotated[int, Strict(), Field(ge=0, le=3600)] = 2


LogLevel = Literal["debug", "info", "warning", "error"]


class LoggingConfig(_Section):
    level: LogLevel = "info"
    # auto: console (with colours) when stdout is a terminal, json otherwise
    format: Literal["json", "console", "auto"] = "json"
    # per logger (module): its own lowest level, e.g. {sip700.calls: warning}
    levels: dict[Annotated[Str, AfterValidator(_check_logger_name)], LogLevel] = Field(
        default_factory=dict)


class ShutdownConfig(_Section):
    """What SIGTERM does: stop taking new calls, let what is in progress finish, exit 0."""

    # longest wait for transactions in progress; then the worker stops anyway
    drain_s: NonNegativeFloat = 30.0
    # reject: keep listening, answer new calls 503 with Retry-After (a peer retries elsewhere);
    # close: stop listening on the shared SIP port at once (behind a load balancer or DNS SRV,
    # which then sends new calls to another instance); the worker's own port stays open
    mode: Literal["reject", "close"] = "reject"
    retry_after_s: NonNegativeInt = 30
    reason: Annotated[Str, AfterValidator(_check_reason)] = "Shutting Down"


class HealthConfig(_Section):
    """What /readyz requires besides a loaded config and a gateway that is up."""

    # true declares cache-only mode: ready while the Redis store is unreachable (cached
    # bindings keep routing; misses get store_unavailable)
    ready_without_store: Bool = False


class MetricsConfig(_Section):
    listen: HostPortStr | None = None

    @cached_property
    def endpoint(self) -> HostPort | None:
        """Where the Prometheus / health HTTP endpoint listens, or None when it is off."""
        return None if self.listen is None else parse_host_port(self.listen)


# ---------------------------------------------------------------------------------------------
# Anti-fraud call policy (proxy/policy): caps, blocklists, time windows, bulk calling, webhook.
# ---------------------------------------------------------------------------------------------

RuleName = Annotated[Str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
PolicyStatus = Annotated[int, Strict(), Field(ge=400, le=699)]
ReasonStr = Annotated[Str, AfterValidator(_check_reason)]
WindowSeconds = Annotated[int, Strict(), Field(ge=1, le=2_592_000)]  # up to 30 days
_CLOCK = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")


def _check_number_entry(value: str) -> str:
    from proxy.numbers import normalize_number

    number = normalize_number(value)
    if number is None:
        raise ValueError(f"not a phone number ({_q(value)})")
    return number


def _check_number_prefix(value: str) -> str:
    if not (value.isascii() and value.isdigit() and 1 <= len(value) <= 20):
        raise ValueError(f"a prefix is 1-20 digits of a national-format number ({_q(value)})")
    return value


def _check_clock(value: str) -> str:
    if not _CLOCK.fullmatch(value):
        raise ValueError(f"a time of day is HH:MM, 00:00 to 23:59 ({_q(value)})")
    return value


def _check_time_zone(value: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"not an IANA time zone such as Asia/Shanghai ({_q(value)})") from None
    return value


NumberEntry = Annotated[Str, AfterValidator(_check_number_entry)]
NumberPrefix = Annotated[Str, AfterValidator(_check_number_prefix)]


class _PolicyRule(_Section):
    """What every rule may set: the SIP status and reason of its refusals (null: the default
    refusal, policy.refusal or the tenant's)."""

    code: PolicyStatus | None = None
    reason: ReasonStr | None = None


class PolicyRefusalConfig(_Section):
    code: PolicyStatus = 403
    reason: ReasonStr = "Call Policy"


class RateLimitConfig(_PolicyRule):
    """At most max_calls calls in any window_s seconds (a sliding window) per caller, callee,
    X or tenant."""

    name: RuleName
    per: Literal["caller", "callee", "x", "tenant"]
    max_calls: PositiveInt
    window_s: WindowSeconds


class ConcurrencyConfig(_PolicyRule):
    """At most max_calls calls at once per X or per tenant (ringing and answered)."""

    name: RuleName
    per: Literal["x", "tenant"]
    max_calls: PositiveInt


class BlocklistConfig(_PolicyRule):
    """Numbers refused outright: as caller, as callee, as X, or any party by prefix."""

    callers: tuple[NumberEntry, ...] = ()
    callees: tuple[NumberEntry, ...] = ()
    x: tuple[NumberEntry, ...] = ()
    prefixes: tuple[NumberPrefix, ...] = ()


class TimeWindowConfig(_PolicyRule):
    """Calls are taken from start to end (local time in tz); end before start spans midnight."""

    start: Annotated[Str, AfterValidator(_check_clock)]
    end: Annotated[Str, AfterValidator(_check_clock)]
    tz: Annotated[Str, AfterValidator(_check_time_zone)] = "Asia/Shanghai"

    @model_validator(mode="after")
    def _not_empty(self) -> TimeWindowConfig:
        if self.start == self.end:
            raise ValueError("start and end are the same time: the window would be empty "
                             "(remove time_window to allow calls at any time)")
        return self


class BulkConfig(_PolicyRule):
    """A caller reaching more than max_distinct_callees different callees through middle
    numbers within window_s is refused (and flagged: log bulk_caller)."""

    max_distinct_callees: PositiveInt
    window_s: WindowSeconds


class WebhookConfig(_PolicyRule):
    """The tenant's per-call decision endpoint (POST JSON; see README)."""

    url: Annotated[Str, AfterValidator(_check_http_url)]
    timeout_ms: Annotated[int, Strict(), Field(ge=10, le=5000)] = 300
    fallback: Literal["connect", "refuse"] = "connect"
    secret: Annotated[Str, Field(min_length=16)] | None = None  # X-Sip700-Signature
    max_connections: Annotated[int, Strict(), Field(ge=1, le=10_000)] = 100
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()


def _unique_names(rules: tuple[Any, ...]) -> tuple[Any, ...]:
    seen: set[str] = set()
    for rule in rules:
        if rule.name in seen:
            raise ValueError(f"duplicate rule name {_q(rule.name)} (records say "
                             f"policy:<name>: each must be unique)")
        seen.add(rule.name)
    return rules


class _PolicyRules(_Section):
    """The rules a policy may hold, globally or per tenant."""

    rate_limits: tuple[RateLimitConfig, ...] = ()
    concurrency: tuple[ConcurrencyConfig, ...] = ()
    blocklist: BlocklistConfig = BlocklistConfig()
    time_window: TimeWindowConfig | None = None
    bulk: BulkConfig | None = None

    @field_validator("rate_limits", "concurrency")
    @classmethod
    def _unique(cls, value: tuple[Any, ...]) -> tuple[Any, ...]:
        return _unique_names(value)

    def has_rules(self) -> bool:
        b = self.blocklist
        return bool(self.rate_limits or self.concurrency or self.time_window or self.bulk
                    or getattr(self, "webhook", None) or b.callers or b.callees or b.x
                    or b.prefixes)


MaxCallSeconds = Annotated[int, Strict(), Field(ge=1, le=86400)]


class FloodConfig(_Section):
    """Pike-style flood protection per source address (proxy/flood.py): counted per worker."""

    enabled: Bool = False
    # a source sending more requests than this in one second is blocked for cooldown_s
    max_requests_per_s: Annotated[int, Strict(), Field(ge=1, le=10_000_000)] = 200
    cooldown_s: Annotated[float, Strict(), Field(gt=0, le=86400)] = 10.0
    # reply: 503 with Retry-After: cooldown_s; drop: no answer at all
    action: Literal["reply", "drop"] = "reply"
    # trusted_peers and carrier gateways: null exempts them, a number is their own limit
    trusted_limit: Annotated[int, Strict(), Field(ge=1, le=10_000_000)] | None = None


class TenantPolicyConfig(_PolicyRules):
    """A tenant's own policy: its rules apply to its calls on top of the global ones; its
    time_window and refusal replace the global ones for its calls."""

    webhook: WebhookConfig | None = None
    refusal: PolicyRefusalConfig | None = None


class PolicyConfig(_PolicyRules):
    """The global policy, and where its shared state lives (Redis)."""

    refusal: PolicyRefusalConfig = PolicyRefusalConfig()
    # null: on when a rule is configured here or in a tenant; true: also for the blocklists
    # managed in Redis alone (sip700 block, the API); false: off whatever is configured
    enabled: Bool | None = None
    # null: store.redis_url (required with the memory store and with store.cluster)
    redis_url: Str | None = None
    key_prefix: TokenStr | None = None  # null: <store.key_prefix>policy:
    timeout_ms: Annotated[int, Strict(), Field(ge=10, le=5000)] = 200
    on_error: Literal["connect", "refuse"] = "connect"  # Redis down: let calls through or not
    error_refusal: PolicyRefusalConfig = PolicyRefusalConfig(code=503,
                                                             reason="Call Policy Unavailable")
    concurrency_lease_s: Annotated[int, Strict(), Field(ge=10, le=86_400)] = 120
    blocklist_poll_ms: Annotated[int, Strict(), Field(ge=50, le=1000)] = 500
    max_call_s: MaxCallSeconds | None = None  # global cap; bindings and tenants may set lower
    flood: FloodConfig = FloodConfig()

    @field_validator("redis_url")
    @classmethod
    def _valid_redis_url(cls, value: str | None) -> str | None:
        return _optional_redis_url(value)


# ---------------------------------------------------------------------------------------------
# The binding API: tenants, their keys and number pools, the audit trail.
# ---------------------------------------------------------------------------------------------

_KEY_HASH = re.compile(r"sha256:[0-9a-f]{64}")
_TENANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
_AREA = re.compile(r"0[0-9]{2,3}")
MAX_POOL_RANGE = 1_000_000  # numbers in one range entry


def _check_key_hash(value: str) -> str:
    if not _KEY_HASH.fullmatch(value):
        raise ValueError("must be 'sha256:' and 64 lower-case hex digits, the hash "
                         "`sip700 api-key new` prints (never the key itself; value hidden)")
    return value


def _check_tenant_id(value: str) -> str:
    if not _TENANT_ID.fullmatch(value):
        raise ValueError(f"must be 1-32 letters, digits, '_' or '-', starting with a letter or "
                         f"digit ({_q(value)})")
    return value


def _check_area(value: str) -> str:
    if not _AREA.fullmatch(value):
        raise ValueError(f"must be an area code: 0 and 2-3 digits, e.g. '010' ({_q(value)})")
    return value


KeyHashStr = Annotated[Str, AfterValidator(_check_key_hash)]


class ApiConfig(_Section):
    """The HTTP binding API (and its support console)."""

    listen: HostPortStr | None = None
    require_order_id: Bool = True
    max_ttl_s: Annotated[int, Strict(), Field(ge=60)] = 2592000
    # who may reveal the real numbers of a call record in the console (an audited action);
    # everyone else sees them masked
    console_reveal_records: Literal["none", "operators", "all"] = "none"


class PoolConfig(_Section):
    """Middle numbers a tenant allocates from: a range `FIRST-LAST` or a list, with an area."""

    range: Str | None = None
    numbers: tuple[Str, ...] | None = None
    area: Annotated[Str, AfterValidator(_check_area)] | None = None

    @field_validator("range")
    @classmethod
    def _valid_range(cls, value: str | None) -> str | None:
        if value is None:
            return None
        first, sep, last = value.replace(" ", "").partition("-")
        if not sep or not first.isdigit() or not last.isdigit():
            raise ValueError(f"expected FIRST-LAST, two middle numbers ({_q(value)})")
        if len(first) != len(last):
            raise ValueError(f"FIRST and LAST differ in length ({_q(value)})")
        if int(first) > int(last):
            raise ValueError(f"FIRST is after LAST ({_q(value)})")
        if int(last) - int(first) + 1 > MAX_POOL_RANGE:
            raise ValueError(f"more than {MAX_POOL_RANGE:,} numbers in one range; split it "
                             f"({_q(value)})")
        return value

    @field_validator("numbers")
    @classmethod
    def _digits(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None:
            for number in value:
                if not number.isdigit():
                    raise ValueError(f"not a middle number in national form ({_q(number)})")
            _no_duplicates(value, str)
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> PoolConfig:
        if (self.range is None) == (self.numbers is None):
            raise ValueError("set either range or numbers")
        return self

    def spans(self) -> list[tuple[int, int, str]]:
        """(first, last, key suffix) for each run of numbers in this entry."""
        if self.range is not None:
            first, _, last = self.range.replace(" ", "").partition("-")
            return [(int(first), int(last), "range")]
        return [(int(n), int(n), f"numbers[{i}]") for i, n in enumerate(self.numbers or ())]


def _check_http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL ({_q(value)})")
    return value


HttpUrlStr = Annotated[Str, AfterValidator(_check_http_url)]
CALL_EVENTS = ("start", "ring", "answer", "end")


class TenantConfig(_Section):
    """A platform using the binding API: its keys, its middle numbers, its limits, where its
    call records and call events are pushed."""

    id: Annotated[Str, AfterValidator(_check_tenant_id)]
    api_keys: tuple[KeyHashStr, ...] = ()
    pools: tuple[PoolConfig, ...] = ()
    max_pairs_per_x: Annotated[int, Strict(), Field(ge=1, le=100_000)] = 200
    rate_limit_per_s: PositiveInt = 1000
    # default maximum call duration of the tenant's calls (a binding's own max_call_s and
    # policy.max_call_s may be lower: the lowest wins)
    max_call_s: MaxCallSeconds | None = None
    # call records: POSTed as JSON arrays, signed with HMAC-SHA256 of records_secret
    records_url: HttpUrlStr | None = None
    records_secret: Annotated[Str, Field(min_length=16)] | None = None
    # call-status events (start, ring, answer, end), signed with the same secret
    events_url: HttpUrlStr | None = None
    events: tuple[Literal["start", "ring", "answer", "end"], ...] = CALL_EVENTS
    policy: TenantPolicyConfig | None = None  # anti-fraud rules for this tenant's calls

    @model_validator(mode="after")
    def _secret_for_push(self) -> TenantConfig:
        if (self.records_url or self.events_url) and not self.records_secret:
            raise ValueError("records_secret (16 characters or more) is required with "
                             "records_url or events_url: every push is signed with it")
        return self


class AuditConfig(_Section):
    """Where every change made through the API is recorded: a Redis Stream."""

    stream: TokenStr | None = None  # null: <store.key_prefix>audit
    redis_url: Str | None = None  # null: store.redis_url
    retention_days: PositiveInt = 400
    max_entries: PositiveInt | None = None

    @field_validator("redis_url")
    @classmethod
    def _valid_redis_url(cls, value: str | None) -> str | None:
        return _optional_redis_url(value)


class RecordsPushConfig(_Section):
    """How records and events reach tenants[].records_url / events_url."""

    enabled: Bool = True  # in worker 0 of `sip700 run` (or `sip700 records push` alone)
    group: TokenStr = "push"  # the consumer group on the streams
    consumer: TokenStr | None = None  # null: the host name
    batch_size: Annotated[int, Strict(), Field(ge=1, le=10_000)] = 100
    batch_wait_ms: NonNegativeInt = 200
    timeout_s: PositiveFloat = 5.0
    max_attempts: Annotated[int, Strict(), Field(ge=1, le=1000)] = 8
    backoff_ms: PositiveInt = 500
    max_backoff_s: PositiveFloat = 60.0


class RecordsConfig(_Section):
    """Call records (one per call attempt) and call events: Redis Streams, spool, push."""

    enabled: Bool = False
    stream: TokenStr = "sip700:records"
    events_stream: TokenStr = "sip700:call_events"
    dead_letter_stream: TokenStr = "sip700:records_dead"
    redis_url: Str | None = None  # null: store.redis_url (required with the memory store)
    key_prefix: TokenStr | None = None  # live calls and batch marks; null: store.key_prefix
    retention_days: PositiveInt = 90
    max_len: PositiveInt | None = None
    events_max_len: PositiveInt = 1_000_000
    flush_ms: Annotated[int, Strict(), Field(ge=1, le=10_000)] = 50
    spool_dir: Path = Field(default=Path("records-spool"), validate_default=True)
    spool_max_mb: PositiveInt = 512
    dedupe_window_s: PositiveInt = 3600
    instance: TokenStr | None = None  # null: the host name
    search_scan_max: PositiveInt = 200_000
    push: RecordsPushConfig = RecordsPushConfig()

    @field_validator("redis_url")
    @classmethod
    def _valid_redis_url(cls, value: str | None) -> str | None:
        return _optional_redis_url(value)

    @field_validator("spool_dir")
    @classmethod
    def _relative_to_config(cls, value: Path, info: ValidationInfo) -> Path:
        return (_base_dir(info) / value).resolve()


class Config(_Section):
    """The whole proxy configuration. Build it with `load_config`."""

    listen: tuple[ListenStr, ...] = Field(
        default=("udp:127.0.0.1:5060", "tcp:127.0.0.1:5060"), min_length=1
    )
    advertise: Str | None = Field(default=None, validate_default=True)
    trusted_peers: tuple[CidrStr, ...] = Field(default=("127.0.0.1/32",), min_length=1)
    allowed_next_hops: tuple[CidrStr, ...] = ()
    carrier: CarrierConfig
    middle_number_pattern: Str = r"^700\d{12}$"
    # A missing `store:` section is validated like an empty one, so the admin is told which
    # key is missing (store.bindings_file) rather than just "store".
    store: StoreConfig = Field(default_factory=dict, validate_default=True)  # type: ignore[arg-type]
    responses: ResponsesConfig = ResponsesConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    timers: TimersConfig = TimersConfig()
    transport: TransportConfig = TransportConfig()
    overload: OverloadConfig = OverloadConfig()
    workers: Annotated[int, BeforeValidator(_auto_workers), Strict(), Field(ge=1, le=1024)] = (
        Field(default="auto", validate_default=True)
    )
    # which CPU each worker runs on: auto (one each, when the workers are one per CPU of the
    # affinity mask), false (held as "off"), or a list (worker i on list[i mod len]);
    # see worker_cpus
    worker_cpu_affinity: Annotated[Literal["auto", "off"] | tuple[int, ...],
                                   BeforeValidator(_check_cpu_affinity)] = "auto"
    logging: LoggingConfig = LoggingConfig()
    metrics: MetricsConfig = MetricsConfig()
    api: ApiConfig = ApiConfig()
    operator_keys: tuple[KeyHashStr, ...] = ()
    tenants: tuple[TenantConfig, ...] = ()
    policy: PolicyConfig = PolicyConfig()
    audit: AuditConfig = AuditConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    health: HealthConfig = HealthConfig()
    # where `sip700 run` keeps its state file (pid, live config), found by `sip700 reload`
    # and `sip700 run --takeover`; null: $SIP700_RUNTIME_DIR, $XDG_RUNTIME_DIR/sip700 or
    # /tmp/sip700-<uid>
    runtime_dir: Path | None = None
    records: RecordsConfig = Field(default_factory=dict, validate_default=True)  # type: ignore[arg-type]

    @field_validator("listen")
    @classmethod
    def _unique_listen(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        _no_duplicates(value, parse_listen)
        sockets: dict[tuple[str, int], str] = {}
        for entry in value:  # tcp and tls are both TCP sockets: one port each
            e = parse_listen(entry)
            if e.transport == "udp":
                continue
            other = sockets.setdefault((e.host, e.port), entry)
            if other != entry:
                raise ValueError(f"{_q(other)} and {_q(entry)} are both TCP sockets on one "
                                 "port: give tls a port of its own (5061 by default)")
        return value

    @field_validator("advertise")
    @classmethod
    def _advertise_reachable(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            try:
                host = parse_host_port(value, default_port=DEFAULT_SIP_PORT).host
            except ValueError as exc:
                raise ValueError(f"{exc} ({_q(value)})") from None
            if _wildcard(host):
                raise ValueError(
                    f"must be an address peers can reach, not a wildcard ({_q(value)})"
                )
            return value
        listen = info.data.get("listen")
        if listen and _wildcard(parse_listen(listen[0]).host):
            raise ValueError(
                f"required when listen[0] binds a wildcard address ({_q(listen[0])}):"
                " set the address peers should send to"
            )
        return None

    @field_validator("middle_number_pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc} ({_q(value)})") from None
        return value

    @cached_property
    def listen_endpoints(self) -> tuple[ListenEndpoint, ...]:
        return tuple(parse_listen(entry) for entry in self.listen)

    @cached_property
    def advertised(self) -> HostPort:
        """The host:port written into Via and Record-Route; the port defaults to listen[0]'s."""
        first = self.listen_endpoints[0]
        if self.advertise is None:
            return HostPort(first.host, first.port)
        return parse_host_port(self.advertise, default_port=first.port)

    @cached_property
    def advertised_ports(self) -> dict[str, int]:
        """The port written into Via and Record-Route for each transport the proxy listens on:
        the advertised port for a transport listening on listen[0]'s port, else that
        transport's first listen port."""
        first = self.listen_endpoints[0].port
        ports: dict[str, int] = {}
        for e in self.listen_endpoints:
            if e.transport not in ports:
                ports[e.transport] = self.advertised.port if e.port == first else e.port
        return ports

    @cached_property
    def worker_ports(self) -> tuple[int, ...]:
        """Each worker's own SIP port (worker i: worker_port_base + i); none with one worker."""
        return self.worker_port_range(0)

    def worker_port_range(self, which: int) -> tuple[int, ...]:
        """Range 0 (worker_port_base + i) or range 1, the spare (worker_port_base + workers + i).

        An instance writes one range into its Via and Record-Route and also serves the other:
        an instance taking over (`sip700 run --takeover`) uses the range the running one does
        not, so both can forward at once during the hand-over; none with one worker.
        """
        if self.workers == 1:
            return ()
        base = self.transport.worker_port_base
        if base is None:
            # the first listen port + 1, moved past any listen port the range would cover (a
            # tls entry on 5061 next to udp/tcp on 5060)
            base = self.listen_endpoints[0].port + 1
            taken = {e.port for e in self.listen_endpoints}
            # both ranges (this instance's and the spare one of a takeover)
            while clash := [p for p in taken if base <= p < base + 2 * self.workers]:
                base = max(clash) + 1
        base += which * self.workers
        return tuple(range(base, base + self.workers))

    @cached_property
    def our_ports(self) -> frozenset[int]:
        """Every port a Route to this proxy may name: the listen ports, the advertised port and
        each worker's own ports (both ranges)."""
        return frozenset({e.port for e in self.listen_endpoints} | {self.advertised.port}
                         | set(self.worker_port_range(0)) | set(self.worker_port_range(1)))

    def worker_cpus(self) -> tuple[tuple[int, ...] | None, str]:
        """Each worker's CPU under `worker_cpu_affinity` on this machine, or None and why not
        (plan_worker_cpus; a listed CPU this process may not use is a ValueError)."""
        try:
            allowed = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            return None, "no CPU affinity on this system"
        return plan_worker_cpus(self.worker_cpu_affinity, self.workers, allowed, _quota_cpus())

    def port_problems(self) -> list[tuple[str, str]]:
        """(key path, problem) for worker ports the workers could not bind."""
        ports = self.worker_port_range(0) + self.worker_port_range(1)
        if not ports:
            return []
        key = "transport.worker_port_base"
        first, last = ports[0], ports[-1]
        what = (f"the workers' own ports {first}..{last} (worker_port_base + 0..2*workers-1: "
                f"a range in use and a spare one for a hand-over, workers: {self.workers}")
        unset = self.transport.worker_port_base is None
        what += "; unset, so past listen[0]'s port)" if unset else ")"
        if last > 65535:
            return [(key, f"{what} pass 65535: set a lower worker_port_base")]
        taken = sorted({e.port for e in self.listen_endpoints if first <= e.port <= last})
        if taken:
            listed = ", ".join(map(str, taken))
            return [(key, f"{what} overlap listen port {listed}: set worker_port_base to a "
                          "range of free ports")]
        metrics = self.metrics.endpoint
        tcp_hosts = {e.host for e in self.listen_endpoints if e.transport == "tcp"}
        if metrics is not None and any(
                h == metrics.host or _wildcard(h) or _wildcard(metrics.host) for h in tcp_hosts):
            # the metrics endpoint of worker i listens on metrics.listen's port + i
            m_first, m_last = metrics.port, metrics.port + self.workers - 1
            if m_first <= last and first <= m_last:
                return [(key, f"{what} overlap the metrics ports {m_first}..{m_last} "
                              "(metrics.listen's port + worker index): set worker_port_base "
                              "to a range of free ports")]
        return []

    def api_problems(self) -> list[tuple[str, str]]:
        """(key path, problem) for tenants, keys and pools that cannot work together."""
        problems: list[tuple[str, str]] = []
        seen_ids: dict[str, int] = {}
        seen_keys: dict[str, str] = {}
        for index, key in enumerate(self.operator_keys):
            if key in seen_keys:
                problems.append((f"operator_keys[{index}]", "duplicate key hash"))
            seen_keys[key] = f"operator_keys[{index}]"
        for t, tenant in enumerate(self.tenants):
            if tenant.id in seen_ids:
                problems.append((f"tenants[{t}].id", f"duplicate tenant id {_q(tenant.id)} "
                                                     f"(also tenants[{seen_ids[tenant.id]}])"))
            seen_ids.setdefault(tenant.id, t)
            for k, key in enumerate(tenant.api_keys):
                where = f"tenants[{t}].api_keys[{k}]"
                if key in seen_keys:
                    problems.append((where, f"the same key hash as {seen_keys[key]}: a key "
                                            "belongs to one tenant"))
                seen_keys.setdefault(key, where)
        problems += self._pool_problems()
        if self.audit.redis_url is not None and self.store.backend == "redis":
            problems.append(("audit.redis_url", "only for the memory store: with the Redis store "
                                                "the audit entry is written by the same script "
                                                "as the change, in the store's Redis"))
        if self.records.enabled and self.records.redis_url is None:
            if self.store.backend == "memory":
                problems.append(("records.redis_url", "required with the memory store (records "
                                                      "live in a Redis Stream)"))
            elif self.store.cluster is not None:
                problems.append(("records.redis_url", "required with store.cluster: records "
                                                      "are written in one transaction per "
                                                      "batch, on a standalone Redis"))
        if self.policy_enabled and self.policy.redis_url is None:
            if self.store.backend == "memory":
                problems.append(("policy.redis_url", "required with the memory store (the "
                                                     "policy's caps, concurrency and "
                                                     "blocklists are shared through Redis)"))
            elif self.store.cluster is not None:
                problems.append(("policy.redis_url", "required with store.cluster: the "
                                                     "policy's scripts need a standalone "
                                                     "Redis (or Sentinel)"))
        if any(t.records_url or t.events_url for t in self.tenants) and not self.records.enabled:
            problems.append(("records.enabled", "tenants push records or events "
                                                "(records_url / events_url): set it to true"))
        if self.api.listen is not None and self.store.cluster is not None:
            problems.append(("api.listen", "the binding API allocates in one Lua script over "
                                           "a pool's numbers: it needs standalone Redis or "
                                           "Sentinel, not store.cluster"))
        return problems

    def _pool_problems(self) -> list[tuple[str, str]]:
        """Numbers outside the 700 pattern; a number in two pool entries (one tenant or two)."""
        problems: list[tuple[str, str]] = []
        spans: list[tuple[int, int, str, str]] = []  # first, last, key path, tenant
        pattern = self.middle_number_regex
        for t, tenant in enumerate(self.tenants):
            for p, pool in enumerate(tenant.pools):
                for first, last, suffix in pool.spans():
                    where = f"tenants[{t}].pools[{p}].{suffix}"
                    width = len(pool.range.partition("-")[0].strip()) if pool.range else 0
                    ends = {str(first).zfill(width), str(last).zfill(width)}
                    bad = [n for n in sorted(ends) if not pattern.search(n)]
                    if bad:
                        problems.append((where, f"{bad[0]} does not match "
                                                "middle_number_pattern"))
                    spans.append((first, last, where, tenant.id))
        spans.sort()
        reach: tuple[int, int, str, str] | None = None  # the span reaching furthest so far
        for span in spans:
            if reach is not None and span[0] <= reach[1]:
                owner = (f"tenant {_q(reach[3])}" if reach[3] != span[3]
                         else "the same tenant")
                problems.append((span[2], f"overlaps {reach[2]} ({owner}) at "
                                          f"{span[0]}: a pool number belongs to exactly one "
                                          "tenant and one pool entry"))
            if reach is None or span[1] > reach[1]:
                reach = span
        return problems

    def tls_problems(self) -> list[tuple[str, str]]:
        """(key path, problem) for TLS settings the listen entries need."""
        tls = self.transport.tls
        if any(e.transport == "tls" for e in self.listen_endpoints) and (
                tls.certificate_file is None):
            return [("transport.tls.certificate_file",
                     "required with a tls: listen entry (and private_key_file)")]
        return []

    @cached_property
    def trusted_networks(self) -> tuple[IPNetwork, ...]:
        return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in self.trusted_peers)

    def is_trusted(self, address: str) -> bool:
        """Whether a peer IP may send initial requests (IPv4-mapped IPv6 counts as IPv4)."""
        return _in_networks(address, self.trusted_networks)

    @cached_property
    def next_hop_networks(self) -> tuple[IPNetwork, ...]:
        return tuple(ipaddress.ip_network(c.strip(), strict=False)
                     for c in self.allowed_next_hops)

    def is_allowed_next_hop(self, address: str) -> bool:
        """Whether an IP is in allowed_next_hops (beyond trusted peers and gateways)."""
        return _in_networks(address, self.next_hop_networks)

    def is_gateway_address(self, address: str) -> bool:
        """Whether an IP is one of the carrier gateways' (the far end of the trunk)."""
        return address in {t.host for t in self.carrier.targets}

    @property
    def policy_enabled(self) -> bool:
        """Whether each call goes through the anti-fraud policy (proxy/policy)."""
        if self.policy.enabled is not None:
            return self.policy.enabled
        return self.policy.has_rules() or any(
            t.policy is not None and t.policy.has_rules() for t in self.tenants)

    @cached_property
    def middle_number_regex(self) -> re.Pattern[str]:
        return re.compile(self.middle_number_pattern)


def _in_networks(address: str, networks: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        candidates.append(ip.ipv4_mapped)
    return any(c in net for c in candidates for net in networks)


# ---------------------------------------------------------------------------------------------
# Loading and error reporting.
# ---------------------------------------------------------------------------------------------

_YamlLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _ConfigLoader(_YamlLoader):  # type: ignore[misc, valid-type]
    """Safe loader that records duplicate keys: YAML would silently keep the last one."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicate_keys: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[str, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
                continue
            line = key_node.start_mark.line + 1
            if key_node.value in first_line:
                self.duplicate_keys.append(
                    f"line {line}, column {key_node.start_mark.column + 1}: duplicate key "
                    f"{_q(key_node.value)} (first at line {first_line[key_node.value]})"
                )
            else:
                first_line[key_node.value] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(text: str, shown: str) -> tuple[Any, list[str]]:
    """The document and any problems; a syntax error names its line and column."""
    loader = _ConfigLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem and exc.context_mark:
            what += f" ({exc.context} at line {exc.context_mark.line + 1})"
        return None, [f"{shown}: {where}{what}"]
    except yaml.YAMLError as exc:
        return None, [f"{shown}: invalid YAML: {exc}"]
    finally:
        loader.dispose()
    return data, [f"{shown}: {d}" for d in loader.duplicate_keys]


def _key_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _show(value: Any) -> str:
    """A short rendering of a bad value, in YAML's words where they differ from Python's."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    text = _q(value) if isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The schema section at a key path, to suggest the intended key for an unknown one."""
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        nested = [
            t
            for t in (field.annotation, *typing.get_args(field.annotation))
            if isinstance(t, type) and issubclass(t, BaseModel)
        ]
        if not nested:
            return None
        model = nested[0]
    return model


_SECRET_KEYS = frozenset({"dialog_key", "api_keys", "operator_keys"})
_TYPE_WORDS = {
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "model_type": "must be a mapping",
    "dict_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
}


def _describe(error: Any) -> str:
    """One pydantic error as an admin-readable sentence."""
    kind, loc, ctx = error["type"], error["loc"], error.get("ctx") or {}
    if kind == "missing":
        return "required key missing"
    if kind == "extra_forbidden":
        section = _model_at(loc[:-1])
        hint = (
            difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1)
            if section
            else []
        )
        return "unknown key" + (f" (did you mean {_q(hint[0])}?)" if hint else "")
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind == "too_short" and ctx.get("min_length") == 1:
        return "must not be empty"
    message = _TYPE_WORDS.get(kind) or error["msg"].replace("Input should", "must", 1)
    shown = "hidden" if loc and loc[-1] in _SECRET_KEYS else _show(error["input"])
    return f"{message} (got {shown})"


def _validate(data: dict[str, Any], base_dir: Path, shown: str) -> tuple[Config | None, list[str]]:
    try:
        config = Config.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    else:
        # what one section cannot see: keys of several sections that must fit together
        clashes = [f"{shown}: {path}: {problem}"
                   for path, problem in (*config.port_problems(), *config.api_problems(),
                                          *config.tls_problems())]
        return (None, clashes) if clashes else (config, [])
    # A list whose only items are bad is also "too short after validation": say it once.
    bad_items = {e["loc"][:-1] for e in errors if e["loc"] and isinstance(e["loc"][-1], int)}
    problems = []
    for error in errors:
        if error["type"] == "too_short" and error["loc"] in bad_items:
            continue
        path = _key_path(error["loc"])
        problems.append(f"{shown}: {path + ': ' if path else ''}{_describe(error)}")
    return None, problems


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_environment(text: str, shown: str, env: typing.Mapping[str, str] | None = None
                       ) -> tuple[str, list[str]]:
    """`${NAME}` and `${NAME:-default}` replaced by the environment's value (containers set
    `advertise`, `trusted_peers` … this way); an unset NAME without a default is a problem."""
    env = os.environ if env is None else env
    problems: list[str] = []

    def value(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        got = env.get(name)
        if got is None or (got == "" and default is not None):
            if default is None:
                line = text.count("\n", 0, m.start()) + 1
                problems.append(f"{shown}: line {line}: environment variable {name} is not set "
                                f"(write ${{{name}:-default}} to give a default)")
                return ""
            return default
        return got

    return _ENV_REF.sub(value, text), problems


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raise ConfigError listing every problem found."""
    path = Path(path)
    shown = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{shown}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{shown}: not UTF-8 text (byte {exc.start})"]) from None
    return load_config_text(text, path)


def load_config_text(text: str, path: str | Path) -> Config:
    """Validate the text of the config file at `path` (relative paths resolve against its
    directory); raise ConfigError listing every problem found."""
    path = Path(path)
    shown = str(path)
    text, problems = expand_environment(text, shown)
    if problems:
        raise ConfigError(problems)
    data, problems = _read_yaml(text, shown)
    if data is None and not problems:
        problems = [f"{shown}: the file is empty; expected a mapping of settings (see proxy.yaml)"]
    elif data is not None and not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a single value ({_show(data)})"
        problems = [*problems, f"{shown}: the document is {kind}; expected a mapping of settings"]
    if problems and not isinstance(data, dict):
        raise ConfigError(problems)
    config, invalid = _validate(data, path.parent.resolve(), shown)
    problems += invalid
    if problems or config is None:
        raise ConfigError(problems)
    return config


def load_config_or_report(path: str | Path) -> Config | None:
    """For commands: the config, or None after printing every problem to stderr."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def check_config(path: str | Path) -> list[str]:
    """Every problem in a config file, or an empty list if the proxy can start with it."""
    try:
        load_config(path)
    except ConfigError as exc:
        return exc.problems
    return []
