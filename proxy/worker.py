"""One worker process: the proxy core, its sockets, its metrics endpoint, and what it does on
each signal (see `proxy.supervisor` for the table).

A worker takes a new config (hot reload) between two messages: new calls use it, calls in
progress keep what they were set up with. On SIGTERM it drains: no new calls (503 with
Retry-After, or it stops listening on the shared port), transactions in progress finish within
`shutdown.drain_s`, then it exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import structlog

from proxy import compiled, logs
from proxy.config import Config, load_config_text
from proxy.logs import flush as flush_logs
from proxy.logs import records_dropped

log = structlog.get_logger("sip700")
GC_YOUNG_THRESHOLD = 100_000  # automatic passes: a backstop to `YoungCollector`
# Each pass walks what survived since the last one, so the cadence sets the length of a pause,
# not the total work (every survivor is walked once per generation either way): short passes
# keep the tail latency down (`run.sh project 3000 20`, p99 12.8-13.6 ms with 0.1 s / 2 s,
# 4.3-4.5 ms with 0.05 s / 0.2 s, at the same CPU).
GC_YOUNG_EVERY_S = 0.05  # collect generation 0 this often
GC_MIDDLE_EVERY = 4  # … and generation 1 every 4th time (0.2 s)

PR_SET_PDEATHSIG = 1
SPARE_POLL_S = 0.05  # how soon a worker takes the spare port range once it is free
DRAIN_LINGER_S = 0.5  # after the last transaction in progress is answered
HANDOVER_TIMEOUT_S = 120.0  # a takeover's SIGTERM that has not come by then never will


def dialog_key(cfg: Config) -> bytes:
    """The configured AES-256-GCM key, or a random one (with a warning) for this run only."""
    key = cfg.privacy.dialog_key_bytes
    if key is None:
        key = os.urandom(32)
        log.warning("dialog_key_generated",
                    detail="no privacy.dialog_key configured: calls do not survive a restart "
                           "and instances cannot serve each other's dialogs")
    return key


def core_settings(cfg: Config, index: int = 0, count: int = 1, port_range: int = 0,
                  former_gateways: frozenset[str] = frozenset()) -> Any:
    """The core's settings for worker `index` of `count` (its own port from `port_range`).

    `former_gateways`: hosts of gateways a reload removed, still accepted for in-dialog
    requests of the calls set up through them.
    """
    from proxy.core import CoreSettings, FinalResponse, Hop
    from proxy.flood import FloodSettings
    from proxy.gateways import ProbeSettings
    from proxy.privacy import PrivacyPolicy
    from proxy.sip.transaction import TimerSettings

    adv = cfg.advertised
    pattern = cfg.middle_number_regex
    r = cfg.responses
    t = cfg.timers
    ports = cfg.worker_port_range(port_range)
    several = count > 1 and bool(ports)
    gateway_hosts = frozenset(t.host for t in cfg.carrier.targets) | former_gateways
    tport = cfg.advertised_ports
    # RFC 3261 §18.1.1: a large request goes over TCP to a gateway also configured with TCP
    # on its address, or to any next hop with transport.large_requests_over_tcp
    tcp_gateways = {(g.host, g.port) for g in cfg.carrier.targets if g.transport == "tcp"}
    all_take_tcp = cfg.transport.large_requests_over_tcp
    flood = cfg.policy.flood
    return CoreSettings(
        advertise_host=adv.host,
        advertise_port=ports[index] if several else adv.port,
        our_ports=cfg.our_ports if several else frozenset(),
        is_trusted=functools.lru_cache(maxsize=4096)(cfg.is_trusted),
        middle_number=lambda n: pattern.search(n) is not None,
        gateways=[Hop(g.host, g.port, g.transport) for g in cfg.carrier.targets],
        gateway_strategy=cfg.carrier.strategy,
        mask_numbers=cfg.privacy.mask_numbers_in_logs,
        timer_settings=TimerSettings(t1=t.t1_ms / 1000, t2=t.t2_ms / 1000, t4=t.t4_ms / 1000),
        timer_c=t.timer_c_s,
        trying_after=t.trying_after_ms / 1000,
        worker_index=index,
        is_gateway_address=gateway_hosts.__contains__,
        is_allowed_next_hop=functools.lru_cache(maxsize=4096)(cfg.is_allowed_next_hop),
        privacy=PrivacyPolicy(
            to_header=cfg.privacy.to_header,
            add_asserted_identity=cfg.privacy.add_asserted_identity,
            unreadable_body=cfg.privacy.unreadable_body,
            isup=cfg.privacy.isup,
            refer=cfg.privacy.refer,
        ),
        max_dialog_s=cfg.privacy.max_dialog_s,
        max_invite_lifetime=t.max_invite_lifetime_s,
        lookup_deadline=cfg.store.lookup_deadline_ms / 1000,
        retry_after_s=cfg.store.retry_after_s,
        no_binding=FinalResponse(r.no_binding.code, r.no_binding.reason),
        not_party=FinalResponse(r.not_party.code, r.not_party.reason),
        not_middle_number=FinalResponse(r.not_middle_number.code, r.not_middle_number.reason),
        untrusted_peer=FinalResponse(r.untrusted_peer.code, r.untrusted_peer.reason),
        store_unavailable=FinalResponse(r.store_unavailable.code, r.store_unavailable.reason),
        direction_restricted=FinalResponse(r.direction_restricted.code,
                                           r.direction_restricted.reason),
        no_gateway=FinalResponse(r.no_gateway.code, r.no_gateway.reason),
        route_refused=FinalResponse(r.route_refused.code, r.route_refused.reason),
        overloaded=FinalResponse(r.overloaded.code, r.overloaded.reason),
        no_gateway_retry_after_s=cfg.carrier.retry_after_s,
        overload_retry_after_s=cfg.overload.retry_after_s,
        router=build_router(cfg),
        branch_timeout=cfg.carrier.branch_timeout_ms / 1000,
        probe=ProbeSettings(
            enabled=None if cfg.carrier.probe.enabled == "auto" else cfg.carrier.probe.enabled,
            interval=cfg.carrier.probe.interval_s,
            down_after=cfg.carrier.probe.down_after,
            up_after=cfg.carrier.probe.up_after,
            alive_codes=frozenset(cfg.carrier.probe.alive_codes),
        ),
        # stream legs name the shared port their connections reach (see config.advertised_ports)
        transport_ports={k: v for k, v in tport.items() if k != "udp"},
        large_request_bytes=cfg.transport.large_request_bytes,
        takes_tcp=lambda host, port: all_take_tcp or (host, port) in tcp_gateways,
        **policy_settings(cfg),
        max_call_s=cfg.policy.max_call_s,
        tenant_max_call_s={t.id: t.max_call_s for t in cfg.tenants if t.max_call_s},
        flood=FloodSettings(flood.max_requests_per_s, flood.cooldown_s, flood.action,
                            flood.trusted_limit) if flood.enabled else None,
    )


def policy_settings(cfg: Config) -> dict[str, Any]:
    """The core's view of the anti-fraud policy: on or off, its deadline, concurrency."""
    from proxy.core import FinalResponse
    from proxy.policy.spec import compile_policy

    refusal = cfg.policy.refusal
    answer = {"policy_refusal": FinalResponse(refusal.code, refusal.reason)}
    spec = compile_policy(cfg)
    if spec is None:
        return answer  # a binding's own time window is checked all the same (in the core)
    hooks = [h.timeout_s for h in spec.webhooks.values()]
    # the shell bounds both steps itself (Redis time-out, webhook time-out): this is a net
    return {**answer, "policy": True, "policy_holds": spec.has_concurrency,
            "policy_deadline": 1.0 + spec.timeout_s + max(hooks, default=0.0)}


