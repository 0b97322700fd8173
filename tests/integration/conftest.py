"""Fixtures that start real processes: the proxy and SIPp (see procs.py)."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.procs import (
    ProxyProcess,
    delete_redis_prefix,
    free_port,
    port_taken,
    start_proxy,
    write_config,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def _sipp_installed() -> None:
    if shutil.which("sipp") is None:
        pytest.fail("sipp is not installed: run scripts/test, which installs sip-tester")


@pytest.fixture
def proxies() -> Iterator[list[ProxyProcess]]:
    """Proxies a test started itself (appended to this list); stopped and checked for crashes
    afterwards."""
    started: list[ProxyProcess] = []
    yield started
    for proxy in started:
        proxy.assert_clean_exit(proxy.stop())


class PortTaken(RuntimeError):
    """The proxy refused to start: a port of its config was held when it started."""


@pytest.fixture(params=["memory", "redis"])
def start_sip700(request: pytest.FixtureRequest, tmp_path: Path
                 ) -> Iterator[Callable[..., ProxyProcess]]:
    """Factory: start a proxy with a test config; stopped after the test.

    Every test that uses it runs twice: on the memory store and on the Redis store (under a
    key prefix of its own, deleted afterwards) — the same SIPp suite must pass on both.
    """
    started: list[ProxyProcess] = []
    prefix = f"sip700test:{uuid.uuid4().hex[:12]}:" if request.param == "redis" else None
    # a proxy restarted on a port keeps its workers' own ports: its dialogs' Record-Routes
    # name them
    worker_port_bases: dict[int, int] = {}

    def start(*, bindings: list[dict] | None = None, overrides: dict | None = None,
              port: int | None = None, gateway_port: int | None = None,
              transports: tuple[str, ...] = ("udp", "tcp")) -> ProxyProcess:
        chosen = port is not None
        for attempt in range(3):
            try:
                return start_once(bindings, overrides, port or free_port(),
                                  gateway_port or free_port(), transports)
            except PortTaken:
                # a port drawn free was taken before the proxy bound it (another suite or
                # program on the machine drew it too): draw again, unless the test chose it
                if chosen or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def start_once(bindings: list[dict] | None, overrides: dict | None, port: int,
                   gateway_port: int, transports: tuple[str, ...]) -> ProxyProcess:
        cfg_dir = tmp_path / f"proxy-{port}"
        cfg_dir.mkdir(exist_ok=True)
        overrides = dict(overrides or {})
        restarted = port in worker_port_bases
        if restarted:
            transport = overrides.get("transport") or {}
            overrides["transport"] = {"worker_port_base": worker_port_bases[port], **transport}
        path, config = write_config(cfg_dir, port=port, gateway_port=gateway_port,
                                    bindings=bindings, overrides=overrides,
                                    transports=transports, redis_prefix=prefix)
        worker_port_bases[port] = config["transport"]["worker_port_base"]
        try:
            proc = start_proxy(path, port, gateway_port, cfg_dir / "proxy.log", config)
        except RuntimeError as exc:
            if port_taken(exc):
                if not restarted:
                    del worker_port_bases[port]
                raise PortTaken(str(exc)) from exc
            raise
        started.append(proc)
        return proc

    yield start
    codes = [proc.stop() for proc in started]
    if prefix is not None:
        delete_redis_prefix(prefix)
    for proc, rc in zip(started, codes, strict=True):
        proc.assert_clean_exit(rc)
