"""Call flows through a running sip700, driven by real SIPp processes on both legs.

Real processes: the proxy (`python -m proxy run`; every test that starts one runs on the memory
and on the Redis store, see conftest.py), a SIPp callee scenario on the proxy's gateway port
(the carrier leg) and a SIPp caller scenario toward the proxy. The scenarios live in
scripts/sipp/ and carry the checks: the callee side verifies the translation of every request
(Request-URI user = callee, From/To/PAI user = X, no form of the caller's real number anywhere)
and answers 500 when a check fails; the caller side fails the call when any form of the
callee's real number reaches it or its own From does not come back. Each test asserts both
SIPp exit codes and the call counts on both legs, and the proxy's own counters where they show
what happened (ACKs forwarded or absorbed, Timer C).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.integration.procs import (
    ProxyProcess,
    SippResult,
    free_port,
    run_sipp,
    server_counts,
    sipp_server,
)

X1, A1, B1 = "700100000000001", "13800000001", "13900000001"  # default test binding 1
X2, A2, B2 = "700100000000002", "13800000002", "13900000002"  # default test binding 2
STRANGER = "13700000001"  # in no binding
X_UNBOUND = "700100000000009"  # a middle number with no binding

# SIPp options: no call waits forever; message traces (in tmp_path) for post-mortems
NO_HANG = ["-recv_timeout", "10000"]
COMMON_SIPP = [*NO_HANG, "-trace_msg"]


@dataclass(frozen=True)
class CallPlan:
    """One call: who dials X, and who must receive it (each hidden from the other)."""

    caller: str
    x: str
    callee: str
    id: int


@dataclass
class FlowOutcome:
    """What both SIPp legs reported for one run."""

    caller: SippResult
    callee_rc: int | None
    callee_ok: int
    callee_failed: int
    callee_created: int
    callee_errors: str

    def __str__(self) -> str:
        return (f"caller: {self.caller}\ncallee: rc={self.callee_rc} ok={self.callee_ok} "
                f"failed={self.callee_failed} created={self.callee_created}\n"
                f"callee errors:\n{self.callee_errors[-3000:]}")


def write_plans(workdir: Path, plans: Sequence[CallPlan]) -> tuple[Path, Path]:
    """caller.csv (caller;x;hidden;id) and callee.csv (id;callee;x;hidden) for the scenarios."""
    caller_csv = workdir / "caller.csv"
    callee_csv = workdir / "callee.csv"
    caller_csv.write_text("SEQUENTIAL\n" + "".join(
        f"{p.caller};{p.x};{p.callee};{p.id}\n" for p in plans))
    callee_csv.write_text("SEQUENTIAL\n" + "".join(
        f"{p.id};{p.callee};{p.x};{p.caller}\n" for p in plans))
    return caller_csv, callee_csv


def stat_value(workdir: Path, scenario: str, port: int, column: str) -> int:
    """A cumulative counter from the last row of a SIPp -trace_stat file (0 if none)."""
    stat = workdir / f"{scenario}.{port}.stat.csv"
    lines = [ln for ln in stat.read_text().splitlines() if ln.strip()] if stat.exists() else []
    if len(lines) < 2:
        return 0
    row = dict(zip(lines[0].split(";"), lines[-1].split(";"), strict=False))
    return int(row.get(column, 0))


def run_flow(
    proxy: ProxyProcess, workdir: Path, *, caller: str, callee: str,
    plans: Sequence[CallPlan], callee_calls: int | None = None, rate: float = 10,
    caller_extra: Sequence[str] = (), callee_extra: Sequence[str] = (),
    trace_messages: bool = True, timeout: float = 60,
) -> FlowOutcome:
    """Run `callee` on the proxy's gateway port and `caller` toward the proxy, one call per plan.

    The callee scenario stops by itself after `callee_calls` calls (default: one per plan), so
    its counts are final; with `callee_calls=0` it runs until the caller is done (for flows
    that must not reach the carrier leg at all).
    """
    caller_csv, callee_csv = write_plans(workdir, plans)
    expected = len(plans) if callee_calls is None else callee_calls
    common = COMMON_SIPP if trace_messages else NO_HANG
    gw = proxy.gateway_port
    callee_rc: int | None = None
    with sipp_server(callee, gw, workdir, calls=expected, csv=callee_csv,
                     extra=["-infindex", "callee.csv", "0", *common, *callee_extra]) as server:
        result = run_sipp(caller, f"127.0.0.1:{proxy.port}", free_port(), workdir,
                          calls=len(plans), rate=rate, csv=caller_csv,
                          extra=[*common, *caller_extra], timeout=timeout)
        if expected:
            try:
                callee_rc = server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                callee_rc = None  # still waiting for a message: the counts below tell
    ok, failed = server_counts(callee, gw, workdir)
    errors_file = workdir / f"{callee}.{gw}.errors.log"
    return FlowOutcome(
        caller=result, callee_rc=callee_rc, callee_ok=ok, callee_failed=failed,
        callee_created=stat_value(workdir, callee, gw, "TotalCallCreated"),
        callee_errors=errors_file.read_text(errors="replace") if errors_file.exists() else "",
    )


def assert_all_succeeded(outcome: FlowOutcome, calls: int) -> None:
    assert outcome.caller.returncode == 0, str(outcome)
    assert (outcome.caller.successful, outcome.caller.failed) == (calls, 0), str(outcome)
    assert outcome.callee_rc == 0, str(outcome)
    assert (outcome.callee_ok, outcome.callee_failed) == (calls, 0), str(outcome)


def assert_no_number_logged(proxy: ProxyProcess, numbers: Sequence[str]) -> None:
    """Logs are a leak channel too: real numbers appear only masked (138****0001)."""
    leaked = [ln for ln in proxy.log_lines() if any(n in ln for n in numbers)]
    assert not leaked, "unmasked numbers in the proxy log:\n" + "\n".join(leaked[:5])


def assert_non_2xx_ack_absorbed(stats: dict[str, int]) -> None:
    """The caller's ACK for a non-2xx final response ends at the proxy's server transaction
    (RFC 3261 §17.2.1): neither forwarded nor dropped as an unroutable in-dialog ACK."""
    assert "acks_forwarded" not in stats and "dropped_unroutable_ack" not in stats, stats


def proxy_stats(proxy: ProxyProcess) -> dict[str, int]:
    """Stop the proxy and return its counters (summed over its workers)."""
    return proxy.stop_and_read_stats()


StartProxy = Callable[..., ProxyProcess]


# ---- 1, 2: basic calls both ways ----------------------------------------------------------------

def test_basic_call_a_to_b_hides_each_side(start_sip700: StartProxy, tmp_path: Path) -> None:
    """A→X→B for both default bindings: B sees only X, A gets its own From back and no B."""
    proxy = start_sip700()
    plans = [CallPlan(A1, X1, B1, 1), CallPlan(A2, X2, B2, 2)]
    outcome = run_flow(proxy, tmp_path, caller="uac_basic.xml", callee="uas_basic.xml",
                       plans=plans, caller_extra=["-d", "100"])
    assert_all_succeeded(outcome, 2)
    assert_no_number_logged(proxy, [A1, B1, A2, B2])
    stats = proxy_stats(proxy)
    assert (stats.get("calls_routed"), stats.get("acks_forwarded")) == (2, 2), stats


def test_basic_call_b_to_a_hides_each_side(start_sip700: StartProxy, tmp_path: Path) -> None:
    """B→X→A, the binding's callee calling back: A sees only X, B never sees A."""
    proxy = start_sip700()
    plans = [CallPlan(B1, X1, A1, 1), CallPlan(B2, X2, A2, 2)]
    outcome = run_flow(proxy, tmp_path, caller="uac_basic.xml", callee="uas_basic.xml",
                       plans=plans, caller_extra=["-d", "100"])
    assert_all_succeeded(outcome, 2)
    stats = proxy_stats(proxy)
    assert (stats.get("calls_routed"), stats.get("acks_forwarded")) == (2, 2), stats


