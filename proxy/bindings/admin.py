"""Admin operations on bindings, for the `sip700` CLI (and the HTTP API if it wants them).

Numbers are normalised here; output for an admin shows them in full (it is not a log line).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from proxy.bindings.files import Problem, read_bindings
from proxy.bindings.model import AXB, AXN, Binding, BindingConflict, make_binding
from proxy.bindings.store import BindingStore

IMPORT_BATCH = 1000


async def bind_axb(store: BindingStore, x: str, a: str, b: str, ttl: float) -> Binding:
    """Bind A and B to X for `ttl` seconds. InvalidBinding / BindingConflict / StoreUnavailable."""
    binding = make_binding(AXB, x, a, b, ttl)
    await store.bind(binding)
    return binding


async def bind_axn(store: BindingStore, x: str, a: str, b: str | None, ttl: float) -> Binding:
    """Give X to A for `ttl` seconds; A calling X reaches `b` (or is refused without one)."""
    binding = make_binding(AXN, x, a, b, ttl)
    await store.bind(binding)
    return binding


async def unbind(store: BindingStore, x: str, number: str) -> bool:
    """Remove the binding on X that `number` is party to; False when there was none."""
    return await store.unbind(x, number)


async def get(store: BindingStore, x: str) -> list[Binding]:
    """Live bindings on X."""
    return await store.get(x)


async def list_bindings(
    store: BindingStore, x_prefix: str = "", limit: int = 1000
) -> list[Binding]:
    """Live bindings whose X starts with `x_prefix`, at most `limit`."""
    return await store.list(x_prefix=x_prefix, limit=limit)


async def import_file(
    store: BindingStore, path: Path | str, batch_size: int = IMPORT_BATCH
) -> tuple[int, list[Problem]]:
    """Bind every row of a YAML or CSV file; returns (bound, problems).

    Bad rows and conflicts are reported with their line and skipped; each binding is written
    atomically, so a refused row leaves nothing behind. A row renewing an existing binding of
    the same parties counts as bound (re-importing a file is idempotent). Redis stores get
    pipelined batches of `batch_size`.
    """
    name = str(path)
    now = time.time()
    problems: list[Problem] = []
    bound = 0
    bind_many = getattr(store, "bind_many", None)

    async def write(batch: list[Binding], lines: list[int]) -> None:
        nonlocal bound
        if bind_many is not None:
            errors = await bind_many(batch)
        else:
            errors = []
            for binding in batch:
                try:
                    await store.bind(binding)
                    errors.append(None)
                except BindingConflict as exc:
                    errors.append(exc)
        for line, error in zip(lines, errors, strict=True):
            if error is None:
                bound += 1
            elif isinstance(error, BindingConflict):
                problems.append(Problem(name, line, str(error)))
            else:
                raise error

    # Two batches in flight: Redis runs one while this process reads and packs the next.
    in_flight: set[asyncio.Task[None]] = set()
    batch: list[Binding] = []
    lines: list[int] = []
    try:
        for item in read_bindings(path, now):
            if isinstance(item, Problem):
                problems.append(item)
                continue
            lines.append(item[0])
            batch.append(item[1])
            if len(batch) >= batch_size:
                in_flight.add(asyncio.ensure_future(write(batch, lines)))
                batch, lines = [], []
                if len(in_flight) >= 2:
                    done, in_flight = await asyncio.wait(
                        in_flight, return_when=asyncio.FIRST_COMPLETED
                    )
                    for task in done:
                        task.result()
        if batch:
            in_flight.add(asyncio.ensure_future(write(batch, lines)))
        for task in in_flight:
            await task
    finally:
        for task in in_flight:
            task.cancel()
    problems.sort(key=lambda p: p.line)
    return bound, problems


# -- command line helpers ------------------------------------------------------------------------


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file naming the store")


def add_commands(subparsers: Any) -> None:
    """The admin commands of the top-level CLI, as testers and admins script them:

    sip700 bind axb --x X --a A --b B --ttl S      sip700 unbind --x X --number N
    sip700 bind axn --x X --a A [--b B] --ttl S    sip700 bindings get --x X
    sip700 bindings list [--prefix P] [--limit N]  sip700 bindings import FILE
    Each takes --config FILE (anywhere after the command).
    """
    bind = subparsers.add_parser("bind", help="create or renew a binding")
    kinds = bind.add_subparsers(dest="bind_kind", required=True)
    p = kinds.add_parser("axb", help="bind A and B to X (A→X reaches B, B→X reaches A)")
    p.add_argument("--x", required=True, help="middle number")
    p.add_argument("--a", required=True)
    p.add_argument("--b", required=True)
    p.add_argument("--ttl", type=float, required=True, help="seconds")
    _config_option(p)
    p.set_defaults(func=cmd_bindings, bindings_command="bind-axb")
    p = kinds.add_parser("axn", help="give X to A (anyone→X reaches A; A→X reaches B if given)")
    p.add_argument("--x", required=True, help="middle number")
    p.add_argument("--a", required=True)
    p.add_argument("--b", default=None, help="where A reaches when A calls X (optional)")
    p.add_argument("--ttl", type=float, required=True, help="seconds")
    _config_option(p)
    p.set_defaults(func=cmd_bindings, bindings_command="bind-axn")

    p = subparsers.add_parser("unbind", help="remove the binding on X that NUMBER is party to")
    p.add_argument("--x", required=True, help="middle number")
    p.add_argument("--number", required=True, help="A or B of the binding")
    _config_option(p)
    p.set_defaults(func=cmd_bindings, bindings_command="unbind")

    bindings = subparsers.add_parser("bindings", help="show and import bindings")
    sub = bindings.add_subparsers(dest="bindings_command", required=True)
    p = sub.add_parser("get", help="show the live bindings on X")
    p.add_argument("--x", required=True, help="middle number")
    _config_option(p)
    p = sub.add_parser("list", help="list live bindings")
    p.add_argument("--prefix", default="", help="only X numbers starting with this")
    p.add_argument("--limit", type=int, default=100)
    _config_option(p)
    p = sub.add_parser("import", help="bind every row of a YAML or CSV file (pipelined)")
    p.add_argument("path", type=Path)
    p.add_argument("--batch", type=int, default=IMPORT_BATCH)
    _config_option(p)
    bindings.set_defaults(func=cmd_bindings)


def cmd_bindings(args: argparse.Namespace) -> int:
    """Entry point for `sip700 bindings`: open the store, run one command, close."""
    from proxy.bindings.model import InvalidBinding, StoreUnavailable
    from proxy.bindings.store import open_store
    from proxy.config import load_config_or_report

    cfg = load_config_or_report(args.config)
    if cfg is None:
        return 1
    if cfg.store.backend == "memory" and args.bindings_command != "import":
        print(
            "note: the memory backend lives inside each proxy process; "
            "changes made here last for this command only (edit store.bindings_file)",
            file=sys.stderr,
        )

    async def run() -> int:
        store = open_store(cfg)
        unreachable = _watch_unreachable_x(store, cfg.middle_number_regex)
        try:
            command = argparse.Namespace(**vars(args))
            command.command = args.bindings_command
            code = await run_command(store, command)
        except InvalidBinding as exc:
            print(f"error: {_unmasked(exc, args)}", file=sys.stderr)
            return 1
        except BindingConflict as exc:
            print(f"error: {await _conflict_detail(store, exc, args)}", file=sys.stderr)
            return 1
        except StoreUnavailable as exc:
            print(f"error: {_store_detail(exc, cfg)}", file=sys.stderr)
            return 1
        finally:
            await store.close()
        if unreachable:
            shown = ", ".join(sorted(unreachable)[:5]) + (" ..." if len(unreachable) > 5 else "")
            print(f"warning: {len(unreachable)} x never match middle_number_pattern "
                  f"{cfg.middle_number_pattern!r} ({shown}): no call can reach them",
                  file=sys.stderr)
        return code

    return asyncio.run(run())


# -- what an admin is told when a command fails (the admin's own input is shown as typed) ---


def _watch_unreachable_x(store: Any, pattern: Any) -> set[str]:
    """Collect the X of every binding written that `middle_number_pattern` never matches."""
    seen: set[str] = set()
    for name in ("bind", "bind_many"):
        method = getattr(store, name, None)
        if method is None:
            continue

        async def watched(arg: Any, *rest: Any, _method: Any = method) -> Any:
            for binding in arg if isinstance(arg, list) else [arg]:
                if pattern.search(binding.x) is None:
                    seen.add(binding.x)
            return await _method(arg, *rest)

        setattr(store, name, watched)
    return seen


def _unmasked(exc: Exception, args: argparse.Namespace) -> str:
    """A number the admin typed is shown as typed (files and logs mask it)."""
    message = str(exc)
    for field in ("x", "a", "b"):
        if message.startswith(f"{field} ") and message.endswith("is not a phone number"):
            typed = getattr(args, field, None)
            if typed is not None:
                return (f"{field} {typed!r} is not a phone number (a national mobile such as "
                        "13800000001, or +86/0086 forms of it; x: 700 and 12 digits)")
    return message


async def _conflict_detail(store: Any, exc: BindingConflict, args: argparse.Namespace) -> str:
    """Which number is already bound on X, and to whom."""
    x, parties = getattr(args, "x", None), [getattr(args, k, None) for k in ("a", "b")]
    try:
        live = await store.get(x) if x else []
    except Exception:
        live = []
    from proxy.numbers import normalize_number

    wanted = {normalize_number(p) or p for p in parties if p}
    for binding in live:
        taken = wanted.intersection(binding.parties())
        if taken:
            other = [p for p in binding.parties() if p not in taken]
            left = max(0, round(binding.expires_at - time.time()))
            return (f"{', '.join(sorted(taken))} is already bound on x {binding.x} "
                    f"({binding.kind} binding with {', '.join(other) or 'no b'}, {left} s left): "
                    "a number is party to one binding per x; remove it first with "
                    f"sip700 unbind --x {binding.x} --number {sorted(taken)[0]}")
        if binding.kind == AXN or (binding.kind == AXB and args.bindings_command == "bind-axn"):
            return (f"x {binding.x} already carries an {binding.kind} binding (a {binding.a}): "
                    "an axn x carries nothing else")
    return str(exc)


def _store_detail(exc: Exception, cfg: Any) -> str:
    """The store's failure with where it was looked for and the system's reason."""
    cause: BaseException | None = exc
    while cause is not None and type(cause).__name__ == "StoreUnavailable":
        cause = cause.__cause__ or cause.__context__
    url = cfg.store.redis_url
    if "@" in url:  # never print a password
        scheme, _, rest = url.partition("://")
        url = f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    where = f"store.redis_url {url}"
    if cfg.store.sentinel is not None:
        where += f", sentinels {', '.join(cfg.store.sentinel.addresses)}"
    if cfg.store.cluster is not None:
        where += f", cluster nodes {', '.join(cfg.store.cluster.startup_nodes)}"
    reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
    errno = getattr(cause, "errno", None)
    if errno:
        reason += f" (errno {errno})"
    return f"the binding store did not answer ({where}): {reason}"


async def run_command(store: BindingStore, args: argparse.Namespace) -> int:
    """Run `args.command` (bind-axb, bind-axn, unbind, get, list, import); print JSON lines.

    Returns the exit status."""
    command = args.command
    if command == "bind-axb":
        print(binding_json(await bind_axb(store, args.x, args.a, args.b, args.ttl)))
    elif command == "bind-axn":
        print(binding_json(await bind_axn(store, args.x, args.a, args.b, args.ttl)))
    elif command == "unbind":
        removed = await unbind(store, args.x, args.number)
        print(json.dumps({"removed": removed}))
        return 0 if removed else 1
    elif command == "get":
        found = await get(store, args.x)
        for binding in found:
            print(binding_json(binding))
        if not found:
            print(f"no live binding on x {args.x}", file=sys.stderr)
            return 1
    elif command == "list":
        for binding in await list_bindings(store, args.prefix, args.limit):
            print(binding_json(binding))
    elif command == "import":
        started = time.perf_counter()
        bound, problems = await import_file(store, args.path, args.batch)
        for problem in problems:
            print(f"skipped {problem}")
        elapsed = time.perf_counter() - started
        print(json.dumps({"bound": bound, "skipped": len(problems), "seconds": round(elapsed, 2)}))
        return 0 if not problems else 2
    else:
        raise ValueError(f"unknown bindings command {command!r}")
    return 0


def binding_json(binding: Binding) -> str:
    """One binding as a JSON object, with its remaining TTL."""
    data = asdict(binding)
    data["type"] = data.pop("kind")
    data["ttl"] = max(0, round(binding.expires_at - time.time()))
    return json.dumps(data)
