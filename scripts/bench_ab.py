#!/usr/bin/env python3
"""Two variants of the proxy through the shared harness, alternated: A, B, A, B, …

This VM's speed drifts by 10-20 % within minutes, so a change is only measured against its
baseline run right before or after it. A variant is a checkout (`--a DIR`, `--b DIR`; default:
this one) and, optionally, a YAML overlay merged into the harness's own config (`--a-config`,
`--b-config`: the same listen address, carrier, store and pattern as `run.sh` writes, plus
whatever the overlay sets, e.g. `overload: {max_receive_wait_ms: 450}`).

    scripts/bench_ab.py --b ../other-checkout              this checkout against another
    scripts/bench_ab.py --b-config nolog.yaml --store redis   one config change, Redis store
    scripts/bench_ab.py --rates 4000 5500 --seconds 30 --pairs 3
    scripts/bench_ab.py --a kamailio --rates 200 1000 --seconds 30 --pairs 5
                                                          the standing bar: Kamailio against this

`kamailio` in place of a checkout runs the harness's reference proxy (`run.sh kamailio`, its
Redis GET per INVITE; it takes no overlay, and `--store` does not apply to it). `floor` runs
`scripts/bench_floor.py`, the deliberately minimal stateless forwarder, in sip700's place (the
memory store only, no overlay): what a call costs Python with nothing of a product around it.

Each run prints its verdict, failed calls, INVITE→200 p99 and max, the proxy's CPU (all its
processes, % of one core) and µs of it per call, Redis's CPU, and how often the workers entered
overload and how many calls they shed (from the proxy's log). The summary gives, per rate, each
variant's median CPU a call and the median of the pairs' ratios B / A: the figure to quote; and
each variant's median p99, the median of the pairs' p99 differences B − A, and in how many
pairs B's p99 was at most A's (one pair says little: the tail moves by a few tenths of a
millisecond from one run to the next).
Both variants run on the interpreter running this script (`--python` for another): build each
checkout's compiled modules with that interpreter (`scripts/build-compiled`), or neither.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROXY_PORT, CARRIER_PORT, REDIS_PORT = 15060, 15070, 16379  # the harness's fixed ports


def harness_config(store: str, bindings: Path) -> dict[str, Any]:
    """What `run.sh` writes for the project (start_project), as a mapping."""
    if store == "redis":
        backend: dict[str, Any] = {"backend": "redis",
                                   "redis_url": f"redis://127.0.0.1:{REDIS_PORT}/0"}
    else:
        backend = {"backend": "memory", "bindings_file": str(bindings)}
    return {
        "listen": [f"udp:127.0.0.1:{PROXY_PORT}"],
        "advertise": f"127.0.0.1:{PROXY_PORT}",
        "trusted_peers": ["127.0.0.1/32"],
        "carrier": {"gateways": [f"sip:127.0.0.1:{CARRIER_PORT}"]},
        "store": backend,
        "middle_number_pattern": r"^700\d{12}$",
    }


def merged(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """`overlay` over `base`: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def read_overlay(path: Path | None) -> dict[str, Any]:
    """An overlay file's mapping; a clear error for anything else."""
    if path is None:
        return {}
    data = yaml.safe_load(path.read_text())
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SystemExit(f"bench_ab: {path}: an overlay must be a YAML mapping")
    return data


def parse_result(output: str) -> dict[str, str]:
    """The fields of run.sh's RESULT line (empty when there is none), and its run directory."""
    fields: dict[str, str] = {}
    for line in output.splitlines():
        if line.startswith("RESULT "):
            fields.update(re.findall(r"(\w+)=(\S+)", line))
        found = re.search(r"run dir (\S+)", line)
        if found:
            fields["run_dir"] = found.group(1)
    return fields


def read_cpu(text: str) -> dict[str, float]:
    """run.sh's cpu.txt (`name percent` per line) as a mapping."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = float(parts[1])
            except ValueError:
                continue
    return out


def log_overloads(lines: Any) -> tuple[int, int]:
    """(overload episodes, calls shed) from the proxy's JSON log lines: the `overloaded`
    warnings, and the `calls_shed` counts in each worker's `stopping` line."""
    episodes = shed = 0
    for line in lines:
        if '"overloaded"' not in line and '"stopping"' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "overloaded":
            episodes += 1
        elif record.get("event") == "stopping":
            shed += int(record.get("stats", {}).get("calls_shed", 0))
    return episodes, shed


