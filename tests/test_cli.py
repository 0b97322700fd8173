"""The command line as an admin meets it: `python -m proxy check-config` and `run`, real processes.

A config problem must be reported with its file and key path and exit 1; `run` on a bad config
must exit 1 before it opens any socket (a bad edit never takes a port, nor a running proxy, down).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def sip700(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def valid_config(port: int = 5999) -> dict:
    return {
        "listen": [f"udp:127.0.0.1:{port}", f"tcp:127.0.0.1:{port}"],
        "carrier": {"gateways": ["sip:127.0.0.1:5090"]},
        "store": {"backend": "memory", "bindings_file": str(ROOT / "config" / "bindings.yaml")},
    }


def write(tmp_path: Path, config: dict, text: str = "") -> Path:
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config) + text)
    return path


@pytest.mark.parametrize("name", ["proxy.yaml", "proxy-redis.yaml"])
def test_check_config_accepts_the_example_configs(name: str) -> None:
    path = ROOT / "config" / name
    done = sip700("check-config", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().startswith(f"{path}: OK"), done.stdout


def test_check_config_accepts_a_minimal_config(tmp_path: Path) -> None:
    path = write(tmp_path, valid_config())
    done = sip700("check-config", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


# one edit of a valid config → the key path the problem must be reported at
BAD_EDITS = {
    "unknown key": ({"wrokers": 2}, "wrokers: unknown key (did you mean 'workers'?)"),
    "wrong type": ({"workers": "2"}, "workers: "),
    "bad CIDR": ({"trusted_peers": ["127.0.0.1/32", "10.0.0.300/8"]}, "trusted_peers[1]: "),
    "bad regex": ({"middle_number_pattern": r"^700(\d{12}$"}, "middle_number_pattern: "),
    "missing gateway": ({"carrier": {"strategy": "failover"}}, "carrier.gateways: "),
    "no carrier": ({"carrier": None}, "carrier: "),
}


@pytest.mark.parametrize("problem", list(BAD_EDITS))
def test_check_config_names_the_key_of_each_problem(tmp_path: Path, problem: str) -> None:
    edit, expected = BAD_EDITS[problem]
    config = {**valid_config(), **edit}
    config = {k: v for k, v in config.items() if v is not None}
    path = write(tmp_path, config)
    done = sip700("check-config", str(path))
    assert done.returncode == 1, done.stdout
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{path}: {expected}"), done.stdout


def test_check_config_lists_every_problem_at_once(tmp_path: Path) -> None:
    config = valid_config()
    for edit, _ in BAD_EDITS.values():
        config.update(edit)
    del config["carrier"]
    done = sip700("check-config", str(write(tmp_path, config)))
    assert done.returncode == 1
    for key in ("wrokers: ", "workers: ", "trusted_peers[1]: ", "middle_number_pattern: ",
                "carrier: "):
        assert sum(f": {key}" in ln for ln in done.stdout.splitlines()) == 1, done.stdout


def test_check_config_on_a_missing_file(tmp_path: Path) -> None:
    done = sip700("check-config", str(tmp_path / "nowhere.yaml"))
    assert done.returncode == 1
    assert "nowhere.yaml: cannot read" in done.stdout


def _bound(port: int) -> bool:
    """True when something holds udp or tcp 127.0.0.1:port."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return True
    return False


@pytest.mark.parametrize("problem", ["bad CIDR", "missing gateway"])
def test_run_on_a_bad_config_exits_1_without_opening_its_port(
    tmp_path: Path, problem: str
) -> None:
    port = free_port()
    edit, expected = BAD_EDITS[problem]
    path = write(tmp_path, {**valid_config(port), **edit})
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", str(path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    opened = False
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        opened = opened or _bound(port)  # watch the port for as long as the process lives
    if proc.poll() is None:
        proc.kill()
    out, err = proc.communicate()
    assert proc.returncode == 1, out + err
    assert not opened, f"the proxy bound port {port} with a bad config"
    assert f"{path}: {expected}" in err


def test_check_config_refuses_worker_ports_on_a_listen_port(tmp_path: Path) -> None:
    """workers: 2 with worker_port_base on the listen port: the range clash names its key."""
    path = write(tmp_path, {**valid_config(5999), "workers": 2,
                            "transport": {"worker_port_base": 5998}})
    done = sip700("check-config", str(path))
    assert done.returncode == 1, done.stdout
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"{path}: transport.worker_port_base: the workers' own ports 5998..6001"), done.stdout
    assert "overlap listen port 5999" in lines[0]


def test_build_core_takes_each_legs_port_and_the_large_request_rule(tmp_path: Path) -> None:
    """build_core (no process): the tcp / tls ports for Record-Route and Via, the MTU limit,
    and which next hops take TCP for a large request (a gateway also configured with
    ;transport=tcp on its address; any next hop with large_requests_over_tcp)."""
    from proxy.cli import build_core
    from proxy.config import load_config

    config = {**valid_config(5999), "listen": ["udp:127.0.0.1:5999", "tcp:127.0.0.1:5999",
                                               "udp:127.0.0.1:6001"],
              "carrier": {"gateways": ["sip:127.0.0.1:5090", "sip:127.0.0.1:5090;transport=tcp",
                                       "sip:127.0.0.1:5091"]},
              "transport": {"path_mtu_bytes": 1400}}
    core = build_core(load_config(write(tmp_path, config)), bytes(32))
    s = core.settings
    assert s.transport_ports == {"tcp": 5999} and s.large_request_bytes == 1200
    assert s.takes_tcp("127.0.0.1", 5090) and not s.takes_tcp("127.0.0.1", 5091)
    config["transport"] = {"large_requests_over_tcp": True}
    s = build_core(load_config(write(tmp_path, config)), bytes(32)).settings
    assert s.takes_tcp("10.9.9.9", 5060) and s.large_request_bytes == 1300
