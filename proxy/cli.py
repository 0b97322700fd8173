"""sip700: a SIP proxy for 700 middle numbers (AXB number protection).

Commands: run, check-config, reload, health, the binding admin commands (bind, unbind,
bindings), records, and block (the call policy's blocklists). Every command takes its config
as --config PATH (or a plain PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

from proxy import __version__, compiled
from proxy import worker as _worker
from proxy.logs import configure_logging
from proxy.logs import flush as flush_logs

log = structlog.get_logger("sip700")


# the worker's pieces, under the names scripts and tests import from here
dialog_key = _worker.dialog_key
build_core = _worker.build_core
open_store_frozen = _worker.open_store_frozen


def _config_path(args: argparse.Namespace) -> str | None:
    """`--config PATH` or a plain PATH: every command takes either."""
    given = [p for p in (getattr(args, "config", None), getattr(args, "config_pos", None)) if p]
    if len(given) == 2 and given[0] != given[1]:
        print(f"sip700 {args.command}: two config files given ({given[0]}, {given[1]}); "
              "give one, as --config PATH or PATH", file=sys.stderr)
        return None
    if not given:
        print(f"sip700 {args.command}: which config? give --config PATH (or PATH), e.g. "
              "--config /etc/sip700/proxy.yaml", file=sys.stderr)
        return None
    return given[0]


def cmd_run(args: argparse.Namespace) -> int:
    from proxy.reload import validate_file
    from proxy.supervisor import StartRefused, Supervisor

    path = _config_path(args)
    if path is None:
        return 2
    cfg, check, problems = validate_file(path)
    for problem in problems:
        print(problem, file=sys.stderr)
    if cfg is None:
        return 1
    configure_logging(cfg.logging.level, args.log_format or cfg.logging.format,
                      cfg.logging.levels)
    for problem in check.problems[:100]:
        log.warning("binding_file_row_skipped", problem=problem)
    for warning in check.warnings:
        log.warning("binding_unreachable", detail=warning)
    if check.store is not None:
        log.info("bindings_loaded", file=str(cfg.store.bindings_file), loaded=check.loaded,
                 skipped=len(check.problems))
        gc.collect()
        gc.freeze()  # the loaded bindings, shared with the workers: out of the collector's way
    # the absolute path: `sip700 reload` from any directory finds the instance that runs it
    supervisor = Supervisor(cfg, os.path.abspath(path), dialog_key(cfg), check.store,
                            takeover=args.takeover)
    try:
        supervisor.prepare()
    except StartRefused as exc:
        log.error("start_refused", reason=str(exc))
        flush_logs()
        print(f"sip700 run: {exc}", file=sys.stderr)
        return 1
    return supervisor.run()


def cmd_check_config(args: argparse.Namespace) -> int:
    from proxy.reload import validate_file

    path = _config_path(args)
    if path is None:
        return 2
    _, check, problems = validate_file(path)
    for problem in problems:
        print(problem)
    if problems:
        return 1
    for problem in check.problems:
        print(f"warning: {problem} (row skipped)")
    for warning in check.warnings:
        print(f"warning: {warning}")
    loaded = f" ({check.loaded} bindings)" if check.store is not None else ""
    print(f"{path}: OK{loaded}")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """Check the file here, then SIGHUP the running supervisor and report what it did."""
    from proxy.reload import validate_file
    from proxy.supervisor import read_state, running_instance, state_path

    path = _config_path(args)
    if path is None:
        return 2
    cfg, _, problems = validate_file(path)
    if cfg is None:
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"sip700 reload: {path} is not valid; the running proxy was not signalled",
              file=sys.stderr)
        return 1
    state = running_instance(cfg)
    if state is None:
        print(f"sip700 reload: no running sip700 for {path} (no live instance in "
              f"{state_path(cfg)}); start one with: sip700 run --config {path}", file=sys.stderr)
        return 1
    if os.path.realpath(state.get("config", "")) != os.path.realpath(path):
        print(f"sip700 reload: the instance on {cfg.listen_endpoints[0]} (pid {state['pid']}) "
              f"runs {state.get('config')}; a reload re-reads that file: edit it, or restart "
              f"with --config {path}", file=sys.stderr)
        return 1
    before = int(state.get("reloads", 0))
    os.kill(state["pid"], signal.SIGHUP)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        now = read_state(state_path(cfg)) or {}
        if int(now.get("reloads", 0)) > before:
            result = now.get("last_reload", {})
            if not result.get("ok"):
                for problem in result.get("problems", []):
                    print(problem, file=sys.stderr)
                print("sip700 reload: refused; the running config stays in force",
                      file=sys.stderr)
                return 1
            for warning in result.get("warnings", []):
                print(f"warning: {warning}")
            if result.get("restart_required"):
                print("restart needed for: " + ", ".join(result["restart_required"])
                      + " (their running values stay until then)")
            print(f"{path}: reloaded, generation {result.get('generation')} "
                  f"(pid {state['pid']})")
            return 0
        time.sleep(0.05)
    print(f"sip700 reload: pid {state['pid']} was sent SIGHUP but did not report within "
          f"{args.wait:g} s; see its log", file=sys.stderr)
    return 1


def cmd_health(args: argparse.Namespace) -> int:
    """GET /readyz (or /healthz with --live) of every worker; exit 0 when all say 200."""
    import urllib.error
    import urllib.request

    from proxy.config import load_config_or_report

    path = _config_path(args)
    if path is None:
        return 2
    cfg = load_config_or_report(path)
    if cfg is None:
        return 1
    ep = cfg.metrics.endpoint
    if ep is None:
        print(f"sip700 health: {path} has no metrics.listen: nothing serves /readyz",
              file=sys.stderr)
        return 1
    host = "127.0.0.1" if ep.host in ("0.0.0.0", "::") else ep.host
    host = f"[{host}]" if ":" in host else host
    what = "/healthz" if args.live else "/readyz"
    code = 0
    for index in range(cfg.workers):
        url = f"http://{host}:{ep.port + index}{what}"
        try:
            with urllib.request.urlopen(url, timeout=args.timeout) as answer:
                print(f"{url}: {answer.status} {answer.read().decode().strip()}")
        except urllib.error.HTTPError as exc:
            print(f"{url}: {exc.code} {exc.read().decode().strip()}")
            code = 1
        except OSError as exc:
            print(f"{url}: unreachable ({getattr(exc, 'reason', exc)})")
            code = 1
    return code


class _Parser(argparse.ArgumentParser):
    """Errors say what was wrong and how to get help, on stderr, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message}\n(see: {self.prog} --help)\n")


