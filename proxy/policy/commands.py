"""`sip700 block add | remove | list`: the Redis blocklists (global, or one tenant's).

A change reaches every worker of every instance within policy.blocklist_poll_ms (1 s at
most) and is written to the audit stream (key `cli`). Numbers are shown in full: the output
is for an admin, not a log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from proxy import cli
from proxy.policy.blocklist import KINDS


def add_commands(sub: Any) -> None:
    block = sub.add_parser("block", help="blocklists of the call policy (in Redis)")
    bsub = block.add_subparsers(dest="block_command", required=True)
    for name, text in (("add", "refuse calls of a number (or prefix)"),
                       ("remove", "take a number (or prefix) off the list")):
        p = bsub.add_parser(name, help=text)
        p.add_argument("kind", choices=KINDS, help="caller, callee, x (middle number), or "
                                                   "prefix (of any party's number)")
        p.add_argument("value", help="a number, or the digits of a prefix")
        p.add_argument("--tenant", help="this tenant's list (default: the global one)")
        cli.config_option(p)
        p.set_defaults(func=cmd_block)
    p = bsub.add_parser("list", help="the entries of a list")
    p.add_argument("--tenant", help="this tenant's list (default: the global one)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    cli.config_option(p)
    p.set_defaults(func=cmd_block)


def cmd_block(args: argparse.Namespace) -> int:
    import redis.asyncio as aioredis

    from proxy.config import load_config_or_report
    from proxy.policy.blocklist import BadEntry, parse_entry
    from proxy.policy.blocklist_store import BlocklistStore
    from proxy.policy.spec import policy_key_prefix, policy_redis_url

    cfg = load_config_or_report(args.config)
    if cfg is None:
        return 1
    tenant = args.tenant
    if tenant is not None and tenant not in {t.id for t in cfg.tenants}:
        print(f"error: --tenant {tenant!r} is not a tenant of {args.config}", file=sys.stderr)
        return 1
    entry = ""
    if args.block_command != "list":
        try:
            entry = parse_entry(args.kind, args.value)
        except BadEntry as exc:
            print(f"error: {args.kind} {args.value!r}: {exc}", file=sys.stderr)
            return 1

    async def change(store: BlocklistStore) -> int:
        if args.block_command == "list":
            entries = await store.entries(tenant)
            if args.json:
                print(json.dumps({"tenant": tenant, "entries": entries}))
            else:
                for e in entries:
                    print(e)
            return 0
        scope = f"tenant {tenant}" if tenant else "global"
        if args.block_command == "add":
            changed = await store.add(tenant, entry)
            print(f"{entry}: {'added to' if changed else 'already on'} the {scope} list")
        else:
            changed = await store.remove(tenant, entry)
            print(f"{entry}: {'removed from' if changed else 'was not on'} the {scope} "
                  "list")
        if changed:
            await _audit(cfg, f"block_{args.block_command}", tenant, entry)
        return 0

    async def run() -> int:
        client = aioredis.Redis.from_url(policy_redis_url(cfg), decode_responses=True,
                                         socket_timeout=5.0, socket_connect_timeout=2.0)
        store = BlocklistStore(client, policy_key_prefix(cfg))
        return await cli.report_unavailable("policy Redis", change(store), client.aclose)

    return asyncio.run(run())


async def _audit(cfg: Any, action: str, tenant: str | None, entry: str) -> None:
    """The change in the audit stream, like the API's (best effort: the change is made)."""
    from proxy.api.audit import AuditLog

    audit = AuditLog.from_config(cfg)
    try:
        await audit.append({"action": action, "tenant": tenant or "", "key": "cli",
                            "src": "cli", "after": json.dumps({"entry": entry})})
    except Exception as exc:
        print(f"warning: not written to the audit stream ({type(exc).__name__})",
              file=sys.stderr)
    finally:
        await audit.close()
