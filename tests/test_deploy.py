"""The deploy/ folder stays true to the code: dashboards and alerts name metrics that exist,
the lock file pins every dependency the package declares, the container config is valid."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from prometheus_client import CollectorRegistry, generate_latest

from proxy.bindings.memory import MemoryStore
from proxy.config import load_config
from proxy.metrics import WorkerCollector, WorkerMetrics, store_gauges

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def exposed_names() -> set[str]:
    """Every sample name a worker exposes (memory store; the Redis store's gauges and the
    records writer's added)."""

    class FakeRedisStore:
        class breaker:  # stands in for the store's attribute of that name
            state = "closed"

        cache = ()

    registry = CollectorRegistry()
    registry.register(WorkerCollector(
        lambda: {}, lambda: {"server_transactions": 0, "client_transactions": 0,
                             "tcp_connections": 0, "config_generation": 1, "draining": 0,
                             "ready": 1, **store_gauges(MemoryStore()),
                             **store_gauges(FakeRedisStore()), **records_gauges()},
        WorkerMetrics(), lambda: [("sip:127.0.0.1:5090;transport=udp", True)]))
    text = generate_latest(registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def records_gauges() -> dict[str, float]:
    """A real records writer's gauges (its client is never used here)."""
    import tempfile

    import redis

    from proxy.records.tracker import CallTracker
    from proxy.records.writer import RecordWriter, Spool

    with tempfile.TemporaryDirectory() as tmp:
        writer = RecordWriter(CallTracker(instance="test"), redis.Redis(), stream="s",
                              events_stream="e", prefix="p:",
                              spool=Spool(Path(tmp) / "spool.jsonl", 1 << 20))
        return writer.gauges()


def used_names(text: str) -> set[str]:
    return set(re.findall(r"\bsip700_[a-z0-9_]+", text))


def test_dashboard_and_alerts_use_metrics_that_exist() -> None:
    exposed = exposed_names()
    dashboard = (DEPLOY / "grafana" / "sip700.json").read_text()
    json.loads(dashboard)
    alerts = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    yaml.safe_load(alerts)
    missing = {name for name in used_names(dashboard) | used_names(alerts)
               if name not in exposed} - {"sip700"}
    assert not missing, f"not exposed by a worker: {sorted(missing)}"


def test_every_counter_exists_from_the_start() -> None:
    exposed = exposed_names()
    for name in ("sip700_calls_routed_total", "sip700_calls_store_unavailable_total",
                 "sip700_internal_errors_total", "sip700_call_decision_seconds_bucket",
                 "sip700_event_loop_lag_seconds_count", "sip700_gateway_up",
                 "sip700_store_up", "sip700_config_generation"):
        assert name in exposed


def test_the_lock_file_pins_every_dependency_the_package_declares() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins[req.name.lower().replace("_", "-")] = req
    for text in project["dependencies"]:
        declared = Requirement(text)
        pin = pins.get(declared.name.lower().replace("_", "-"))
        assert pin is not None, f"{declared.name} is not in deploy/constraints.txt"
        (version,) = [s.version for s in pin.specifier if s.operator == "=="]
        assert declared.specifier.contains(version), (declared, version)
        for extra in declared.extras:  # redis[hiredis]
            assert extra in pins, f"{extra} (extra of {declared.name}) is not pinned"


def test_the_container_config_is_valid_and_listens_everywhere(monkeypatch) -> None:
    monkeypatch.setenv("SIP700_TRUSTED_PEERS", "10.0.0.0/8, 192.168.1.0/24")
    monkeypatch.setenv("SIP700_ADVERTISE", "192.0.2.10")
    monkeypatch.setenv("SIP700_WORKERS", "2")
    cfg = load_config(DEPLOY / "container.yaml")
    assert {e.host for e in cfg.listen_endpoints} == {"0.0.0.0"}
    assert cfg.trusted_peers == ("10.0.0.0/8", "192.168.1.0/24")
    assert str(cfg.advertised) == "192.0.2.10:5060" and cfg.workers == 2


def test_the_compose_file_mounts_configs_that_exist() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"


def test_a_long_collector_pass_is_timed_and_logged() -> None:
    """Every pass of the cyclic collector lands in sip700_gc_pause_seconds; a long one (made
    long by a threshold of 0 here) is logged as `gc_pause` with its generation."""
    import gc

    metrics = WorkerMetrics()
    lines: list[tuple[str, dict[str, object]]] = []
    metrics.watch_gc(lambda event, **fields: lines.append((event, fields)), long_s=0.0)
    try:
        gc.collect()
    finally:
        metrics.unwatch_gc()
    assert sum(metrics.gc_pause.counts) >= 1
    assert metrics.gc_pause.sum > 0
    assert metrics._on_gc not in gc.callbacks
    long = [fields for event, fields in lines if event == "gc_pause"]
    assert long and long[-1]["generation"] == 2 and "collected" in long[-1]
    registry = CollectorRegistry()
    registry.register(WorkerCollector(lambda: {}, lambda: {}, metrics, lambda: []))
    assert "sip700_gc_pause_seconds_count" in generate_latest(registry).decode()


def test_workers_collect_the_young_generations_on_a_clock() -> None:
    """YoungCollector (run by the transport's tick) passes over generation 0 once `every_s`
    has gone by and generation 1 every nth time: the young objects are walked while they are
    few, whatever the allocation count says. Between those times a tick collects nothing."""
    import gc

    from proxy.worker import YoungCollector

    passes: list[int] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "stop":
            passes.append(info["generation"])

    old = gc.get_threshold()
    gc.set_threshold(1_000_000, 1000, 1000)  # no automatic pass during the test
    gc.callbacks.append(seen)
    try:
        collect = YoungCollector(every_s=0.05, middle_every=3)
        for tick in range(61):  # 10 ms ticks for 0.6 s of its clock
            collect(100.0 + tick * 0.01)
    finally:
        gc.callbacks.remove(seen)
        gc.set_threshold(*old)
    assert passes == [0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1][:len(passes)]
    assert len(passes) in (11, 12), passes  # every 50 ms after the first tick: 11 or 12 in 0.6 s
    assert 2 not in passes


def test_the_image_builds_with_the_compiler_the_suite_tests() -> None:
    """The Dockerfile's compiled build installs deploy/build-constraints.txt: the same mypy (so
    the same mypyc) as pyproject.toml's `compiled` extra, with which scripts/test builds."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["compiled"]
    (mypy,) = [Requirement(r) for r in extra if r.startswith("mypy")]
    pins = {}
    for line in (DEPLOY / "build-constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins[req.name.lower()] = req
    assert str(pins["mypy"].specifier) == str(mypy.specifier)
    assert all(str(r.specifier).startswith("==") for r in pins.values()), pins
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "-r /tmp/build-constraints.txt" in dockerfile and "ARG COMPILED=1" in dockerfile