KAMAILIO: Final = "kamailio"  # in place of a checkout: the harness's reference proxy
FLOOR: Final = "floor"  # in place of a checkout: scripts/bench_floor.py, the minimal forwarder


@dataclass
class Variant:
    name: str
    checkout: Path | None  # None: Kamailio or the floor (`kind`)
    config: Path | None
    runs: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    kind: str = "checkout"  # or KAMAILIO, FLOOR

    @property
    def target(self) -> str:
        """run.sh's target: `project` (a checkout, the floor), or `kamailio`."""
        return KAMAILIO if self.kind == KAMAILIO else "project"


def run_once(bench: Path, variant: Variant, rate: int, seconds: int, store: str,
             python: str) -> dict[str, Any]:
    env = dict(os.environ)
    if variant.kind == FLOOR:  # run.sh writes its own config for it: the memory store
        for name in ("PROJECT_DIR", "PROJECT_CONFIG"):
            env.pop(name, None)
        env.update({"PROJECT_STORE": "memory",
                    "PROJECT_CMD": f"{python} {ROOT / 'scripts' / 'bench_floor.py'}"})
    elif variant.checkout is not None:
        env.update({"PROJECT_DIR": str(variant.checkout),
                    "PROJECT_CONFIG": str(variant.config), "PROJECT_STORE": store,
                    "PROJECT_CMD": f"{python} -m proxy"})
    proc = subprocess.run([str(bench / "run.sh"), variant.target, str(rate), str(seconds)],
                          cwd=variant.checkout or bench, env=env, capture_output=True,
                          text=True)
    fields: dict[str, Any] = parse_result(proc.stdout + "\n" + proc.stderr)
    run_dir = Path(fields.get("run_dir", "/nonexistent"))
    cpu = read_cpu((run_dir / "cpu.txt").read_text()) if (run_dir / "cpu.txt").exists() else {}
    fields["proxy_cpu"] = cpu.get(variant.target)
    fields["redis_cpu"] = cpu.get("redis")
    log = run_dir / "project.log"
    if log.exists():
        with log.open(errors="replace") as lines:
            fields["overloads"], fields["shed"] = log_overloads(lines)
    return fields


def us_per_call(run: dict[str, Any], rate: int) -> float | None:
    """The proxy's CPU a call (µs): its % of a core over the run, at the offered rate."""
    cpu = run.get("proxy_cpu")
    return None if cpu is None else cpu * 1e4 / rate


def paired_ratio(a: list[float | None], b: list[float | None]) -> float | None:
    """The median of B / A over the pairs that have both figures."""
    ratios = [y / x for x, y in zip(a, b, strict=False) if x and y is not None]
    return statistics.median(ratios) if ratios else None


def p99(run: dict[str, Any]) -> float | None:
    """The run's INVITE→200 p99 (ms), None when it has none."""
    try:
        return float(run["rt_p99_ms"])
    except (KeyError, TypeError, ValueError):
        return None


def paired_difference(a: list[float | None],
                      b: list[float | None]) -> tuple[float, int, int] | None:
    """Over the pairs with both figures: the median of B − A, how many pairs had B ≤ A, and
    how many pairs there were; None without any."""
    pairs = [(x, y) for x, y in zip(a, b, strict=False) if x is not None and y is not None]
    if not pairs:
        return None
    return (statistics.median(y - x for x, y in pairs), sum(y <= x for x, y in pairs),
            len(pairs))