def _config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config_pos", nargs="?", metavar="PATH", help="YAML config file")
    p.add_argument("--config", help="YAML config file (the same as PATH)")


# -- the pieces the other modules' commands share (proxy/api, proxy/records, proxy/policy) --------


def config_option(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """`--config PATH`, required: the commands that add themselves take no plain PATH."""
    parser.add_argument("--config", required=True, help=help)


def add_tail_command(sub: Any, help: str, func: Callable[[argparse.Namespace], int]
                     ) -> argparse.ArgumentParser:
    """`… tail --config PATH [-n COUNT] [-f]`: the newest entries of a stream (and new ones)."""
    p = sub.add_parser("tail", help=help)
    config_option(p)
    p.add_argument("-n", "--count", type=int, default=20)
    p.add_argument("-f", "--follow", action="store_true")
    p.set_defaults(func=func)
    return p


async def follow_stream(client: Any, stream: str, last: str,
                        show: Callable[[str, dict[str, str]], str]) -> None:
    """`tail --follow`: print each entry added to `stream` after `last`, until stopped."""
    while True:
        found = await client.xread({stream: last}, block=1000, count=100)
        for _, rows in found:
            for entry_id, fields in rows:
                print(show(entry_id, fields), flush=True)
                last = entry_id


async def report_unavailable(what: str, work: Awaitable[int],
                             close: Callable[[], Awaitable[object]]) -> int:
    """A command's work on Redis: its exit code, or 1 with `error: WHAT unavailable (…)` on
    stderr when it fails; `close` runs either way."""
    try:
        return await work
    except Exception as exc:
        print(f"error: {what} unavailable ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 1
    finally:
        await close()


async def until_stopped() -> None:
    """For a command that serves until it is stopped: returns on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def run_until_interrupted(main: Coroutine[Any, Any, int]) -> int:
    """asyncio.run for a command that may follow a stream: Ctrl-C ends it, with exit 0."""
    try:
        return asyncio.run(main)
    except KeyboardInterrupt:
        return 0


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sip700", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"sip700 {__version__} (compiled: {compiled.status()})")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                metavar="COMMAND")
    p = sub.add_parser("run", help="run the proxy (a supervisor and its workers)")
    _config_arguments(p)
    p.add_argument("--takeover", action="store_true",
                   help="replace the instance running on the same address without dropping "
                        "calls: start next to it, then drain it (needs privacy.dialog_key)")
    p.add_argument("--log-format", choices=("json", "console", "auto"),
                   help="override logging.format (console: for people, coloured on a "
                        "terminal; auto: console on a terminal, json otherwise)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("check-config",
                       help="validate a config file and its bindings file; exit 1 on problems")
    _config_arguments(p)
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("reload", help="check a config file, then make the running proxy "
                                      "re-read it (SIGHUP) and report the outcome")
    _config_arguments(p)
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the outcome")
    p.set_defaults(func=cmd_reload)
    p = sub.add_parser("health", help="ask every worker's /readyz (exit 0 when all are ready)")
    _config_arguments(p)
    p.add_argument("--live", action="store_true", help="ask /healthz (process alive) instead")
    p.add_argument("--timeout", type=float, default=3.0)
    p.set_defaults(func=cmd_health)
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
    from proxy.policy.commands import add_commands as add_policy_commands

    add_policy_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return int(args.func(args) or 0)