def build_core(cfg: Config, key: bytes, index: int = 0, count: int = 1, *,
               port_range: int = 0, metrics: Any = None) -> Any:
    """The sans-IO proxy core of worker `index` of `count`, configured from `cfg`.

    With several workers, each advertises its own port in Via and Record-Route, and takes a
    Route to any of the proxy's ports as one to itself. `metrics` (a WorkerMetrics) gets the
    latencies of every call from the call log.
    """
    from proxy.core import ProxyCore
    from proxy.privacy import DialogSealer

    call_log = logs.info_logger("sip700.calls")
    if metrics is not None:
        call_log = metrics.call_log(call_log)
    core = ProxyCore(core_settings(cfg, index, count, port_range), DialogSealer(key),
                     log=call_log)
    if cfg.records.enabled:  # call records: the tracker the core feeds (proxy/records)
        from proxy.records.tracker import CallTracker
        from proxy.records.writer import event_tenants, instance_name

        core.calls = CallTracker(instance_name(cfg, index), event_tenants=event_tenants(cfg))
        core.calls.stats = core.stats  # its counters are the worker's
    return core


def build_router(cfg: Config) -> Any:
    """The carrier's gateway groups and prefix routes, from `carrier:`. A gateway listed in
    several groups is one object (one health state)."""
    from proxy.config import uri_has_port
    from proxy.dns import is_name
    from proxy.gateways import REFUSED, Gateway, GatewayGroup, Router

    carrier = cfg.carrier
    known: dict[tuple, Gateway] = {}

    def group(name: str, entries: Any) -> GatewayGroup:
        members = []
        for entry, (target, priority, weight) in zip(entries, carrier.ranked(entries),
                                                      strict=True):
            key = (*target[:4], priority, weight)
            gw = known.get(key)
            if gw is None:
                by_name = is_name(target.host)
                gw = known[key] = Gateway(
                    str(target), target.host, target.port, target.transport, priority, weight,
                    by_name=by_name, explicit_port=not by_name or uri_has_port(entry.uri))
            members.append(gw)
        return GatewayGroup(name, members)

    groups = {name: group(name, entries) for name, entries in carrier.groups.items()}
    routes = {r.prefix: (REFUSED if r.refuse else r.group) for r in carrier.routes}
    return Router(group("default", carrier.gateways), groups, routes)


