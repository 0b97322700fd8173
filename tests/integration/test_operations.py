"""Operating a running sip700: hot reload, drain, rolling restart, readiness, signals.

Real processes: the proxy (`python -m proxy run`, a supervisor with its workers), SIPp callers
toward it and SIPp callees as its carrier gateways (on 127.0.0.2 / 127.0.0.3 when a test needs
two gateways apart: loopback addresses other than the trusted 127.0.0.1), and `sip700 reload`
as an admin runs it. Memory store; the Redis store's readiness is checked against a port where
no Redis answers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from proxy.config import load_config
from tests.integration.procs import (
    ROOT,
    ProxyProcess,
    free_port,
    server_counts,
    sipp_args,
    sipp_server,
    start_proxy,
    write_config,
)
from tests.integration.test_call_flows import A1, A2, B1, B2, X1, X2, CallPlan, write_plans

NO_HANG = ["-recv_timeout", "15000", "-trace_msg"]


def sip700(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)


def caller(workdir: Path, proxy_port: int, plans: list[CallPlan], *, hold_ms: int,
           rate: float = 10) -> tuple[subprocess.Popen[bytes], int]:
    """A SIPp caller placing one uac_basic call per plan, in the background."""
    caller_csv, _ = write_plans(workdir, plans)
    port = free_port()
    args = sipp_args("uac_basic.xml", remote=f"127.0.0.1:{proxy_port}", local_port=port,
                     calls=len(plans), rate=rate, csv=caller_csv, workdir=workdir,
                     extra=[*NO_HANG, "-d", str(hold_ms)])
    out = (workdir / f"caller.{port}.out").open("wb")
    return subprocess.Popen(args, cwd=workdir, stdout=out, stderr=subprocess.STDOUT), port


def caller_counts(workdir: Path, port: int) -> tuple[int, int]:
    return server_counts("uac_basic.xml", port, workdir)


def metric(port: int, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3).read().decode()
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def readyz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def log_events(proxy: ProxyProcess, event: str) -> list[dict]:
    return [json.loads(ln) for ln in proxy.log_lines() if f'"event": "{event}"' in ln]


def wait_for(check, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_reload_moves_new_calls_to_the_new_gateway_and_leaves_calls_up_alone(
        tmp_path: Path) -> None:
    """Calls up on gateway 127.0.0.2; `sip700 reload` with gateway 127.0.0.3. The calls up end
    (BYE) on the old gateway, new calls go to the new one; then a broken YAML is refused (by
    `sip700 reload` and by a bare SIGHUP) and the proxy goes on with the new gateway."""
    port, gw_port, mport = free_port(), free_port(), free_port(socket.SOCK_STREAM)
    old_gw, new_gw = "127.0.0.2", "127.0.0.3"
    path, config = write_config(tmp_path, port=port, gateway_port=gw_port, overrides={
        "workers": 2, "carrier": {"gateways": [f"sip:{old_gw}:{gw_port}"]},
        "metrics": {"listen": f"127.0.0.1:{mport}"}})
    proxy = start_proxy(path, port, gw_port, tmp_path / "proxy.log", config)
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    old_dir.mkdir()
    new_dir.mkdir()
    up_plans = [CallPlan(A1, X1, B1, 1), CallPlan(A2, X2, B2, 2), CallPlan(B1, X1, A1, 3),
                CallPlan(B2, X2, A2, 4)]
    new_plans = [CallPlan(A1, X1, B1, 11), CallPlan(B2, X2, A2, 12), CallPlan(A2, X2, B2, 13)]
    _, old_csv = write_plans(old_dir, up_plans)
    _, new_csv = write_plans(new_dir, new_plans)
    try:
        with sipp_server("uas_basic.xml", gw_port, old_dir, calls=len(up_plans), csv=old_csv,
                         local_ip=old_gw, extra=["-infindex", "callee.csv", "0", *NO_HANG]
                         ) as old_uas, \
             sipp_server("uas_basic.xml", gw_port, new_dir, calls=len(new_plans), csv=new_csv,
                         local_ip=new_gw, extra=["-infindex", "callee.csv", "0", *NO_HANG]
                         ) as new_uas:
            up, up_port = caller(old_dir, port, up_plans, hold_ms=6000)
            wait_for(lambda: len(log_events(proxy, "call")) >= len(up_plans), what="calls up")
            time.sleep(0.5)  # answered and ACKed: the calls are up
            edited = yaml.safe_load(path.read_text())
            edited["carrier"]["gateways"] = [f"sip:{new_gw}:{gw_port}"]
            edited["overload"] = {"max_receive_wait_ms": 350, "max_loop_lag_ms": 250}
            path.write_text(yaml.safe_dump(edited))
            done = sip700("reload", "--config", str(path))
            assert done.returncode == 0, done.stdout + done.stderr
            assert "generation 2" in done.stdout, done.stdout
            wait_for(lambda: len(log_events(proxy, "config_applied")) == 2,
                     what="both workers applying the new config")
            assert up.poll() is None, "the calls up ended before the reload was done"
            new, new_port = caller(new_dir, port, new_plans, hold_ms=100)
            assert new.wait(timeout=60) == 0, (new_dir / f"caller.{new_port}.out").read_text()
            assert up.wait(timeout=60) == 0, (old_dir / f"caller.{up_port}.out").read_text()
            assert old_uas.wait(timeout=20) == 0
            assert new_uas.wait(timeout=20) == 0
        # every call up finished on the old gateway (its BYE went there), every new one on the
        # new gateway
        assert caller_counts(old_dir, up_port) == (len(up_plans), 0)
        assert caller_counts(new_dir, new_port) == (len(new_plans), 0)
        assert server_counts("uas_basic.xml", gw_port, old_dir) == (len(up_plans), 0)
        assert server_counts("uas_basic.xml", gw_port, new_dir) == (len(new_plans), 0)
        assert metric(mport, "sip700_config_generation") == 2
        for worker_port in (mport, mport + 1):  # each worker's overload thresholds, reloaded
            assert metric(worker_port, "sip700_overload_max_receive_wait_ms") == 350
            assert metric(worker_port, "sip700_overload_max_loop_lag_ms") == 250
        reloaded = log_events(proxy, "config_reloaded")
        assert reloaded[0]["config"] == str(path) and reloaded[0]["generation"] == 2

        # a broken YAML: refused, by `sip700 reload` (which then does not signal) ...
        good = path.read_text()
        path.write_text(good.replace("carrier:", "carrier: [", 1))
        done = sip700("reload", "--config", str(path))
        assert done.returncode == 1 and "line " in done.stderr, done.stdout + done.stderr
        assert "not signalled" in done.stderr
        # ... and by the supervisor on a bare SIGHUP: logged, the old config stays
        proxy.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: log_events(proxy, "config_reload_refused"), what="refusal logged")
        refused = log_events(proxy, "config_reload_refused")[0]
        assert any("line " in p for p in refused["problems"]), refused
        assert proxy.proc.poll() is None
        assert metric(mport, "sip700_config_generation") == 2
        # still routing, to the new gateway
        path.write_text(good)
        again_dir = tmp_path / "again"
        again_dir.mkdir()
        plans = [CallPlan(A1, X1, B1, 21)]
        _, csv = write_plans(again_dir, plans)
        with sipp_server("uas_basic.xml", gw_port, again_dir, calls=1, csv=csv, local_ip=new_gw,
                         extra=["-infindex", "callee.csv", "0", *NO_HANG]) as uas:
            call, _ = caller(again_dir, port, plans, hold_ms=100)
            assert call.wait(timeout=30) == 0
            assert uas.wait(timeout=20) == 0
    finally:
        rc = proxy.stop()
    proxy.assert_clean_exit(rc)
    assert rc == 0


def test_rolling_restart_new_process_serves_the_byes_of_calls_set_up_by_the_old(
        tmp_path: Path) -> None:
    """Calls established through instance 1; `sip700 run --takeover` starts instance 2 on the
    same address, instance 1 drains and exits 0 (no state file, no relay directory left);
    every BYE then completes through instance 2."""
    port, gw_port = free_port(), free_port()
    path, config = write_config(tmp_path, port=port, gateway_port=gw_port,
                                overrides={"workers": 2, "shutdown": {"drain_s": 10}})
    old = start_proxy(path, port, gw_port, tmp_path / "old.log", config)
    plans = [CallPlan(A1, X1, B1, 1), CallPlan(A2, X2, B2, 2), CallPlan(B1, X1, A1, 3),
             CallPlan(B2, X2, A2, 4), CallPlan(A1, X1, B1, 5), CallPlan(A2, X2, B2, 6)]
    _, callee_csv = write_plans(tmp_path, plans)
    new: ProxyProcess | None = None
    try:
        with sipp_server("uas_basic.xml", gw_port, tmp_path, calls=len(plans), csv=callee_csv,
                         extra=["-infindex", "callee.csv", "0", *NO_HANG]) as uas:
            call, call_port = caller(tmp_path, port, plans, hold_ms=5000, rate=20)
            wait_for(lambda: len(log_events(old, "call")) >= len(plans), what="calls up")
            time.sleep(0.5)
            state_file = next((tmp_path / "run").glob("sip700-*.json"))
            assert json.loads(state_file.read_text())["pid"] == old.proc.pid
            log = (tmp_path / "new.log").open("ab")
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "--takeover", "--config", str(path)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            new = ProxyProcess(path, port, gw_port, proc, tmp_path / "new.log", config)
            # the old instance drains (no transaction is left: the calls are up) and exits 0
            assert old.proc.wait(timeout=30) == 0, "\n".join(old.log_lines()[-20:])
            assert call.poll() is None, "the calls ended before the hand-over"
            assert call.wait(timeout=60) == 0, (tmp_path / f"caller.{call_port}.out").read_text()
            assert uas.wait(timeout=20) == 0
        assert caller_counts(tmp_path, call_port) == (len(plans), 0)
        assert server_counts("uas_basic.xml", gw_port, tmp_path) == (len(plans), 0)
        old_stats = old.stop_and_read_stats()
        assert old_stats.get("calls_routed") == len(plans), old_stats
        assert "forwarded_stateless" not in old_stats, old_stats  # no BYE went through it
        assert json.loads(state_file.read_text())["pid"] == new.proc.pid
        assert not [p for p in Path("/tmp").glob("sip700-*")
                    if p.is_dir() and str(old.proc.pid) in p.name]
        assert log_events(old, "handover_started") and log_events(new, "takeover_done")
        new_stats = new.stop_and_read_stats()
        # the caller's BYEs and the 200s to them: all through the new instance
        assert new_stats.get("forwarded_stateless") == len(plans), new_stats
        assert "calls_routed" not in new_stats, new_stats
    finally:
        for proxy in (old, new):
            if proxy is not None:
                rc = proxy.stop()
                proxy.assert_clean_exit(rc)
                assert rc == 0


def test_a_second_instance_on_the_same_port_is_refused(tmp_path: Path) -> None:
    port, gw_port = free_port(), free_port()
    path, config = write_config(tmp_path, port=port, gateway_port=gw_port,
                                overrides={"workers": 1})
    proxy = start_proxy(path, port, gw_port, tmp_path / "proxy.log", config)
    try:
        done = sip700("run", "--config", str(path), timeout=30)
        assert done.returncode == 1, done.stdout + done.stderr
        assert f"udp:127.0.0.1:{port}" in done.stderr and f"pid {proxy.proc.pid}" in done.stderr
        assert "--takeover" in done.stderr
        assert proxy.proc.poll() is None
    finally:
        rc = proxy.stop()
    assert rc == 0


def test_workers_never_outlive_the_supervisor_and_sighup_keeps_them(tmp_path: Path) -> None:
    port, gw_port = free_port(), free_port()
    path, config = write_config(tmp_path, port=port, gateway_port=gw_port,
                                overrides={"workers": 2})
    proxy = start_proxy(path, port, gw_port, tmp_path / "proxy.log", config)
    wait_for(lambda: len(log_events(proxy, "listening")) == 2, what="two workers")
    workers = proxy.worker_pids()
    assert len(workers) == 2
    proxy.proc.send_signal(signal.SIGHUP)  # once: it killed the supervisor, not the workers
    wait_for(lambda: log_events(proxy, "config_reloaded"), what="the reload")
    assert proxy.proc.poll() is None and all(_alive(pid) for pid in workers)
    proxy.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: len(log_events(proxy, "status")) == 3, what="status lines")
    proxy.proc.kill()  # SIGKILL: no chance to stop its workers itself
    proxy.proc.wait()
    wait_for(lambda: not any(_alive(pid) for pid in workers), timeout=5,
             what="the workers to exit after the supervisor's death")
    wait_for(lambda: not _udp_held(port), timeout=5, what="the SIP port to be free")


def test_drain_answers_new_calls_503_and_lets_the_call_in_progress_finish(
        tmp_path: Path) -> None:
    """SIGTERM while a call rings (the callee answers after 2 s): a new INVITE gets 503 with
    Retry-After and /readyz says draining; the ringing call is answered (200 to the caller,
    its ACK to the callee); exit 0. Its BYE later finds no proxy: serving the calls that are
    up is the job of the instance that replaces this one (the rolling-restart test)."""
    port, gw_port, mport = free_port(), free_port(), free_port(socket.SOCK_STREAM)
    path, config = write_config(tmp_path, port=port, gateway_port=gw_port, overrides={
        "workers": 1, "metrics": {"listen": f"127.0.0.1:{mport}"},
        "shutdown": {"drain_s": 20, "retry_after_s": 7}})
    proxy = start_proxy(path, port, gw_port, tmp_path / "proxy.log", config)
    assert readyz(mport)[0] == 200
    plans = [CallPlan(A1, X1, B1, 1)]
    with sipp_server("uas_ring.xml", gw_port, tmp_path, calls=1,
                     extra=[*NO_HANG, "-d", "2000"]) as uas:
        call, call_port = caller(tmp_path, port, plans, hold_ms=100)
        wait_for(lambda: metric(mport, "sip700_server_transactions") >= 1, what="ringing")
        proxy.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: log_events(proxy, "draining"), what="draining")
        status, detail = readyz(mport)
        assert status == 503 and "draining" in detail["reasons"], detail
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            s.settimeout(3)
            s.sendto(_invite(s.getsockname()[1], X2, A2), ("127.0.0.1", port))
            answer = s.recv(65535)
        assert answer.startswith(b"SIP/2.0 503 Shutting Down"), answer
        assert b"\r\nRetry-After: 7\r\n" in answer, answer
        assert proxy.proc.wait(timeout=30) == 0
        call.wait(timeout=30)
        uas.send_signal(signal.SIGUSR1)
        uas.wait(timeout=20)
    caller_log = next(tmp_path.glob("uac_basic_*_messages.log")).read_text()
    callee_log = next(tmp_path.glob("uas_ring_*_messages.log")).read_text()
    assert "SIP/2.0 200 OK" in caller_log and "CSeq: 1 INVITE" in caller_log, caller_log
    assert "ACK sip:" in callee_log, callee_log
    del call_port
    stats = proxy.stop_and_read_stats()
    assert stats.get("calls_routed") == 1 and stats.get("rejected_draining") == 1, stats


def test_readyz_follows_the_redis_store_and_cache_only_mode(tmp_path: Path) -> None:
    """No Redis where the config points: /readyz 503 naming the store (the old /health said
    ok while every call got 503), /healthz 200; with health.ready_without_store, ready."""
    for cache_only in (False, True):
        port, gw_port, mport = free_port(), free_port(), free_port(socket.SOCK_STREAM)
        dead = free_port(socket.SOCK_STREAM)
        workdir = tmp_path / str(cache_only)
        workdir.mkdir()
        path, config = write_config(workdir, port=port, gateway_port=gw_port, overrides={
            "workers": 1, "metrics": {"listen": f"127.0.0.1:{mport}"},
            "health": {"ready_without_store": cache_only},
            "store": {"backend": "redis", "bindings_file": None, "redis_url": f"redis://127.0.0.1:{dead}/0",
                      "timeout_ms": 100}})
        proxy = start_proxy(path, port, gw_port, workdir / "proxy.log", config)
        try:
            status, detail = readyz(mport)
            assert detail["store_up"] is False
            if cache_only:
                assert status == 200, detail
            else:
                assert status == 503 and any("store" in r for r in detail["reasons"]), detail
            live = urllib.request.urlopen(f"http://127.0.0.1:{mport}/healthz", timeout=3)
            assert live.status == 200
            assert metric(mport, "sip700_store_up") == 0
            done = sip700("health", "--config", str(path))
            assert done.returncode == (0 if cache_only else 1), done.stdout + done.stderr
        finally:
            assert proxy.stop() == 0


def _invite(via_port: int, x: str, caller_number: str) -> bytes:
    branch = os.urandom(4).hex()
    return (
        f"INVITE sip:{x}@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{via_port};branch=z9hG4bK{branch}\r\n"
        f"From: <sip:{caller_number}@127.0.0.1>;tag=t{branch}\r\n"
        f"To: <sip:{x}@127.0.0.1>\r\nCall-ID: {branch}@test\r\nCSeq: 1 INVITE\r\n"
        f"Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (reaped later by init) is not a running worker
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _udp_held(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False




def test_a_worker_that_cannot_start_says_why(tmp_path: Path) -> None:
    """Worker 0's metrics port is taken by another process: `worker_failed` names the address
    and the errno; after five quick deaths the supervisor gives up with exit 1."""
    port, gw_port = free_port(), free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        mport = taken.getsockname()[1]
        path, _ = write_config(tmp_path, port=port, gateway_port=gw_port, overrides={
            "workers": 1, "metrics": {"listen": f"127.0.0.1:{mport}"}})
        done = subprocess.run([sys.executable, "-m", "proxy", "run", "--config", str(path)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120,
                              check=False)
    assert done.returncode == 1, done.stdout[-3000:]
    failed = [json.loads(ln) for ln in done.stdout.splitlines() if '"worker_failed"' in ln]
    assert failed, done.stdout[-3000:]
    assert failed[0]["errno"] == 98 and f"metrics 127.0.0.1:{mport}" in failed[0]["error"]
    assert '"worker_cannot_start"' in done.stdout


def _cpus_of(pid: int) -> set[int]:
    return os.sched_getaffinity(pid)


def test_workers_run_on_the_cpus_worker_cpu_affinity_lists_even_after_a_restart(
        tmp_path: Path) -> None:
    """A listed CPU pins every worker to it (round robin over the list), and the worker the
    supervisor starts in place of a dead one is pinned the same; the supervisor is not."""
    cpu = min(os.sched_getaffinity(0))
    port, gw_port = free_port(), free_port()
    path, config = write_config(tmp_path, port=port, gateway_port=gw_port,
                                overrides={"workers": 2, "worker_cpu_affinity": [cpu]})
    proxy = start_proxy(path, port, gw_port, tmp_path / "proxy.log", config)
    try:
        wait_for(lambda: len(log_events(proxy, "listening")) == 2, what="two workers")
        plan = log_events(proxy, "worker_cpu_affinity")
        assert [(e["cpus"], e["why"]) for e in plan] == [([cpu, cpu], "listed")]
        workers = proxy.worker_pids()
        assert [_cpus_of(pid) for pid in workers] == [{cpu}, {cpu}]
        assert _cpus_of(proxy.proc.pid) == os.sched_getaffinity(0)
        os.kill(workers[0], signal.SIGKILL)
        wait_for(lambda: len(log_events(proxy, "listening")) == 3, what="the restarted worker")
        now = proxy.worker_pids()
        assert workers[0] not in now and len(now) == 2
        assert [_cpus_of(pid) for pid in now] == [{cpu}, {cpu}]
    finally:
        proxy.stop()


def test_auto_affinity_gives_each_worker_its_own_cpu_when_they_are_one_per_cpu(
        tmp_path: Path) -> None:
    allowed = os.sched_getaffinity(0)
    port, gw_port = free_port(), free_port()
    path, config = write_config(tmp_path, port=port, gateway_port=gw_port,
                                overrides={"workers": len(allowed)})
    proxy = start_proxy(path, port, gw_port, tmp_path / "proxy.log", config)
    try:
        wait_for(lambda: len(log_events(proxy, "listening")) == len(allowed),
                 what="a worker per CPU")
        [plan] = log_events(proxy, "worker_cpu_affinity")
        expected, why = load_config(path).worker_cpus()  # a cgroup quota may rule it out
        assert plan["why"] == why
        mine = sorted(_cpus_of(pid) for pid in proxy.worker_pids())
        if expected is None:  # not pinned: each worker may run on every CPU
            assert len(allowed) == 1 or "quota" in why
            assert mine == [allowed] * len(allowed)
        else:
            assert mine == [{c} for c in sorted(allowed)]
    finally:
        proxy.stop()


def test_a_cpu_this_process_may_not_use_refuses_the_start(tmp_path: Path) -> None:
    outside = max(os.sched_getaffinity(0)) + 1
    path, _ = write_config(tmp_path, port=free_port(), gateway_port=free_port(),
                           overrides={"workers": 2, "worker_cpu_affinity": [outside]})
    done = sip700("run", "--config", str(path), timeout=60)
    assert done.returncode == 1
    assert f"worker_cpu_affinity: CPU {outside} is not one this process may use" in done.stderr
