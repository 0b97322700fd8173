"""Call records through a running sip700, driven by real SIPp processes on both legs.

Real processes: the proxy (`python -m proxy run`, on the memory and on the Redis store, records
on, written to the machine's Redis under a key prefix of the test's own, deleted afterwards),
SIPp callers toward the proxy and SIPp callees on its gateway port. Each test reads the records
back from the Redis Stream and checks every field the flow determines.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from proxy.numbers import mask_number
from proxy.records.model import FIELDS, parse_iso
from tests.integration.procs import (
    REDIS_URL,
    ROOT,
    ProxyProcess,
    delete_redis_prefix,
    free_port,
    run_sipp,
    sipp_server,
)
from tests.integration.test_call_flows import (
    A1,
    A2,
    B1,
    B2,
    STRANGER,
    X1,
    X2,
    X_UNBOUND,
    CallPlan,
    assert_all_succeeded,
    run_flow,
)

pytestmark = pytest.mark.integration

BINDINGS = [
    {"type": "axb", "x": X1, "a": A1, "b": B1, "ttl": 3600, "id": "b1" * 16,
     "tenant": "shop1", "out_id": "out-1", "order_id": "order-1", "user_data": "ud-1"},
    {"type": "axb", "x": X2, "a": A2, "b": B2, "ttl": 3600},
    # one way only; B outside 139…, which uac_expect_reject refuses to see in a response
    {"type": "axb", "x": "700100000000003", "a": "13800000003", "b": "13700000003",
     "ttl": 3600, "direction": "a_to_b", "tenant": "shop1"},
]


def records_overrides(prefix: str, tmp: Path, **extra: object) -> dict:
    return {"records": {"enabled": True, "redis_url": REDIS_URL, "stream": f"{prefix}records",
                        "events_stream": f"{prefix}events",
                        "dead_letter_stream": f"{prefix}dead", "key_prefix": prefix,
                        "flush_ms": 20, "spool_dir": str(tmp / "spool"), **extra}}


@pytest.fixture
def recorded(start_sip700: Callable[..., ProxyProcess], tmp_path: Path
             ) -> Iterator[tuple[Callable[..., ProxyProcess], Callable[..., list[dict]]]]:
    """(start a proxy with records on, read its records: wait for n)."""
    prefix = f"sip700test:rec:{uuid.uuid4().hex[:10]}:"
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)

    def start(**kw: object) -> ProxyProcess:
        overrides = {**records_overrides(prefix, tmp_path), **kw.pop("overrides", {})}  # type: ignore[dict-item]
        return start_sip700(bindings=kw.pop("bindings", BINDINGS), overrides=overrides, **kw)

    def read(n: int, timeout: float = 10.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            rows = client.xrange(f"{prefix}records")
            if len(rows) >= n or time.monotonic() > deadline:
                return [fields for _id, fields in rows]
            time.sleep(0.05)

    yield start, read
    client.close()
    delete_redis_prefix(prefix)


def times_in_order(rec: dict, names: tuple[str, ...]) -> None:
    stamps = [parse_iso(rec[n]) for n in names]
    assert stamps == sorted(stamps), rec
    for n in names:
        assert rec[n].endswith("Z") and len(rec[n]) == 24, rec[n]  # ISO 8601 UTC, ms


def test_answered_calls_both_ways_one_record_each(recorded, tmp_path: Path) -> None:
    start, read = recorded
    proxy = start()
    plans = [CallPlan(A1, X1, B1, 1), CallPlan(B1, X1, A1, 2)]
    outcome = run_flow(proxy, tmp_path, caller="uac_basic.xml", callee="uas_basic.xml",
                       plans=plans, caller_extra=["-d", "1200"], rate=10)
    assert_all_succeeded(outcome, 2)
    recs = read(2)
    assert len(recs) == 2, recs
    time.sleep(0.3)
    assert len(read(2, 0)) == 2  # no duplicate
    a_to_b, b_to_a = sorted(recs, key=lambda r: r["direction"])
    for rec, (caller, callee, direction) in ((a_to_b, (A1, B1, "a_to_b")),
                                            (b_to_a, (B1, A1, "b_to_a"))):
        assert set(rec) <= set(FIELDS), rec
        assert (rec["caller"], rec["callee"], rec["x"], rec["display_number"]) == (
            caller, callee, X1, X1)
        assert rec["direction"] == direction
        assert (rec["binding_id"], rec["tenant"], rec["out_id"], rec["order_id"],
                rec["user_data"]) == ("b1" * 16, "shop1", "out-1", "order-1", "ud-1")
        assert (rec["sip_status"], rec["release_dir"], rec["q850_cause"]) == ("200", "caller",
                                                                              "16")
        assert "refusal" not in rec
        times_in_order(rec, ("invite_at", "forwarded_at", "ring_at", "answer_at",
                             "release_at"))
        assert int(rec["talk_s"]) in (1, 2), rec  # held 1.2 s, rounded up
        assert 0 <= int(rec["ring_ms"]) < 1000
        assert rec["gateway"] == f"sip:127.0.0.1:{proxy.gateway_port}"
        assert rec["instance"].endswith(("/0", "/1")) and len(rec["record_id"]) == 32
        assert rec["call_id"] and not rec["call_id"].startswith("s7")  # as A sent it
    assert a_to_b["record_id"] != b_to_a["record_id"]
    # logs still mask the numbers the records keep in full
    assert not [ln for ln in proxy.log_lines() if A1 in ln or B1 in ln]


@pytest.mark.parametrize(("caller", "callee", "plan", "expect"), [
    ("uac_callee_bye.xml", "uas_callee_bye.xml", (A1, X1, B1),
     {"release_dir": "callee", "sip_status": "200", "direction": "a_to_b"}),
    ("uac_cancel.xml", "uas_cancel.xml", (A1, X1, B1),
     {"release_dir": "caller", "sip_status": "487", "refusal": "cancelled"}),
    ("uac_busy.xml", "uas_busy.xml", (A1, X1, B1),
     {"release_dir": "callee", "sip_status": "486", "refusal": "busy", "q850_cause": "17"}),
    ("uac_early_bye.xml", "uas_early_bye.xml", (A1, X1, B1),
     {"release_dir": "caller", "refusal": "cancelled"}),
], ids=["callee_bye", "cancel", "busy_486", "early_bye"])
def test_how_a_call_ends_is_recorded(recorded, tmp_path: Path, caller: str, callee: str,
                                     plan: tuple[str, str, str], expect: dict) -> None:
    start, read = recorded
    proxy = start()
    outcome = run_flow(proxy, tmp_path, caller=caller, callee=callee,
                       plans=[CallPlan(*plan, 1)], callee_extra=["-d", "100"])
    assert_all_succeeded(outcome, 1)
    (rec,) = read(1)
    assert {k: rec.get(k) for k in expect} == expect, rec
    assert (rec["caller"], rec["callee"], rec["tenant"]) == (A1, B1, "shop1")
    if "refusal" in expect:
        assert "answer_at" not in rec and "talk_s" not in rec
        times_in_order(rec, ("invite_at", "forwarded_at", "release_at"))
    else:
        times_in_order(rec, ("invite_at", "forwarded_at", "answer_at", "release_at"))


def test_timer_c_no_answer_is_released_by_the_proxy(recorded, tmp_path: Path) -> None:
    start, read = recorded
    proxy = start(overrides={"timers": {"timer_c_s": 2}})
    outcome = run_flow(proxy, tmp_path, caller="uac_timer_c.xml", callee="uas_cancel.xml",
                       plans=[CallPlan(A1, X1, B1, 1)])
    assert_all_succeeded(outcome, 1)
    (rec,) = read(1)
    assert (rec["refusal"], rec["release_dir"], rec["sip_status"], rec["q850_cause"]) == (
        "no_answer", "proxy", "408", "102"), rec
    assert 1.9 < parse_iso(rec["release_at"]) - parse_iso(rec["forwarded_at"]) < 3.5


def test_refusals_are_recorded(recorded, tmp_path: Path) -> None:
    start, read = recorded
    proxy = start()
    outcome = run_flow(proxy, tmp_path, caller="uac_not_party.xml", callee="uas_basic.xml",
                       plans=[CallPlan(STRANGER, X1, B1, 1)], callee_calls=0)
    assert outcome.caller.returncode == 0, str(outcome)
    outcome = run_flow(proxy, tmp_path, caller="uac_no_binding.xml", callee="uas_basic.xml",
                       plans=[CallPlan(A1, X_UNBOUND, B1, 1)], callee_calls=0)
    assert outcome.caller.returncode == 0, str(outcome)
    not_party, no_binding = read(2)
    assert (not_party["refusal"], not_party["sip_status"], not_party["direction"],
            not_party["caller"], not_party["x"], not_party["release_dir"]) == (
        "not_party", "403", "refused", STRANGER, X1, "proxy"), not_party
    assert (no_binding["refusal"], no_binding["sip_status"], no_binding["x"]) == (
        "no_binding", "404", X_UNBOUND), no_binding
    for rec in (not_party, no_binding):
        assert "callee" not in rec and "forwarded_at" not in rec
        assert rec["q850_cause"] in ("21", "1")


def expect_reject(proxy: ProxyProcess, tmp_path: Path, x: str, caller: str, status: str,
                  local_ip: str = "127.0.0.1") -> None:
    """One INVITE from `caller` to `x` that the proxy must answer with `status` itself."""
    result = run_sipp("uac_expect_reject.xml", f"127.0.0.1:{proxy.port}",
                      free_port(host=local_ip), tmp_path, local_ip=local_ip,
                      extra=["-key", "ruri", f"sip:{x}@127.0.0.1", "-key", "a", caller,
                             "-key", "status", status])
    assert result.returncode == 0 and result.successful == 1, str(result)


def test_other_refusals_are_recorded(recorded, tmp_path: Path) -> None:
    """Direction restricted, untrusted peer (127.0.0.2) and a gateway answering 503: each
    gives one record with its `refusal`, who released it and the status."""
    start, read = recorded
    proxy = start()
    expect_reject(proxy, tmp_path, "700100000000003", "13700000003", "403 Direction Restricted")
    expect_reject(proxy, tmp_path, X1, A1, "403 Untrusted Peer", local_ip="127.0.0.2")
    with sipp_server("uas_503.xml", proxy.gateway_port, tmp_path):
        expect_reject(proxy, tmp_path, X1, A1, "503 No Gateway Available")
    restricted, untrusted, failed = read(3)
    assert (restricted["refusal"], restricted["sip_status"], restricted["direction"],
            restricted["release_dir"], restricted["caller"], restricted["tenant"]) == (
        "direction_restricted", "403", "refused", "proxy", "13700000003", "shop1"), restricted
    assert (untrusted["refusal"], untrusted["sip_status"], untrusted["direction"],
            untrusted["release_dir"], untrusted["caller"], untrusted["x"]) == (
        "untrusted_peer", "403", "refused", "proxy", A1, X1), untrusted
    for rec in (restricted, untrusted):
        assert "callee" not in rec and "forwarded_at" not in rec, rec
    # the only gateway answers 503: forwarded, then the proxy's own 503 No Gateway ends it
    assert (failed["refusal"], failed["sip_status"], failed["direction"], failed["callee"],
            failed["q850_cause"], failed["release_dir"]) == (
        "gateway_failure", "503", "a_to_b", B1, "41", "proxy"), failed
    assert failed["gateway"] == f"sip:127.0.0.1:{proxy.gateway_port}"
    assert "answer_at" not in failed and "talk_s" not in failed
    times_in_order(failed, ("invite_at", "forwarded_at", "release_at"))


def records_cli(proxy: ProxyProcess, *args: str) -> list[dict]:
    """`sip700 records …` against the proxy's config: its JSON lines."""
    done = subprocess.run([sys.executable, "-m", "proxy", "records", *args, "--config",
                           str(proxy.config_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_records_commands_show_numbers_masked_unless_full(recorded, tmp_path: Path) -> None:
    """`sip700 records tail` and `get --number|--call-id [--tenant] [--full]` for support."""
    start, read = recorded
    proxy = start()
    outcome = run_flow(proxy, tmp_path, caller="uac_basic.xml", callee="uas_basic.xml",
                       plans=[CallPlan(A1, X1, B1, 1)], caller_extra=["-d", "100"])
    assert_all_succeeded(outcome, 1)
    outcome = run_flow(proxy, tmp_path, caller="uac_not_party.xml", callee="uas_basic.xml",
                       plans=[CallPlan(STRANGER, X1, B1, 2)], callee_calls=0)
    assert outcome.caller.returncode == 0, str(outcome)
    answered, refused = read(2)

    tail = records_cli(proxy, "tail", "-n", "5")
    assert [r["record_id"] for r in tail] == [answered["record_id"], refused["record_id"]]
    assert tail[0]["caller"] == mask_number(A1) and tail[0]["callee"] == mask_number(B1)
    assert tail[1]["caller"] == mask_number(STRANGER) and tail[0]["x"] == X1
    assert isinstance(tail[0]["sip_status"], int) and isinstance(tail[0]["talk_s"], int)
    assert not [r for r in tail if A1 in json.dumps(r) or STRANGER in json.dumps(r)]

    newest_first = records_cli(proxy, "get", "--number", X1)
    assert [r["record_id"] for r in newest_first] == [refused["record_id"],
                                                      answered["record_id"]]
    (by_b,) = records_cli(proxy, "get", "--number", f"+86 {B1}", "--full")
    assert (by_b["caller"], by_b["callee"]) == (A1, B1)
    assert records_cli(proxy, "get", "--number", STRANGER, "--tenant", "shop1") == []
    (by_call_id,) = records_cli(proxy, "get", "--call-id", refused["call_id"], "--full")
    assert by_call_id["caller"] == STRANGER and by_call_id["refusal"] == "not_party"
