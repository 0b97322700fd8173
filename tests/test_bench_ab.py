"""scripts/bench_ab.py: the configs it writes, and how it reads the harness's output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from proxy.config import load_config_text
from tests.scripts import load_script


@pytest.fixture(scope="module")
def ab():
    yield from load_script("bench_ab")


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_the_harness_config_with_an_overlay_is_a_valid_config(ab, tmp_path, store) -> None:
    bindings = tmp_path / "bindings.yaml"
    bindings.write_text("bindings: []\n")
    overlay = {"overload": {"max_receive_wait_ms": 450},
               "carrier": {"gateways": ["sip:127.0.0.2:15070"]}}
    text = yaml.safe_dump(ab.merged(ab.harness_config(store, bindings), overlay))
    cfg = load_config_text(text, tmp_path / "ab.yaml")
    assert cfg.overload.max_receive_wait_ms == 450
    assert cfg.store.backend == store
    assert [e.port for e in cfg.listen_endpoints] == [15060]
    data = yaml.safe_load(text)
    assert data["carrier"]["gateways"] == ["sip:127.0.0.2:15070"]  # replaced, not appended
    assert data["middle_number_pattern"] == r"^700\d{12}$"


def test_merged_merges_mappings_and_replaces_the_rest(ab) -> None:
    base = {"store": {"backend": "memory", "bindings_file": "b.yaml"}, "listen": ["udp:a"]}
    out = ab.merged(base, {"store": {"backend": "redis"}, "listen": ["udp:b"], "new": 1})
    assert out == {"store": {"backend": "redis", "bindings_file": "b.yaml"},
                   "listen": ["udp:b"], "new": 1}
    assert base["store"]["backend"] == "memory"  # the base is left as it was


def test_an_overlay_that_is_not_a_mapping_is_refused_by_name(ab, tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(SystemExit, match=r"bad\.yaml: an overlay must be a YAML mapping"):
        ab.read_overlay(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert ab.read_overlay(empty) == {}


def test_parse_result_reads_the_result_line_and_the_run_directory(ab) -> None:
    output = ("[run.sh 13:46:05] run dir /tmp/axb-bench/runs/20261206-134605-1-project-200\n"
              "RESULT target=project rate=200 secs=5 failed=3 rt_p99_ms=1.99 "
              "cpu=sipp_uac:4%,project:11%,redis:0%,sipp_uas:4% verdict=FAIL\n")
    fields = ab.parse_result(output)
    assert fields["run_dir"] == "/tmp/axb-bench/runs/20261206-134605-1-project-200"
    assert (fields["failed"], fields["rt_p99_ms"], fields["verdict"]) == ("3", "1.99", "FAIL")
    assert ab.parse_result("run.sh: project exited during start-up\n") == {}


def test_read_cpu_and_the_cost_of_a_call(ab) -> None:
    cpu = ab.read_cpu("sipp_uac 12.1\nproject 38.3\nredis 0.1\nsipp_uas 13.8\nnoise\n")
    assert cpu == {"sipp_uac": 12.1, "project": 38.3, "redis": 0.1, "sipp_uas": 13.8}
    assert ab.us_per_call({"proxy_cpu": 38.3}, 1000) == pytest.approx(383.0)
    assert ab.us_per_call({"proxy_cpu": None}, 1000) is None


def test_log_overloads_counts_episodes_and_shed_calls(ab) -> None:
    lines = [
        json.dumps({"event": "call", "outcome": "overloaded"}),  # not an episode
        json.dumps({"event": "overloaded", "receive_wait_ms": 304}),
        json.dumps({"event": "overload_cleared"}),
        json.dumps({"event": "overloaded", "receive_wait_ms": 301}),
        '{"event": "overloaded", truncated',
        json.dumps({"event": "stopping", "worker": 0, "stats": {"calls_shed": 2985}}),
        json.dumps({"event": "stopping", "worker": 1, "stats": {"calls_routed": 5}}),
    ]
    assert ab.log_overloads(lines) == (2, 2985)


def test_paired_ratio_is_the_median_of_the_pairs(ab) -> None:
    assert ab.paired_ratio([100.0, 200.0, 100.0], [110.0, 180.0, 130.0]) == pytest.approx(1.1)
    assert ab.paired_ratio([None, 100.0], [90.0, None]) is None


def test_without_the_harness_it_says_where_it_looked(ab, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("BENCH_DIR", str(tmp_path))
    assert ab.main(["--rates", "100", "--pairs", "1"]) == 2
    assert f"no harness at {tmp_path}" in capsys.readouterr().err


def test_a_directory_that_is_not_a_checkout_is_refused(ab, tmp_path, monkeypatch,
                                                        capsys) -> None:
    (tmp_path / "run.sh").write_text("#!/bin/sh\n")
    monkeypatch.setenv("BENCH_DIR", str(tmp_path))
    assert ab.main(["--b", str(tmp_path)]) == 2
    assert f"{tmp_path} is not a sip700 checkout" in capsys.readouterr().err


def test_paired_difference_gives_the_median_and_how_often_b_was_not_worse(ab) -> None:
    assert ab.paired_difference([2.31, 2.11, 2.50], [2.54, 2.10, 2.70]) == \
        pytest.approx((0.2, 1, 3))
    assert ab.paired_difference([2.0, None], [None, 3.0]) is None
    assert ab.p99({"rt_p99_ms": "2.54"}) == pytest.approx(2.54)
    assert ab.p99({"rt_p99_ms": "?"}) is None
    assert ab.p99({}) is None


def test_kamailio_and_the_floor_take_no_overlay_and_the_floor_no_redis(
        ab, tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "run.sh").write_text("#!/bin/sh\n")
    overlay = tmp_path / "o.yaml"
    overlay.write_text("overload: {max_receive_wait_ms: 450}\n")
    monkeypatch.setenv("BENCH_DIR", str(tmp_path))
    assert ab.main(["--a", "kamailio", "--a-config", str(overlay)]) == 2
    assert "--a-config: Kamailio takes no overlay" in capsys.readouterr().err
    assert ab.main(["--b", "floor", "--b-config", str(overlay)]) == 2
    assert "--b-config: the floor takes no overlay" in capsys.readouterr().err
    assert ab.main(["--a", "floor", "--store", "redis"]) == 2
    assert "the floor has the memory store only" in capsys.readouterr().err


def test_kamailio_against_a_checkout_runs_each_target_and_reads_its_own_cpu(
        ab, tmp_path, monkeypatch, capsys) -> None:
    """A stand-in harness (the real one takes minutes): it records how it was called and
    answers the way run.sh does, so what is checked is bench_ab's side of the contract."""
    calls = _stand_in_harness(tmp_path, """
echo "$1 $2 $3 ${PROJECT_DIR:-none} ${PROJECT_STORE:-none}" >> "$calls"
if [ "$1" = kamailio ]; then cpu=40; p99=2.3$n; else cpu=36; p99=2.4$n; fi
printf 'sipp_uac 10.0\\n%s %s\\nredis 3.0\\nsipp_uas 11.0\\n' "$1" "$cpu" > "$dir/cpu.txt"
""")
    monkeypatch.setenv("BENCH_DIR", str(tmp_path))
    assert ab.main(["--a", "kamailio", "--rates", "1000", "--seconds", "2",
                    "--pairs", "2"]) == 0
    lines = calls.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["kamailio", "project"] * 2
    assert lines[0].split()[3:] == ["none", "none"]  # Kamailio: no PROJECT_* variables
    assert lines[1].split()[1:3] == ["1000", "2"]
    assert lines[1].split()[3] == str(ab.ROOT)
    out = capsys.readouterr().out
    assert "A: Kamailio" in out
    assert "1000 CPS A: 2/2 passed, 0 failed calls, median 400 µs of CPU a call" in out
    assert "1000 CPS B: 2/2 passed, 0 failed calls, median 360 µs of CPU a call" in out
    assert "B / A, median of the 2 pairs: -10.0 % CPU a call" in out
    # pairs: 2.30 / 2.41 and 2.32 / 2.43: B over by 0.11 ms in both
    assert "p99 B − A, median of the pairs: +0.11 ms; B's p99 at most A's in 0 of 2 pairs" in out