def tls_contexts(cfg: Config) -> tuple[Any, Any, dict[tuple[str, int], str]]:
    """The TLS contexts for accepted and for opened connections (None where the config needs
    none), and the name each TLS gateway's certificate must carry."""
    tls = cfg.transport.tls
    listens = any(e.transport == "tls" for e in cfg.listen_endpoints)
    gateways = [g for g in cfg.carrier.targets if g.transport == "tls"]
    if not listens and not gateways and tls.certificate_file is None:
        return None, None, {}
    from proxy.tls import client_context, server_context

    server = server_context(tls) if listens else None
    return server, client_context(tls), {(g.host, g.port): g.host for g in gateways}


async def resolve_gateway_names(cfg: Config, router: Any, on_change: Any,
                                 *, fatal: bool = True) -> Any:
    """Resolve the gateways given by name (RFC 3263) and keep them fresh; None when every
    gateway is an IP address. A name that gives no address stops the worker (SystemExit)
    when `fatal`, else it is logged and its gateway has no address (takes no calls)."""
    from proxy.dns import GatewayResolver, make_resolver

    gateways = [gw for gw in router.all_gateways() if gw.by_name]
    if not gateways:
        return None
    names = GatewayResolver(gateways, make_resolver(cfg.carrier.dns.servers,
                                                    cfg.carrier.dns.timeout_ms / 1000),
                            on_change=on_change)
    problems = await names.resolve_all()
    for problem in problems:
        log.error("gateway_unresolved", problem=problem)
    if problems and fatal:
        names.close()
        raise SystemExit(1)
    return names