# ---- 3: refused calls never reach the carrier leg -----------------------------------------------

def test_third_party_gets_403_and_nothing_reaches_the_carrier(
    start_sip700: StartProxy, tmp_path: Path
) -> None:
    proxy = start_sip700()
    outcome = run_flow(proxy, tmp_path, caller="uac_not_party.xml", callee="uas_basic.xml",
                       plans=[CallPlan(STRANGER, X1, B1, 1)], callee_calls=0)
    assert outcome.caller.returncode == 0, str(outcome)
    assert (outcome.caller.successful, outcome.caller.failed) == (1, 0), str(outcome)
    assert outcome.callee_created == 0, str(outcome)
    stats = proxy_stats(proxy)
    assert stats.get("calls_not_a_party") == 1 and "calls_routed" not in stats, stats


def test_middle_number_without_binding_gets_404_and_nothing_reaches_the_carrier(
    start_sip700: StartProxy, tmp_path: Path
) -> None:
    proxy = start_sip700()
    outcome = run_flow(proxy, tmp_path, caller="uac_no_binding.xml", callee="uas_basic.xml",
                       plans=[CallPlan(A1, X_UNBOUND, B1, 1)], callee_calls=0)
    assert outcome.caller.returncode == 0, str(outcome)
    assert (outcome.caller.successful, outcome.caller.failed) == (1, 0), str(outcome)
    assert outcome.callee_created == 0, str(outcome)
    stats = proxy_stats(proxy)
    assert stats.get("calls_no_binding") == 1 and "calls_routed" not in stats, stats


