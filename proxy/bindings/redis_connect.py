"""Redis clients from the store config: URL (redis://, rediss://, unix://), Sentinel or Cluster.

Two kinds of client: the command client (str replies, every command bounded by the caller's
timeout) and a bytes client per pub/sub link (redis-py's pub/sub PING handling needs bytes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

PubSubClientFactory = Callable[[int], aioredis.Redis]  # attempt number -> fresh client


def split_address(address: str) -> tuple[str, int]:
    """'host:port' (or '[v6]:port') → (host, port)."""
    host, _, port = address.rpartition(":")
    if not host:
        return address, 26379
    return host.strip("[]"), int(port)


def _is_tls(connection_class: object) -> bool:
    return isinstance(connection_class, type) and issubclass(connection_class, SSLConnection)


def _url_options(url: str) -> dict[str, Any]:
    """Credentials, db, TLS from the URL; host/port dropped for Sentinel and Cluster."""
    options = parse_url(url)
    for key in ("host", "port", "path"):
        options.pop(key, None)
    return options


def connect(store_cfg: Any) -> tuple[Any, PubSubClientFactory]:
    """The command client and a factory of pub/sub clients for `store_cfg`."""
    url: str = getattr(store_cfg, "redis_url", None) or "redis://127.0.0.1:6379/0"
    timeout_s = float(getattr(store_cfg, "timeout_ms", 200)) / 1000.0
    common: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        # One quick retry replaces a pooled connection that died with a restarted server;
        # the store's own deadline bounds the whole call anyway.
        "retry": Retry(NoBackoff(), 1),
        "client_name": "sip700",
    }
    sentinel_cfg = getattr(store_cfg, "sentinel", None)
    cluster_cfg = getattr(store_cfg, "cluster", None)

    if sentinel_cfg is not None:
        options = {**_url_options(url), **common}
        if _is_tls(options.pop("connection_class", None)):
            options["ssl"] = True
        sentinel = Sentinel(
            [split_address(a) for a in sentinel_cfg.addresses],
            sentinel_kwargs={"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s},
            **options,
        )
        service = sentinel_cfg.service_name
        client = sentinel.master_for(service, decode_responses=True)

        def sentinel_pubsub(_attempt: int) -> aioredis.Redis:
            return sentinel.master_for(service, decode_responses=False)

        return client, sentinel_pubsub

    if cluster_cfg is not None:
        options = _url_options(url)
        options.pop("db", None)  # Cluster has db 0 only
        ssl = _is_tls(options.pop("connection_class", None))
        nodes = [split_address(a) for a in cluster_cfg.startup_nodes]
        client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in nodes],
            decode_responses=True,
            ssl=ssl,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
            **{k: v for k, v in options.items() if k in ("username", "password")},
        )

        def cluster_pubsub(attempt: int) -> aioredis.Redis:
            # PUBLISH reaches every node of a cluster, so any node serves the subscription;
            # rotate through the startup nodes as reconnects fail.
            host, port = nodes[attempt % len(nodes)]
            return aioredis.Redis(
                host=host,
                port=port,
                ssl=ssl,
                socket_connect_timeout=timeout_s,
                **{k: v for k, v in options.items() if k in ("username", "password")},
            )

        return client, cluster_pubsub

    client = aioredis.Redis.from_url(url, decode_responses=True, **common)

    def url_pubsub(_attempt: int) -> aioredis.Redis:
        return aioredis.Redis.from_url(url, socket_connect_timeout=timeout_s)

    return client, url_pubsub