def row(variant: Variant, rate: int, run: dict[str, Any]) -> str:
    us = us_per_call(run, rate)
    cpu = run.get("proxy_cpu")
    redis = run.get("redis_cpu")
    us_text = "?" if us is None else f"{us:.0f}"
    redis_text = "-" if redis is None else f"{redis:.1f}"
    return (f"{variant.name:2s} {rate:5d}  {run.get('verdict', 'NONE'):7s} "
            f"{run.get('failed', '?'):>7s} {run.get('rt_p99_ms', '?'):>8s} "
            f"{run.get('rt_max_ms', '?'):>8s} {'?' if cpu is None else f'{cpu:.1f}':>7s} "
            f"{us_text:>6s} {redis_text:>6s} "
            f"{run.get('overloads', '?'):>5} {run.get('shed', '?'):>6}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", default=str(ROOT),
                        help="checkout A (default: this one), `kamailio` or `floor`")
    parser.add_argument("--b", default=str(ROOT),
                        help="checkout B (default: this one), `kamailio` or `floor`")
    parser.add_argument("--a-config", type=Path, help="YAML overlay for A")
    parser.add_argument("--b-config", type=Path, help="YAML overlay for B")
    parser.add_argument("--store", choices=("memory", "redis"), default="memory")
    parser.add_argument("--rates", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter both variants run on (default: this one)")
    args = parser.parse_args(argv)
    bench = Path(os.environ.get("BENCH_DIR", ROOT.parent / "shared" / "bench"))
    if not (bench / "run.sh").exists():
        print(f"bench_ab: no harness at {bench} (set BENCH_DIR)", file=sys.stderr)
        return 2
    checkouts: dict[str, Path | None] = {}
    kinds: dict[str, str] = {}
    for name, given, overlay in (("A", args.a, args.a_config), ("B", args.b, args.b_config)):
        if given in (KAMAILIO, FLOOR):
            label = "Kamailio" if given == KAMAILIO else "the floor"
            if overlay is not None:
                print(f"bench_ab: --{name.lower()}-config: {label} takes no overlay",
                      file=sys.stderr)
                return 2
            if given == FLOOR and args.store != "memory":
                print(f"bench_ab: --{name.lower()} floor: the floor has the memory store only",
                      file=sys.stderr)
                return 2
            checkouts[name], kinds[name] = None, given
            continue
        kinds[name] = "checkout"
        checkout = Path(given)
        if not (checkout / "proxy" / "__main__.py").exists():
            print(f"bench_ab: {checkout} is not a sip700 checkout", file=sys.stderr)
            return 2
        checkouts[name] = checkout.resolve()
    bindings = Path(os.environ.get("BENCH_TMP", "/tmp/axb-bench")) / "data-100000" / "bindings.yaml"
    base = harness_config(args.store, bindings)
    with tempfile.TemporaryDirectory() as tmp:
        variants = []
        for name, overlay in (("A", args.a_config), ("B", args.b_config)):
            checkout = checkouts[name]
            if kinds[name] == KAMAILIO:
                variants.append(Variant(name, None, None, kind=KAMAILIO))
                print(f"{name}: Kamailio (run.sh kamailio: a Redis GET per INVITE)")
                continue
            if kinds[name] == FLOOR:
                variants.append(Variant(name, None, None, kind=FLOOR))
                print(f"{name}: the floor (scripts/bench_floor.py: a minimal stateless "
                      "forwarder)")
                continue
            assert checkout is not None
            config = Path(tmp) / f"{name}.yaml"
            config.write_text(yaml.safe_dump(merged(base, read_overlay(overlay)),
                                             sort_keys=False))
            variants.append(Variant(name, checkout, config))
            print(f"{name}: {checkout}"
                  + (f" + {overlay}" if overlay else "") + f", {args.store} store")
        print("   rate   verdict  failed  p99 ms   max ms   CPU %  µs/call redis% over   shed")
        for rate in args.rates:
            for _ in range(args.pairs):
                for variant in variants:
                    result = run_once(bench, variant, rate, args.seconds, args.store,
                                      args.python)
                    variant.runs.setdefault(rate, []).append(result)
                    print(row(variant, rate, result), flush=True)
        print()
        for rate in args.rates:
            figures = {}
            tails = {}
            for variant in variants:
                runs = variant.runs[rate]
                figures[variant.name] = costs = [us_per_call(r, rate) for r in runs]
                per_call = [u for u in costs if u is not None]
                failed = sum(int(r.get("failed", 0) or 0) for r in runs)
                passed = sum(r.get("verdict") == "PASS" for r in runs)
                median = f"{statistics.median(per_call):.0f} µs" if per_call else "?"
                tails[variant.name] = p99s = [p99(r) for r in runs]
                known = [t for t in p99s if t is not None]
                tail = f"{statistics.median(known):.2f} ms" if known else "?"
                print(f"{rate} CPS {variant.name}: {passed}/{len(runs)} passed, {failed} failed "
                      f"calls, median {median} of CPU a call, median p99 {tail}")
            ratio = paired_ratio(figures["A"], figures["B"])
            if ratio is not None:
                print(f"{rate} CPS: B / A, median of the {args.pairs} pairs: "
                      f"{100 * (ratio - 1):+.1f} % CPU a call")
            difference = paired_difference(tails["A"], tails["B"])
            if difference is not None:
                median_diff, at_most, count = difference
                print(f"{rate} CPS: p99 B − A, median of the pairs: {median_diff:+.2f} ms; "
                      f"B's p99 at most A's in {at_most} of {count} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