# ---- 4, 5, 6, 7: who ends the call, and how -----------------------------------------------------

def test_callee_hangs_up(start_sip700: StartProxy, tmp_path: Path) -> None:
    """The callee's BYE reaches the caller with From user X and R-URI/To user restored to A."""
    proxy = start_sip700()
    outcome = run_flow(proxy, tmp_path, caller="uac_callee_bye.xml",
                       callee="uas_callee_bye.xml", plans=[CallPlan(A1, X1, B1, 1)],
                       callee_extra=["-d", "100"])
    assert_all_succeeded(outcome, 1)
    assert proxy_stats(proxy).get("acks_forwarded") == 1


def test_caller_bye_in_early_dialog(start_sip700: StartProxy, tmp_path: Path) -> None:
    """BYE after 180 follows the early dialog's Route; the callee answers 200 and 487."""
    proxy = start_sip700()
    outcome = run_flow(proxy, tmp_path, caller="uac_early_bye.xml", callee="uas_early_bye.xml",
                       plans=[CallPlan(A1, X1, B1, 1)])
    assert_all_succeeded(outcome, 1)
    assert_non_2xx_ack_absorbed(proxy_stats(proxy))


def test_cancel_while_ringing(start_sip700: StartProxy, tmp_path: Path) -> None:
    """200 to CANCEL from the proxy, CANCEL downstream, 487 relayed, each ACK hop by hop."""
    proxy = start_sip700()
    outcome = run_flow(proxy, tmp_path, caller="uac_cancel.xml", callee="uas_cancel.xml",
                       plans=[CallPlan(A1, X1, B1, 1)])
    assert_all_succeeded(outcome, 1)
    assert_non_2xx_ack_absorbed(proxy_stats(proxy))


def test_busy_callee_486_is_relayed(start_sip700: StartProxy, tmp_path: Path) -> None:
    """The 486 reaches the caller; the callee gets the proxy's own ACK (same branch)."""
    proxy = start_sip700()
    outcome = run_flow(proxy, tmp_path, caller="uac_busy.xml", callee="uas_busy.xml",
                       plans=[CallPlan(A1, X1, B1, 1)])
    assert_all_succeeded(outcome, 1)
    assert_non_2xx_ack_absorbed(proxy_stats(proxy))