def gateway_name_problems(cfg: Config) -> list[str]:
    """`carrier...: <uri>: <why>` for each gateway name that gives no address now."""
    from proxy.dns import GatewayResolver, make_resolver

    gateways = [gw for gw in build_router(cfg).all_gateways() if gw.by_name]
    if not gateways:
        return []

    async def check() -> list[str]:
        names = GatewayResolver(gateways, make_resolver(cfg.carrier.dns.servers,
                                                        cfg.carrier.dns.timeout_ms / 1000))
        try:
            return await names.resolve_all()
        finally:
            names.close()

    return [f"carrier: gateway {p} (does not resolve)" for p in asyncio.run(check())]


def open_store_frozen(cfg: Config) -> Any:
    """Open the store; the memory backend loads its file here (before any fork)."""
    from proxy.bindings.store import open_store

    store = open_store(cfg)
    # Long-lived start-up objects (100k+ bindings) move out of the collector's reach: a full
    # collection over them is a pause of hundreds of milliseconds on the call path (and, after
    # a fork, the collector would touch and so copy every shared page).
    gc.collect()
    gc.freeze()
    return store


class YoungCollector:
    """Collect the young generations on a clock rather than on the allocation count: each
    pass then walks only what was made since the last one (a millisecond or so), never a
    backlog of every live call (see Worker.run). Called by the transport's tick, so it costs
    no wake-up of its own: generation 0 every `every_s`, generation 1 every `middle_every`-th
    time."""

    __slots__ = ("count", "every_s", "middle_every", "next_at")

    def __init__(self, every_s: float = GC_YOUNG_EVERY_S,
                 middle_every: int = GC_MIDDLE_EVERY) -> None:
        self.every_s = every_s
        self.middle_every = middle_every
        self.next_at: float | None = None
        self.count = 0

    def __call__(self, now: float) -> None:
        if self.next_at is None:
            self.next_at = now + self.every_s
            return
        if now < self.next_at:
            return
        self.next_at = now + self.every_s
        self.count += 1
        gc.collect(1 if self.count % self.middle_every == 0 else 0)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` when the supervisor dies (Linux PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


class Worker:
    """One worker: serves until told to stop; see `run`."""

    def __init__(self, cfg: Config, key: bytes, store: Any = None, *, index: int = 0,
                 count: int = 1, group: str = "", relay_key: bytes = b"", port_range: int = 0,
                 supervisor_pid: int | None = None, ready_fd: int | None = None,
                 generation: int = 1, config_path: str = "", board: Any = None) -> None:
        self.cfg = cfg
        self.board = board  # proxy/steering.py's Board, shared by the workers (None: off)
        self.key = key
        self.store = store
        self.index = index
        self.count = count
        self.group = group
        self.relay_key = relay_key
        self.port_range = port_range
        self.supervisor_pid = supervisor_pid
        self.ready_fd = ready_fd
        self.generation = generation
        self.config_path = config_path
        self.draining = False
        self.records_writer: Any = None  # proxy/records/writer.py, when records are on
        self.handover = False  # another instance is taking over: release ports, then drain
        self.core: Any = None
        self.server: Any = None
        self.metrics: Any = None
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._spare: asyncio.Task[None] | None = None
        self._reloading = False
        self._former_gateways: Any = None
        self.names: Any = None  # gateway names kept resolved (proxy/dns.py)

    # ---- life --------------------------------------------------------------------------------
    async def run(self) -> None:
        """Open everything, serve until drained or stopped, then close everything."""
        from proxy.metrics import MeteredStore, WorkerMetrics
        from proxy.reload import GatewayMemory
        from proxy.transport import ProxyServer

        cfg = self.cfg
        if self.store is None:
            self.store = open_store_frozen(cfg)
        else:  # the supervisor's, shared copy-on-write since the fork
            own_pages = getattr(self.store, "own_pages", None)
            if own_pages is not None:
                own_pages()
        # Call state is freed by reference counting (the core breaks its one cycle when a
        # transaction pair ends), so the oldest generation is never collected automatically:
        # full passes over the live calls and the Redis store's cache were pauses of hundreds
        # of ms. A pass over the young ones costs about 0.35 µs an object, but the automatic
        # trigger counts net new objects only: in steady state it fires rarely, and then
        # walks everything every call made since (100,000 objects and more, 40-600 ms in the
        # Redis soak of 2026-12-02). So the worker collects the young generation itself,
        # often and small (`YoungCollector`).
        gc.set_threshold(GC_YOUNG_THRESHOLD, 1000, 1000)
        start = getattr(self.store, "start", None)
        if start is not None:
            await start()
        self._former_gateways = GatewayMemory()
        self.metrics = WorkerMetrics()
        self.core = build_core(cfg, self.key, self.index, self.count,
                               port_range=self.port_range, metrics=self.metrics)
        self.names = await resolve_gateway_names(cfg, self.core.router,
                                                 self.core.refresh_gateway_ips)
        ports = cfg.worker_port_range(self.port_range)
        worker_port = ports[self.index] if self.count > 1 and ports else None
        tls_server, tls_client, tls_names = tls_contexts(cfg)
        self.server = ProxyServer(
            self.core, MeteredStore(self.store, self.metrics.store_resolve),
            listen=[(e.transport, e.host, e.port) for e in cfg.listen_endpoints],
            udp_rcvbuf=cfg.transport.udp_rcvbuf_bytes,
            udp_sndbuf=cfg.transport.udp_sndbuf_bytes,
            tcp_idle_timeout=cfg.transport.tcp_idle_timeout_s,
            tcp_max_connections=cfg.transport.tcp_max_connections,
            tcp_max_connections_per_source=cfg.transport.tcp_max_connections_per_source,
            tcp_max_output_bytes=cfg.transport.tcp_max_output_bytes,
            max_message_bytes=cfg.transport.max_message_bytes,
            worker_index=self.index, worker_count=self.count, relay_group=self.group,
            relay_key=self.relay_key, worker_port=worker_port,
            overload=cfg.overload if cfg.overload.enabled else None,
            tls_server=tls_server, tls_client=tls_client,
            tls_handshake_timeout=cfg.transport.tls.handshake_timeout_s,
            tls_server_names=tls_names,
            steering_board=self.board,
            steering_thresholds=(cfg.transport.low_load if cfg.transport.low_load.enabled
                                 else None),
        )
        await self._start_policy(cfg)
        metrics_server = await self._serve_metrics()
        api_server = follower = None
        if cfg.api.listen is not None:  # the binding API: in worker 0 (see proxy/api/server.py)
            from proxy.api.server import journal_follower, start_api

            journal_dir = (self.group if self.count > 1 and cfg.store.backend == "memory"
                           else None)
            if self.index == 0:
                api_server = await start_api(cfg, self.store, journal_dir)
            elif journal_dir:
                follower = journal_follower(cfg, self.store, journal_dir)
        writer = pusher = None
        if self.core.calls is not None:
            from proxy.records.writer import build_writer

            writer = build_writer(cfg, self.core.calls, self.index)
            writer.start()
            self.records_writer = writer
            if self.index == 0 and cfg.records.push.enabled and any(
                    t.records_url or t.events_url for t in cfg.tenants):
                from proxy.records.push import RecordPusher

                pusher = RecordPusher.from_config(cfg)
                pusher.stats = self.core.stats
                pusher.start()
        try:
            await self.server.start()  # last: an open SIP port means everything else is ready
        except OSError as exc:
            raise OSError(exc.errno, f"{exc.strerror} (binding {self._addresses()})") from None
        loop = asyncio.get_running_loop()
        self._watch(self.metrics.watch_loop_lag())
        self.metrics.watch_gc(log.warning)
        self.server.young_collector = YoungCollector()  # run by the tick: no wake-up of its own
        self._watch(self._watch_parent())
        spare = cfg.worker_port_range(1 - self.port_range)
        if worker_port is not None and spare:
            self._spare = self._watch(self._take_spare(spare[self.index]))
        handlers = ((signal.SIGTERM, self._on_term), (signal.SIGINT, self._on_term),
                    (signal.SIGQUIT, self.stop_now), (signal.SIGHUP, self._on_hup),
                    (signal.SIGUSR1, self._on_status), (signal.SIGUSR2, self._on_handover))
        for sig, handler in handlers:
            loop.add_signal_handler(sig, handler)
        log.info("listening", listen=[str(e) for e in cfg.listen_endpoints],
                 advertise=str(cfg.advertised), backend=cfg.store.backend,
                 worker=self.index, workers=self.count, worker_port=worker_port,
                 config=self.config_path, generation=self.generation,
                 compiled=compiled.status())
        stale = compiled.stale_modules()
        if stale:  # their .py changed after scripts/build-compiled: the sources run instead
            log.warning("compiled_stale", modules=stale, running="source",
                        fix="scripts/build-compiled, or scripts/build-compiled --clean")
        if self.ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.ready_fd, b"R")
                os.close(self.ready_fd)
            self.ready_fd = None
        await self._stop.wait()
        await _drain_logs(1.0)  # room for the stopping line, if stdout is being read at all
        await self.server.close()
        if writer is not None:  # the last records written (or spooled) before the counters
            await writer.close()
        stats = dict(self.core.stats)
        if records_dropped():
            stats["log_records_dropped"] = records_dropped()
        log.info("stopping", stats=stats, worker=self.index)
        self.metrics.unwatch_gc()
        for task in self._tasks:
            task.cancel()
        if pusher is not None:
            await pusher.close()
        if self.server.policy is not None:
            await self.server.policy.close()
        if api_server is not None:
            await api_server.close()
        if follower is not None:
            await follower.close()
        if metrics_server is not None:
            metrics_server.close()
        await self.store.close()
        if self.names is not None:
            self.names.close()
        await _drain_logs(1.0)

    async def _start_policy(self, cfg: Config) -> None:
        """The anti-fraud policy's shell, when the config has a policy (or a reload adds one):
        the rules of a reloaded config apply to new calls; its Redis stays the running one."""
        from proxy.policy.runner import PolicyRunner
        from proxy.policy.spec import compile_policy

        spec = compile_policy(cfg)
        runner = self.server.policy
        if spec is None:
            return
        if runner is not None:
            runner.update(spec)
            return
        runner = PolicyRunner(self.core, spec, self.server.flush)
        await runner.start()
        self.server.policy = runner

    def _watch(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _addresses(self) -> str:
        ports = self.cfg.worker_port_range(self.port_range)
        own = f", worker port {ports[self.index]}" if self.count > 1 and ports else ""
        return ", ".join(str(e) for e in self.cfg.listen_endpoints) + own

    async def _serve_metrics(self) -> Any:
        ep = self.cfg.metrics.endpoint
        if ep is None:
            return None
        from prometheus_client import CollectorRegistry

        from proxy.metrics import WorkerCollector, serve_metrics, store_gauges

        registry = CollectorRegistry()
        registry.register(WorkerCollector(
            lambda: {**self.core.stats, "log_records_dropped": records_dropped()},
            lambda: {"server_transactions": len(self.core.server_txs),
                     "client_transactions": len(self.core.client_txs),
                     "tcp_connections": len(self.server.tcp_connections),
                     "config_generation": self.generation,
                     **self.server.overload_gauges(),
                     "draining": int(self.draining),
                     "ready": int(self.ready()[0]),
                     **store_gauges(self.store),
                     **(self.records_writer.gauges() if self.records_writer else {})},
            self.metrics, self._gateway_states))
        # one endpoint per worker (port + worker index): each reports its own counters
        try:
            return await serve_metrics(ep.host, ep.port + self.index, registry, self.ready)
        except OSError as exc:
            raise OSError(exc.errno, f"{exc.strerror} (binding metrics "
                                     f"{ep.host}:{ep.port + self.index})") from None

    def _gateway_states(self) -> list[tuple[str, bool]]:
        """(gateway, up) from the core: its own health view when it has one (gateway groups
        with probing), else its back-off after a failure."""
        states = getattr(self.core, "gateway_states", None)
        if states is not None:
            return [(name, bool(up)) for name, up in states()]
        now = time.monotonic()
        down = getattr(self.core, "_gw_down", {})  # the core's per-gateway back-off
        return [(str(target), down.get(i, 0.0) <= now)
                for i, target in enumerate(self.cfg.carrier.targets)]

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Whether this worker should get new calls, and why not."""
        from proxy.metrics import store_gauges

        reasons = []
        if self.draining:
            reasons.append("draining")
        store_up = bool(store_gauges(self.store).get("store_up", 1))
        if not store_up and not self.cfg.health.ready_without_store:
            reasons.append("binding store unreachable (health.ready_without_store: false)")
        gateways_up = sum(ok for _, ok in self._gateway_states())
        if gateways_up == 0:
            reasons.append("no carrier gateway up")
        return not reasons, {"reasons": reasons, "worker": self.index,
                             "config": self.config_path, "generation": self.generation,
                             "store_up": store_up, "gateways_up": gateways_up}

    # ---- signals -----------------------------------------------------------------------------
    def _orphaned(self) -> bool:
        return self.supervisor_pid is not None and os.getppid() != self.supervisor_pid

    def _on_term(self) -> None:
        if self._orphaned() or self.draining:  # the supervisor died, or a second signal
            self.stop_now()
            return
        self._watch(self.drain())

    def stop_now(self) -> None:
        self._stop.set()

    async def _watch_parent(self) -> None:
        """Without PR_SET_PDEATHSIG (not Linux), notice the supervisor's death within 1 s."""
        while not self._stop.is_set():
            await asyncio.sleep(1.0)
            if self._orphaned():
                log.warning("supervisor_gone", worker=self.index)
                self.stop_now()

    def _on_status(self) -> None:
        log.info("status", worker=self.index, generation=self.generation,
                 draining=self.draining, server_transactions=len(self.core.server_txs),
                 client_transactions=len(self.core.client_txs), stats=dict(self.core.stats))

    def _on_handover(self) -> None:
        """Another instance takes over: give back the spare range; SIGTERM then drains by
        closing the shared port, whatever shutdown.mode says."""
        self.handover = True
        if self._spare is not None:
            self._spare.cancel()
            self._spare = None
        self.server.release_spare()
        self.server.stop_steering()
        log.info("handover_started", worker=self.index)
        self._watch(self._handover_timeout())

    async def _handover_timeout(self) -> None:
        """A takeover that never sent its SIGTERM (the new instance failed to start): serve
        the spare range again, as before."""
        await asyncio.sleep(HANDOVER_TIMEOUT_S)
        spare = self.cfg.worker_port_range(1 - self.port_range)
        if self.draining or not self.handover or not spare:
            return
        self.handover = False
        log.warning("handover_abandoned", worker=self.index, waited_s=HANDOVER_TIMEOUT_S)
        self._spare = self._watch(self._take_spare(spare[self.index]))

    def _on_hup(self) -> None:
        if self.group:
            self._watch(self.reload_from(Path(self.group) / "config.json"))

    # ---- drain -------------------------------------------------------------------------------
    def _busy(self) -> int:
        """Transactions still waiting for their final response (one already answered only
        waits for an ACK or absorbs retransmissions: the call's outcome is settled)."""
        return sum(not relay.final_sent for relay in self.core.server_txs.values())

    async def drain(self) -> None:
        """No new calls; transactions in progress finish (at most shutdown.drain_s); stop."""
        from proxy.core import FinalResponse

        sd = self.cfg.shutdown
        self.draining = True
        has_own_port = self.server.worker_port is not None
        close = (self.handover or sd.mode == "close") and has_own_port
        if close:
            self.server.close_shared()
        else:
            settings = self.core.settings
            settings.draining = FinalResponse(503, sd.reason)
            settings.draining_retry_after_s = sd.retry_after_s
        started = time.monotonic()
        log.info("draining", worker=self.index, mode="close" if close else "reject",
                 transactions=self._busy(), drain_s=sd.drain_s)
        deadline = started + sd.drain_s
        waited = False
        while self._busy() and time.monotonic() < deadline and not self._stop.is_set():
            waited = True
            await asyncio.sleep(0.05)
        if waited:  # the last answers' ACKs (and retransmissions) are on their way
            await asyncio.sleep(max(0.0, min(DRAIN_LINGER_S, deadline - time.monotonic())))
        log.info("drained", worker=self.index, transactions_left=self._busy(),
                 waited_s=round(time.monotonic() - started, 2))
        self.stop_now()

    async def _take_spare(self, port: int) -> None:
        """Serve the spare port as soon as nobody else holds it."""
        warned = False
        while True:
            try:
                await self.server.bind_spare(port)
            except OSError as exc:
                if not warned:
                    log.info("spare_port_busy", worker=self.index, port=port,
                             error=exc.strerror, detail="served once the instance holding it "
                             "exits (a hand-over in progress)")
                    warned = True
                self.server.release_spare()
                await asyncio.sleep(SPARE_POLL_S)
                continue
            if warned:
                log.info("spare_port_taken", worker=self.index, port=port)
            return

    # ---- reload ------------------------------------------------------------------------------
    async def reload_from(self, path: Path) -> None:
        """Take the config the supervisor validated (written to `path` before the SIGHUP)."""
        if self._reloading:
            return
        self._reloading = True
        try:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data["generation"] <= self.generation:
                    return
                new = load_config_text(data["text"], data["path"])
            except Exception as exc:  # the supervisor checked it: this is unexpected
                log.error("config_reload_failed", worker=self.index, error=str(exc))
                return
            await self.apply(new, data["generation"], data["path"])
        finally:
            self._reloading = False

    async def apply(self, new: Config, generation: int, path: str) -> None:
        """Use `new` for every call from now on (restart-only keys keep their running value)."""
        from proxy.reload import effective_config, restart_required

        running = self.cfg
        changed = restart_required(running, new)
        new = effective_config(running, new, Path(path).resolve().parent)
        store = None
        if new.store.backend == "memory":
            from proxy.bindings.store import open_store

            # a few seconds for a big file: off the event loop, so calls go on meanwhile
            store = await asyncio.to_thread(open_store, new)
        self._former_gateways.retire(running, new)
        settings = core_settings(new, self.index, self.count, self.port_range,
                                 self._former_gateways.hosts())
        old_settings = self.core.settings
        settings.draining = old_settings.draining
        settings.draining_retry_after_s = old_settings.draining_retry_after_s
        core = self.core
        names = await resolve_gateway_names(new, settings.router, core.refresh_gateway_ips,
                                            fatal=False)
        await self._start_policy(new)
        core.settings = settings
        core.privacy.policy = settings.privacy
        core.configure_flood()
        # new calls choose among the new gateways; calls in progress keep the gateway objects
        # (and the candidates) they were set up with
        core.set_router(settings.router)
        # the overload thresholds are read on each tick: the next one uses the new ones
        self.server.overload = new.overload if new.overload.enabled else None
        if self.server.overload is None:
            core.overloaded = False  # control turned off: nothing sheds calls any more
        if self.names is not None:
            self.names.close()
        self.names = names
        if store is not None:
            old_store = self.store
            self.store = store
            self.server.store = type(self.server.store)(store, self.metrics.store_resolve)
            await old_store.close()
        self.cfg = new
        self.generation = generation
        self.config_path = path
        log.info("config_applied", worker=self.index, generation=generation, config=path,
                 gateways=[g.uri for g in new.carrier.gateways],
                 **({"restart_required": changed} if changed else {}))


async def _drain_logs(timeout: float) -> None:
    """Give a slow stdout reader a moment for the log lines still waiting (never blocks)."""
    deadline = time.monotonic() + timeout
    while not flush_logs() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
