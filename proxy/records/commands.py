"""`sip700 records tail | get | push`: call records for support staff, and the pusher alone."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from proxy import cli


def add_commands(sub: Any) -> None:
    records = sub.add_parser("records", help="call records: read them, push them")
    rsub = records.add_subparsers(dest="records_command", required=True)
    p = cli.add_tail_command(rsub, "the newest records (and, with --follow, new ones)", cmd_records)
    p.add_argument("--full", action="store_true", help="numbers in full (default: masked)")
    p = rsub.add_parser("get", help="the records of a Call-ID or of a number, newest first")
    cli.config_option(p)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--call-id", help="the Call-ID as the caller sent it")
    who.add_argument("--number", help="a caller, callee or middle number")
    p.add_argument("--tenant")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--full", action="store_true", help="numbers in full (default: masked)")
    p.set_defaults(func=cmd_records)
    p = rsub.add_parser("push", help="push records and events to tenants (without the proxy)")
    cli.config_option(p)
    p.set_defaults(func=cmd_records_push)


def _client(cfg: Any) -> Any:
    import redis.asyncio as aioredis

    from proxy.records.writer import records_url

    return aioredis.Redis.from_url(records_url(cfg), decode_responses=True, socket_timeout=5.0,
                                   socket_connect_timeout=2.0)


def _show(entry_id: str, fields: dict[str, str], full: bool) -> str:
    from proxy.records.model import for_json
    from proxy.records.reading import masked

    record = fields if full else masked(fields)
    return json.dumps({"entry": entry_id, **for_json(record)}, ensure_ascii=False)


def cmd_records(args: argparse.Namespace) -> int:
    from proxy.config import load_config_or_report
    from proxy.numbers import normalize_number
    from proxy.records import reading

    cfg = load_config_or_report(args.config)
    if cfg is None:
        return 1
    stream = cfg.records.stream

    def show(entry_id: str, fields: dict[str, str]) -> str:
        return _show(entry_id, fields, args.full)

    async def read(client: Any) -> int:
        if args.records_command == "tail":
            rows = await reading.latest(client, stream, args.count)
            for entry_id, fields in rows:
                print(show(entry_id, fields), flush=True)
            if args.follow:
                await cli.follow_stream(client, stream, rows[-1][0] if rows else "$", show)
            return 0
        number = None
        if args.number is not None:
            number = normalize_number(args.number)
            if number is None:
                print("error: --number is not a phone number", file=sys.stderr)
                return 1
        rows = await reading.find(client, stream, call_id=args.call_id, number=number,
                                  tenant=args.tenant, limit=args.limit,
                                  scan_max=cfg.records.search_scan_max)
        for entry_id, fields in rows:
            print(show(entry_id, fields))
        return 0

    async def run() -> int:
        client = _client(cfg)
        return await cli.report_unavailable("records stream", read(client), client.aclose)

    return cli.run_until_interrupted(run())


def cmd_records_push(args: argparse.Namespace) -> int:
    from proxy.config import load_config_or_report
    from proxy.logs import configure_logging
    from proxy.records.push import RecordPusher

    cfg = load_config_or_report(args.config)
    if cfg is None:
        return 1
    configure_logging(cfg.logging.level, cfg.logging.format)

    async def run() -> None:
        pusher = RecordPusher.from_config(cfg)
        pusher.start()
        await cli.until_stopped()
        await pusher.close()

    asyncio.run(run())
    return 0
