"""Command-line commands of the API: `sip700 api`, `sip700 api-key new`, `sip700 audit`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from datetime import datetime
from typing import Any

from proxy import cli


def add_commands(sub: Any) -> None:
    p = sub.add_parser("api", help="run the binding API alone (Redis store)")
    cli.config_option(p, "YAML config file")
    p.add_argument("--listen", default=None, help="host:port (default: api.listen)")
    p.add_argument("--processes", type=int, default=1,
                   help="API processes sharing the port (SO_REUSEPORT)")
    p.set_defaults(func=cmd_api)

    keys = sub.add_parser("api-key", help="make API keys")
    ksub = keys.add_subparsers(dest="api_key_command", required=True)
    p = ksub.add_parser("new", help="print a new key (once) and the hash for the config")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--tenant", help="the tenant id the key is for")
    who.add_argument("--operator", action="store_true", help="a key for operator_keys")
    p.set_defaults(func=cmd_api_key_new)

    audit = sub.add_parser("audit", help="read the audit trail")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    cli.add_tail_command(asub, "the newest entries (and, with --follow, new ones)", cmd_audit)
    p = asub.add_parser("query", help="entries matching filters, oldest first")
    cli.config_option(p)
    p.add_argument("--tenant")
    p.add_argument("--binding", help="a binding id: its whole history")
    p.add_argument("--action", help="create, update, delete, allocation_failed, reveal …")
    p.add_argument("--since", help="ISO time (2026-12-01T10:00:00+08:00) or unix ms")
    p.add_argument("--until", help="ISO time or unix ms")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=cmd_audit)


def cmd_api_key_new(args: argparse.Namespace) -> int:
    from proxy.api.keys import hash_key, new_key
    from proxy.config import _check_tenant_id

    if args.tenant is not None:
        try:
            _check_tenant_id(args.tenant)
        except ValueError as exc:
            print(f"error: --tenant {exc}", file=sys.stderr)
            return 1
    key = new_key()
    key_hash = hash_key(key)
    where = "operator_keys" if args.operator else f"tenants[id={args.tenant}].api_keys"
    print(f"key:  {key}")
    print(f"hash: {key_hash}")
    print(f"# give the key to its holder (it is not shown again); put the hash in {where}",
          file=sys.stderr)
    return 0


def _run_loop(main: Any) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main)
    else:
        uvloop.run(main)


def cmd_api(args: argparse.Namespace) -> int:
    from proxy.config import load_config_or_report
    from proxy.logs import configure_logging

    cfg = load_config_or_report(args.config)
    if cfg is None:
        return 1
    if cfg.store.backend != "redis":
        print(f"{args.config}: store.backend: `sip700 api` runs the API alone, on the Redis "
              "store (with the memory store, set api.listen and use `sip700 run`)",
              file=sys.stderr)
        return 1
    if args.listen:
        cfg = cfg.model_copy(update={"api": cfg.api.model_copy(update={"listen": args.listen})})
    if cfg.api.listen is None:
        print(f"{args.config}: api.listen: required for `sip700 api` (or give --listen)",
              file=sys.stderr)
        return 1
    configure_logging(cfg.logging.level, cfg.logging.format)
    if args.processes <= 1:
        _run_loop(_serve_api(cfg, reuse_port=False))
        return 0
    children = []
    for _ in range(args.processes):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _run_loop(_serve_api(cfg, reuse_port=True))
            except BaseException:
                code = 1
            os._exit(code)
        children.append(pid)

    def stop(_signum: int, _frame: Any) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    for pid in children:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        code = code or (1 if os.waitstatus_to_exitcode(status) not in (0, -15) else 0)
    return code


async def _serve_api(cfg: Any, reuse_port: bool) -> None:
    from proxy.api.server import start_api

    server = await start_api(cfg, reuse_port=reuse_port)
    await cli.until_stopped()
    await server.close()


def _stream_id(text: str | None, default: str) -> str:
    if not text:
        return default
    if text.isdigit():
        return text
    stamp = datetime.fromisoformat(text)
    return str(int(stamp.timestamp() * 1000))


def cmd_audit(args: argparse.Namespace) -> int:
    from proxy.api.audit import AuditLog, entry
    from proxy.config import load_config_or_report

    cfg = load_config_or_report(args.config)
    if cfg is None:
        return 1

    def show(eid: str, fields: dict[str, str]) -> str:
        return json.dumps(entry(eid, fields), ensure_ascii=False)

    async def read(audit: AuditLog) -> int:
        if args.audit_command == "tail":
            entries = await audit.latest(args.count)
            for item in entries:
                print(json.dumps(item, ensure_ascii=False), flush=True)
            if args.follow:
                last = entries[-1]["entry"] if entries else "$"
                await cli.follow_stream(audit.client, audit.stream, last, show)
            return 0
        try:
            start = _stream_id(args.since, "-")
            end = _stream_id(args.until, "+")
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for item in await audit.query(start=start, end=end, tenant=args.tenant,
                                      binding_id=args.binding, action=args.action,
                                      limit=args.limit):
            print(json.dumps(item, ensure_ascii=False))
        return 0

    async def run() -> int:
        audit = AuditLog.from_config(cfg)
        return await cli.report_unavailable("audit stream", read(audit), audit.close)

    return cli.run_until_interrupted(run())


__all__ = ["add_commands", "time"]