def test_the_floor_runs_as_the_project_target_with_its_own_command(
        ab, tmp_path, monkeypatch, capsys) -> None:
    """`--a floor`: run.sh's project target with PROJECT_CMD naming scripts/bench_floor.py,
    the memory store, and no checkout or config of a caller's environment."""
    calls = _stand_in_harness(tmp_path, """
cmd=${PROJECT_CMD:-none}; dir_=${PROJECT_DIR:-none}
echo "$1|$cmd|$dir_|${PROJECT_CONFIG:-none}|${PROJECT_STORE:-none}" >> "$calls"
case "$PROJECT_CMD" in *bench_floor.py) cpu=20 ;; *) cpu=50 ;; esac
printf '%s %s\\n' "$1" "$cpu" > "$dir/cpu.txt"
p99=1.5
""")
    monkeypatch.setenv("BENCH_DIR", str(tmp_path))
    monkeypatch.setenv("PROJECT_CONFIG", "/somewhere/else.yaml")
    assert ab.main(["--a", "floor", "--rates", "1000", "--seconds", "2", "--pairs", "1"]) == 0
    floor, checkout = (line.split("|") for line in calls.read_text().splitlines())
    assert floor[0] == "project"
    assert floor[1].endswith(" " + str(ab.ROOT / "scripts" / "bench_floor.py"))
    assert floor[2:] == ["none", "none", "memory"]
    assert checkout[1].endswith(" -m proxy") and checkout[2] == str(ab.ROOT)
    out = capsys.readouterr().out
    assert "A: the floor" in out
    assert "1000 CPS A: 1/1 passed, 0 failed calls, median 200 µs of CPU a call" in out
    assert "B / A, median of the 1 pairs: +150.0 % CPU a call" in out


def _stand_in_harness(tmp_path: Path, body: str) -> Path:
    """A stand-in run.sh (the real one takes minutes) in tmp_path, where BENCH_DIR will point:
    each run gets a directory `$dir` and its number `$n`; `body` records how it was called in
    `$calls` (the file returned), writes `$dir/cpu.txt` and sets `$p99`; then it answers the
    way run.sh does."""
    calls = tmp_path / "calls"
    script = tmp_path / "run.sh"
    script.write_text(f"""#!/bin/sh
calls={calls}
n=$(wc -l < "$calls" 2>/dev/null || echo 0)
dir={tmp_path / "runs"}/$n-$1
mkdir -p "$dir"
""" + body + """
echo "[run.sh] run dir $dir"
echo "RESULT target=$1 rate=$2 secs=$3 failed=0 rt_p99_ms=$p99 rt_max_ms=5.0 verdict=PASS"
""")
    script.chmod(0o755)
    return calls
