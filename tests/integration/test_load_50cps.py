"""1,000 calls at 50 calls per second through sip700, every call's translation checked.

Real processes: the proxy (memory and Redis store, through the `start_sip700` fixture) loaded
with 1,000 generated AXB bindings, `scripts/sipp/uas_basic.xml` on its gateway port and
`scripts/sipp/uac_basic.xml` calling it, CSV-driven like the benchmark harness: the caller
sends each call's id in X-Call-Plan, the callee looks the id up and checks the Request-URI,
From, To and P-Asserted-Identity users and that the caller's number appears nowhere; the
caller checks its From comes back and the callee's number never does. This is a correctness
test under sustained concurrency, not a speed measurement (see scripts/bench_*.py for those).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.integration.procs import ProxyProcess
from tests.integration.test_call_flows import (
    CallPlan,
    assert_all_succeeded,
    proxy_stats,
    run_flow,
)

CALLS = 1000
RATE = 50  # calls per second


def generated_plans(n: int) -> list[CallPlan]:
    """n distinct AXB bindings, half of them called A→X→B and half B→X→A.

    A = 13800000000 + i, X = 700200000000000 + i, B = 13900000000 + a permutation of i, so B
    is not a trivial function of A's digits (the bench harness's numbering plan).
    """
    plans = []
    for i in range(n):
        a, x = str(13800000000 + i), str(700200000000000 + i)
        b = str(13900000000 + (i * 7919 + 12345) % 100000000)
        plans.append(CallPlan(a, x, b, i) if i % 2 == 0 else CallPlan(b, x, a, i))
    return plans


def test_1000_calls_at_50_cps_all_translated(
    start_sip700: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    plans = generated_plans(CALLS)
    bindings = [
        {"type": "axb", "x": p.x, "a": min(p.caller, p.callee), "b": max(p.caller, p.callee),
         "ttl": 3600}
        for p in plans
    ]
    proxy = start_sip700(bindings=bindings)
    outcome = run_flow(proxy, tmp_path, caller="uac_basic.xml", callee="uas_basic.xml",
                       plans=plans, rate=RATE, caller_extra=["-d", "100"],
                       trace_messages=False, timeout=180)
    # every failed translation check fails its call on both legs (uas_basic.xml answers 500)
    assert_all_succeeded(outcome, CALLS)
    stats = proxy_stats(proxy)
    assert stats.get("calls_routed") == CALLS, stats