# ---- 8: Timer C ---------------------------------------------------------------------------------

def test_timer_c_cancels_an_unanswered_call(start_sip700: StartProxy, tmp_path: Path) -> None:
    """The callee rings and waits: after timer_c_s the caller gets 408, the callee a CANCEL."""
    proxy = start_sip700(overrides={"timers": {"timer_c_s": 2}})
    outcome = run_flow(proxy, tmp_path, caller="uac_timer_c.xml", callee="uas_cancel.xml",
                       plans=[CallPlan(A1, X1, B1, 1)])
    assert_all_succeeded(outcome, 1)
    stats = proxy_stats(proxy)
    assert stats.get("timer_c_fired") == 1, stats
    assert_non_2xx_ack_absorbed(stats)


# ---- 9, 10: mid-call and early-dialog requests --------------------------------------------------

def test_reinvite_from_both_sides(start_sip700: StartProxy, tmp_path: Path) -> None:
    """re-INVITEs from the caller, then from the callee: each side still sees only X."""
    proxy = start_sip700()
    outcome = run_flow(proxy, tmp_path, caller="uac_reinvite.xml", callee="uas_reinvite.xml",
                       plans=[CallPlan(A1, X1, B1, 1)], caller_extra=["-d", "100"])
    assert_all_succeeded(outcome, 1)
    assert proxy_stats(proxy).get("acks_forwarded") == 3  # the 2xx ACKs, end to end


def test_reliable_183_and_prack(start_sip700: StartProxy, tmp_path: Path) -> None:
    """183 with Require: 100rel + RSeq, PRACK along the early dialog's Route, then 200."""
    proxy = start_sip700()
    outcome = run_flow(proxy, tmp_path, caller="uac_prack.xml", callee="uas_prack.xml",
                       plans=[CallPlan(A1, X1, B1, 1)], caller_extra=["-d", "100"])
    assert_all_succeeded(outcome, 1)
    assert proxy_stats(proxy).get("acks_forwarded") == 1


# ---- the checks themselves can fail -------------------------------------------------------------

def test_callee_checks_fail_a_call_that_bypasses_the_proxy(tmp_path: Path) -> None:
    """Control: an untranslated INVITE (caller straight to the callee) fails on both legs."""
    callee_port = free_port()
    _, callee_csv = write_plans(tmp_path, [CallPlan(A1, X1, B1, 1)])
    with sipp_server("uas_basic.xml", callee_port, tmp_path, calls=1, csv=callee_csv,
                     extra=["-infindex", "callee.csv", "0", *COMMON_SIPP]) as server:
        result = run_sipp("uac_basic.xml", f"127.0.0.1:{callee_port}", free_port(), tmp_path,
                          csv=tmp_path / "caller.csv", extra=COMMON_SIPP)
        server.wait(timeout=20)
    assert result.returncode != 0, str(result)
    assert (result.successful, result.failed) == (0, 1), str(result)
    assert server_counts("uas_basic.xml", callee_port, tmp_path) == (0, 1)
    messages = "".join(p.read_text() for p in tmp_path.glob("uac_basic_*_messages.log"))
    assert "500 Translation Check Failed" in messages


def test_caller_leak_check_fails_a_call(start_sip700: StartProxy, tmp_path: Path) -> None:
    """Control: a number the caller must not see, present in a response, fails the call.

    The caller's own number is in the 403's From, so naming it as the hidden number must fail.
    """
    proxy = start_sip700()
    outcome = run_flow(proxy, tmp_path, caller="uac_not_party.xml", callee="uas_basic.xml",
                       plans=[CallPlan(STRANGER, X1, STRANGER, 1)], callee_calls=0)
    assert outcome.caller.returncode != 0, str(outcome)
    assert (outcome.caller.successful, outcome.caller.failed) == (0, 1), str(outcome)
