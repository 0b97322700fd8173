"""Command line: `sip700 run`, `sip700 check-config`, and the binding admin commands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import structlog

from proxy.config import Config, check_config, load_config, load_config_or_report
from proxy.logs import configure_logging, records_dropped
from proxy.logs import flush as flush_logs

log = structlog.get_logger("sip700")


def dialog_key(cfg: Config) -> bytes:
    """The configured AES-256-GCM key, or a random one (with a warning) for this run only."""
    key = cfg.privacy.dialog_key_bytes
    if key is None:
        key = os.urandom(32)
        log.warning("dialog_key_generated",
                    detail="no privacy.dialog_key configured: calls do not survive a restart "
                           "and instances cannot serve each other's dialogs")
    return key


def build_core(cfg: Config, key: bytes, index: int = 0, count: int = 1) -> Any:
    """The sans-IO proxy core of worker `index` of `count`, configured from `cfg`.

    With several workers, each advertises its own port (cfg.worker_ports) in Via and
    Record-Route, and takes a Route to any of the proxy's ports as one to itself.
    """
    from proxy.core import CoreSettings, FinalResponse, Hop, ProxyCore
    from proxy.gateways import ProbeSettings
    from proxy.privacy import DialogSealer, PrivacyPolicy
    from proxy.sip.transaction import TimerSettings

    adv = cfg.advertised
    pattern = cfg.middle_number_regex
    r = cfg.responses
    t = cfg.timers
    several = count > 1 and bool(cfg.worker_ports)
    settings = CoreSettings(
        advertise_host=adv.host,
        advertise_port=cfg.worker_ports[index] if several else adv.port,
        our_ports=cfg.our_ports if several else frozenset(),
        is_trusted=functools.lru_cache(maxsize=4096)(cfg.is_trusted),
        middle_number=lambda n: pattern.search(n) is not None,
        gateways=[Hop(g.host, g.port, g.transport) for g in cfg.carrier.targets],
        gateway_strategy=cfg.carrier.strategy,
        mask_numbers=cfg.privacy.mask_numbers_in_logs,
        timer_settings=TimerSettings(t1=t.t1_ms / 1000, t2=t.t2_ms / 1000, t4=t.t4_ms / 1000),
        timer_c=t.timer_c_s,
        worker_index=index,
        is_gateway_address=functools.lru_cache(maxsize=4096)(cfg.is_gateway_address),
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
        direction_restricted=FinalResponse(r.direction_restricted.code,
                                           r.direction_restricted.reason),
        not_middle_number=FinalResponse(r.not_middle_number.code, r.not_middle_number.reason),
        untrusted_peer=FinalResponse(r.untrusted_peer.code, r.untrusted_peer.reason),
        store_unavailable=FinalResponse(r.store_unavailable.code, r.store_unavailable.reason),
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
    )
    call_log = structlog.get_logger("sip700.calls")
    core = ProxyCore(settings, DialogSealer(key), log=call_log.info)
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


async def serve(
    cfg: Config, key: bytes, store: Any = None, index: int = 0, count: int = 1, group: str = "",
    relay_key: bytes = b"",
) -> None:
    """Run one worker until SIGTERM/SIGINT.

    `relay_key` keys the hash that picks a Call-ID's worker: the same in every worker.
    """
    from proxy.transport import ProxyServer

    if store is None:
        store = open_store_frozen(cfg)
    # Call state is freed by reference counting (the core breaks its one cycle when a
    # transaction pair ends), so the cyclic collector can run rarely: its full passes over tens
    # of thousands of live transactions were p99 latency spikes of hundreds of milliseconds.
    gc.set_threshold(100_000, 1000, 1000)
    start = getattr(store, "start", None)
    if start is not None:
        await start()
    core = build_core(cfg, key, index, count)
    names = await resolve_gateway_names(cfg, core)
    worker_port = cfg.worker_ports[index] if count > 1 and cfg.worker_ports else None
    server = ProxyServer(
        core, store,
        listen=[(e.transport, e.host, e.port) for e in cfg.listen_endpoints],
        udp_rcvbuf=cfg.transport.udp_rcvbuf_bytes,
        udp_sndbuf=cfg.transport.udp_sndbuf_bytes,
        tcp_idle_timeout=cfg.transport.tcp_idle_timeout_s,
        tcp_max_connections=cfg.transport.tcp_max_connections,
        tcp_max_connections_per_source=cfg.transport.tcp_max_connections_per_source,
        tcp_max_output_bytes=cfg.transport.tcp_max_output_bytes,
        max_message_bytes=cfg.transport.max_message_bytes,
        worker_index=index, worker_count=count, relay_group=group, relay_key=relay_key,
        worker_port=worker_port,
        overload=cfg.overload if cfg.overload.enabled else None,
    )
    metrics_server = None
    if cfg.metrics.endpoint is not None:
        from prometheus_client import CollectorRegistry

        from proxy.metrics import CoreCollector, serve_metrics

        registry = CollectorRegistry()
        registry.register(CoreCollector(
            lambda: {**core.stats, "log_records_dropped": records_dropped()},
            lambda: {"server_transactions": len(core.server_txs),
                     "client_transactions": len(core.client_txs),
                     "tcp_connections": len(server.tcp_connections),
                     **server.overload_gauges()},
            labelled=lambda: {"gateway_up": ("gateway", core.gateway_states())}))
        ep = cfg.metrics.endpoint
        # one endpoint per worker (port + worker index): each reports its own counters
        metrics_server = await serve_metrics(ep.host, ep.port + index, registry,
                                             lambda: getattr(store, "healthy", True))
    api_server = follower = None
    if cfg.api.listen is not None:  # the binding API: in worker 0 (see proxy/api/server.py)
        from proxy.api.server import journal_follower, start_api

        journal_dir = group if count > 1 and cfg.store.backend == "memory" else None
        if index == 0:
            api_server = await start_api(cfg, store, journal_dir)
        elif journal_dir:
            follower = journal_follower(cfg, store, journal_dir)
    writer = pusher = None
    if core.calls is not None:
        from proxy.records.writer import build_writer

        writer = build_writer(cfg, core.calls, index)
        writer.start()
        if index == 0 and cfg.records.push.enabled and any(
                t.records_url or t.events_url for t in cfg.tenants):
            from proxy.records.push import RecordPusher

            pusher = RecordPusher.from_config(cfg)
            pusher.stats = core.stats
            pusher.start()
    await server.start()  # last: an open SIP port means everything else is ready
    log.info("listening", listen=[str(e) for e in cfg.listen_endpoints],
             advertise=str(cfg.advertised), backend=cfg.store.backend,
             worker=index, workers=count, worker_port=worker_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await _drain_logs(1.0)  # room for the stopping line, if stdout is being read at all
    await server.close()
    if writer is not None:  # the last records written (or spooled) before the counters
        await writer.close()
    stats = dict(core.stats)
    if records_dropped():
        stats["log_records_dropped"] = records_dropped()
    log.info("stopping", stats=stats)
    if pusher is not None:
        await pusher.close()
    if api_server is not None:
        await api_server.close()
    if follower is not None:
        await follower.close()
    if metrics_server is not None:
        metrics_server.close()
    await store.close()
    if names is not None:
        names.close()
    await _drain_logs(1.0)


async def resolve_gateway_names(cfg: Config, core: Any) -> Any:
    """Resolve the gateways given by name (RFC 3263) and keep them fresh; None when every
    gateway is an IP address. A name that gives no address stops the worker (SystemExit)."""
    from proxy.dns import GatewayResolver, make_resolver

    gateways = [gw for gw in core.router.all_gateways() if gw.by_name]
    if not gateways:
        return None
    names = GatewayResolver(gateways, make_resolver(cfg.carrier.dns.servers,
                                                    cfg.carrier.dns.timeout_ms / 1000),
                            on_change=core.refresh_gateway_ips)
    problems = await names.resolve_all()
    if problems:
        for problem in problems:
            log.error("gateway_unresolved", problem=problem)
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


async def _drain_logs(timeout: float) -> None:
    """Give a slow stdout reader a moment for the log lines still waiting (never blocks)."""
    deadline = time.monotonic() + timeout
    while not flush_logs() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config_or_report(args.config)
    if cfg is None:
        return 1
    configure_logging(cfg.logging.level, cfg.logging.format)
    unresolved = gateway_name_problems(cfg)
    if unresolved:  # before any fork: one clear error, not a worker restart loop
        for problem in unresolved:
            print(f"{args.config}: {problem}", file=sys.stderr)
        return 1
    key = dialog_key(cfg)
    if cfg.workers == 1:
        _run_loop(serve(cfg, key))
        return 0
    return supervise(cfg, key)


def _run_loop(main: Any) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main)
    else:
        uvloop.run(main)


def supervise(cfg: Config, key: bytes) -> int:
    """Fork `workers` processes sharing the SIP port (each with a port of its own too) and
    restart any that dies.

    The memory store is loaded once, before the fork, so workers share its pages. The Redis
    store is opened in each worker (connections do not survive a fork).
    """
    store = open_store_frozen(cfg) if cfg.store.backend == "memory" else None
    group = tempfile.mkdtemp(prefix="sip700-")  # the workers' relay sockets live here
    # keys the hash that picks a Call-ID's worker: made once, so every worker (and every
    # restarted one) agrees, and secret, so callers cannot aim their calls at one worker
    relay_key = os.urandom(32)
    children: dict[int, int] = {}  # pid → worker index
    started: dict[int, float] = {}  # worker index → when it was (re)started
    quick_deaths: dict[int, int] = {}
    exit_code = 0
    stopping = False

    def fork(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 0
            try:
                _run_loop(serve(cfg, key, store, index, cfg.workers, group, relay_key))
            except BaseException:
                log.exception("worker_failed", worker=index)
                code = 1
            os._exit(code)
        children[pid] = index
        started[index] = time.monotonic()

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for index in range(cfg.workers):
        fork(index)
    log.info("supervisor_started", workers=cfg.workers)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index = children.pop(pid, None)
        if index is None or stopping:
            continue
        lived = time.monotonic() - started.get(index, 0.0)
        quick_deaths[index] = quick_deaths.get(index, 0) + 1 if lived < 5.0 else 0
        log.error("worker_died", worker=index, status=status, lived_s=round(lived, 1))
        if quick_deaths[index] >= 5:  # it cannot start (port taken, bad store …): give up
            log.error("worker_cannot_start", worker=index)
            stop(signal.SIGTERM, None)
            exit_code = 1
            continue
        time.sleep(0.2)  # no restart storm if a worker dies at start-up
        fork(index)
    shutil.rmtree(group, ignore_errors=True)
    deadline = time.monotonic() + 1.0  # a slow stdout reader: a moment for what waits
    while not flush_logs() and time.monotonic() < deadline:
        time.sleep(0.01)
    return exit_code


def cmd_check_config(args: argparse.Namespace) -> int:
    problems = check_config(args.config)
    if not problems:  # the file is sound: do its gateway names resolve?
        problems = [f"{args.config}: {p}" for p in
                    gateway_name_problems(load_config(args.config))]
    for problem in problems:
        print(problem)
    if problems:
        return 1
    print(f"{args.config}: OK")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sip700", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the proxy")
    p.add_argument("--config", required=True, help="YAML config file")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("check-config", help="validate a config file; exit 1 on problems")
    p.add_argument("config", help="YAML config file")
    p.set_defaults(func=cmd_check_config)
    try:
        from proxy.bindings.admin import add_commands
    except ImportError:
        pass
    else:
        add_commands(sub)
    from proxy.api.commands import add_commands as add_api_commands

    add_api_commands(sub)
    from proxy.records.commands import add_commands as add_records_commands

    add_records_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return int(args.func(args) or 0)
