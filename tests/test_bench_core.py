"""Smoke test of scripts/bench_core.py: a few calls through the production set-up."""

from __future__ import annotations

import pytest

from tests.scripts import load_script


@pytest.fixture(scope="module")
def bench():
    yield from load_script("bench_core")


def test_bench_core_runs_calls_with_timers_logging_and_privacy_checks(bench, capsys) -> None:
    result = bench.main(["20", "--bindings", "100", "--rounds", "2", "--warmup", "5",
                         "--check-every", "1"])
    assert [r.calls for r in result.rounds] == [20, 20]
    assert result.calls_made == 45
    assert result.transactions_left == 0
    assert all(r.transactions_left == 0 for r in result.rounds)
    assert result.privacy_checked_calls == 45  # every call, the warm-up's too
    assert result.privacy_checked_messages == 45 * 6  # no 100: the 180 comes 1 ms after
    assert result.stats.get("calls_routed") == 45
    assert result.stats.get("leaks_scrubbed", 0) > 0
    assert not result.stats.get("internal_errors")
    for r in result.rounds:
        assert r.messages_in == 6 * r.calls  # INVITE, 180, 200, ACK, BYE, 200
        assert r.messages_out == 6 * r.calls
        assert r.calls_cpu > 0 and r.timers_cpu > 0
        assert r.timer_runs > 0  # the core's timers fired on the simulated clock
        assert r.timer_sends == 0
        assert r.gc_runs > 0 and r.gc_cpu > 0  # the worker's young collections ran
    out = capsys.readouterr().out
    assert "20 calls x 2 rounds: core CPU per call best" in out
    assert "calls phase" in out and "timers phase" in out and "young collections" in out
    assert "0 transactions left" in out
    assert '"event": "call"' not in out  # the call log went to /dev/null


def test_bench_core_with_the_100_trying_sent_at_once(bench) -> None:
    result = bench.main(["10", "--bindings", "50", "--rounds", "1", "--warmup", "2",
                         "--trying-after-ms", "0"])
    assert result.rounds[0].messages_out == 7 * 10  # the 100 to every INVITE


def test_bench_core_in_the_harness_shape(bench, capsys, monkeypatch) -> None:
    """--shape harness: the shared harness's rows, so no number in Contact or SDP (nothing
    scrubbed there) and the privacy checks still pass."""
    sent: list[bytes] = []
    deliver = bench.Bench.deliver

    def recording(self, data, source):
        sent.append(data)
        return deliver(self, data, source)

    monkeypatch.setattr(bench.Bench, "deliver", recording)
    monkeypatch.setitem(bench.SHAPE, "shape", "production")  # restored after the test
    result = bench.main(["10", "--bindings", "50", "--rounds", "1", "--warmup", "2",
                         "--check-every", "1", "--shape", "harness"])
    assert result.privacy_checked_calls == 12 and result.transactions_left == 0
    assert not result.stats.get("leaks_scrubbed")  # the numbers sit in From, To, PAI only
    invites = [d for d in sent if d.startswith(b"INVITE")]
    assert invites and all(b"Contact: <sip:uac@" in d and b"o=user1 " in d for d in invites)
    oks = [d for d in sent if d.startswith(b"SIP/2.0 200") and b"o=uas " in d]
    assert len(oks) == 12 and all(b"Contact: <sip:127.0.0.1:15070;" in d for d in oks)
    assert "harness rows" in capsys.readouterr().out


def test_bench_core_fails_when_the_rewrite_stops(bench, monkeypatch) -> None:
    # what the callee side gets is the caller's INVITE as it came in, unrewritten (patched in
    # the bench's shell: the core itself may be compiled, scripts/build-compiled)
    from proxy.core import Outgoing

    deliver = bench.Bench.deliver

    def unrewritten(self, data, source):
        return [Outgoing(data, o.dest, o.transport, o.flow)
                if o.dest == bench.UAS and data.startswith(b"INVITE")
                else o for o in deliver(self, data, source)]

    monkeypatch.setattr(bench.Bench, "deliver", unrewritten)
    with pytest.raises(bench.BenchError, match="callee"):
        bench.main(["3", "--bindings", "10", "--rounds", "1", "--warmup", "0",
                    "--check-every", "1"])


def test_bench_core_with_cold_caches(bench, capsys) -> None:
    """--evict-kb: every datagram measured is delivered after the buffer was written (the calls
    still make their 6 messages each way), the report says so, a negative size is refused."""
    result = bench.main(["5", "--bindings", "20", "--rounds", "2", "--warmup", "1",
                         "--evict-kb", "64"])
    for r in result.rounds:
        assert r.evictions == r.messages_in == 6 * r.calls
    assert "cold caches: 64 KiB written" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["5", "--evict-kb", "-1"])


def test_bench_core_warm_by_default(bench) -> None:
    result = bench.main(["3", "--bindings", "10", "--rounds", "1", "--warmup", "0"])
    assert result.rounds[0].evictions == 0
