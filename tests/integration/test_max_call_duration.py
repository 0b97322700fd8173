"""Maximum call duration through a running sip700: the proxy ends the call itself.

Real processes: the proxy (`python -m proxy run`, memory and Redis stores, records on, written
to the machine's Redis under a key prefix of the test's own), a SIPp caller that never hangs up
(uac_max_duration.xml: it waits for the proxy's BYE and answers 200) and a SIPp callee on the
gateway port (uas_basic.xml, which also waits for a BYE and answers it). The BYEs are checked
by the scenarios (no form of the other party's number; Request-URI, From and To as each side
knows the dialog); the record and the counters by the test. A binding made through the API
runs on a proxy with the binding API in worker 0 of two.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.records.model import parse_iso
from tests.integration.procs import ProxyProcess
from tests.integration.test_api_calls import A as API_A
from tests.integration.test_api_calls import B as API_B
from tests.integration.test_api_calls import X as API_X
from tests.integration.test_api_calls import create, proxy  # noqa: F401 (fixture)
from tests.integration.test_call_flows import (
    A1,
    B1,
    X1,
    CallPlan,
    assert_all_succeeded,
    assert_no_number_logged,
    proxy_stats,
    run_flow,
)
from tests.integration.test_records import BINDINGS, recorded  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

LIMIT_S = 3


def call_the_proxy_ends(sip700: ProxyProcess, tmp_path: Path, plan: CallPlan) -> None:
    """One call whose caller never hangs up: the proxy ends it after LIMIT_S."""
    began = time.monotonic()
    outcome = run_flow(sip700, tmp_path, caller="uac_max_duration.xml", callee="uas_basic.xml",
                       plans=[plan], timeout=40)
    took = time.monotonic() - began
    assert_all_succeeded(outcome, 1)
    assert LIMIT_S <= took < LIMIT_S + 10, took


def ended_by_proxy(start: Callable, read: Callable, tmp_path: Path, *,
                   bindings: list[dict], overrides: dict | None = None) -> None:
    sip700 = start(bindings=bindings, overrides=overrides or {})
    call_the_proxy_ends(sip700, tmp_path, CallPlan(A1, X1, B1, 1))
    (rec,) = read(1)
    assert rec["release_dir"] == "proxy" and rec["sip_status"] == "200", rec
    talk = parse_iso(rec["release_at"]) - parse_iso(rec["answer_at"])
    assert LIMIT_S - 0.5 <= talk <= LIMIT_S + 0.5, rec
    assert rec["talk_s"] == str(LIMIT_S), rec
    assert_no_number_logged(sip700, [A1, B1])
    lines = [ln for ln in sip700.log_lines() if "call_ended" in ln]
    assert len(lines) == 1 and "max_call_duration" in lines[0], lines
    stats = proxy_stats(sip700)
    assert stats.get("calls_ended_max_duration") == 1, stats
    assert stats.get("proxy_byes_answered") == 2, stats  # the 200s were absorbed
    assert "proxy_bye_timeouts" not in stats, stats


def test_binding_max_call_s_from_the_bindings_file(recorded, tmp_path: Path) -> None:  # noqa: F811
    start, read = recorded
    bindings = [{**BINDINGS[0], "max_call_s": LIMIT_S}, BINDINGS[1]]
    ended_by_proxy(start, read, tmp_path, bindings=bindings,
                   overrides={"policy": {"max_call_s": 600}})


def test_global_cap_policy_max_call_s(recorded, tmp_path: Path) -> None:  # noqa: F811
    start, read = recorded
    ended_by_proxy(start, read, tmp_path, bindings=BINDINGS,
                   overrides={"policy": {"max_call_s": LIMIT_S}})


def test_binding_max_call_s_from_the_api(proxy, tmp_path: Path) -> None:  # noqa: F811
    create(proxy, max_call_s=LIMIT_S)
    call_the_proxy_ends(proxy, tmp_path, CallPlan(API_A, API_X, API_B, 1))
    stats = proxy.stop_and_read_stats()
    assert stats.get("calls_ended_max_duration") == 1, stats
    assert stats.get("proxy_byes_answered") == 2, stats
