"""What a new admin meets on the command line (real `python -m proxy` processes): --version,
either config form, check-config looking into the bindings file, errors that say what."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def sip700(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)


def config(tmp_path: Path, bindings: str, **extra: object) -> Path:
    (tmp_path / "bindings.yaml").write_text(bindings)
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump({
        "listen": ["udp:127.0.0.1:5999"], "carrier": {"gateways": ["sip:127.0.0.1:5090"]},
        "store": {"backend": "memory", "bindings_file": "bindings.yaml"}, **extra}))
    return path


GOOD = ('bindings:\n'
        '  - {type: axb, x: "700100000000001", a: "13800000001", b: "13900000001", ttl: 60}\n')


def test_version_and_both_config_forms(tmp_path: Path) -> None:
    done = sip700("--version")
    assert done.returncode == 0 and done.stdout.startswith("sip700 "), done
    assert "(compiled: " in done.stdout, done  # scripts/build-compiled
    path = config(tmp_path, GOOD)
    for args in (("check-config", str(path)), ("check-config", "--config", str(path))):
        done = sip700(*args)
        assert done.returncode == 0 and f"{path}: OK (1 bindings)" in done.stdout, done
    done = sip700("check-config")
    assert done.returncode == 2 and "--config PATH" in done.stderr, done


def test_check_config_and_run_refuse_a_bindings_file_that_loads_nothing(tmp_path: Path) -> None:
    broken = GOOD + '  - {type: axb, x: "700100000000002", a: [13800000002\n'  # a YAML error
    path = config(tmp_path, broken)
    done = sip700("check-config", str(path))
    assert done.returncode == 1, done
    assert "YAML syntax error" in done.stdout and "loads no binding" in done.stdout, done.stdout
    done = sip700("run", "--config", str(path), timeout=30)
    assert done.returncode == 1 and "loads no binding" in done.stderr, done


def test_check_config_warns_of_x_the_pattern_never_matches(tmp_path: Path) -> None:
    path = config(tmp_path, GOOD, middle_number_pattern=r"^700\d{11}$")  # 14 digits
    done = sip700("check-config", str(path))
    assert done.returncode == 0, done
    assert "warning:" in done.stdout and "x 700100000000001 never matches" in done.stdout


def test_admin_errors_say_what_and_an_unbound_get_fails(tmp_path: Path) -> None:
    path = config(tmp_path, GOOD)
    done = sip700("bindings", "get", "--x", "700100000000009", "--config", str(path))
    assert done.returncode == 1 and "no live binding on x 700100000000009" in done.stderr
    done = sip700("bind", "axb", "--x", "700100000000001", "--a", "13800000001", "--b",
                  "13900000055", "--ttl", "60", "--config", str(path))
    assert done.returncode == 1
    assert "13800000001 is already bound on x 700100000000001" in done.stderr, done.stderr
    assert "13900000001" in done.stderr and "sip700 unbind" in done.stderr
    done = sip700("bind", "axb", "--x", "700100000000003", "--a", "138-oops", "--b",
                  "13900000055", "--ttl", "60", "--config", str(path))
    assert done.returncode == 1 and "a '138-oops' is not a phone number" in done.stderr, done


def test_an_unreachable_redis_is_named_with_the_reason(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "redis.yaml"
    path.write_text(yaml.safe_dump({
        "carrier": {"gateways": ["sip:127.0.0.1:5090"]},
        "store": {"backend": "redis", "redis_url": f"redis://:secret@127.0.0.1:{port}/0"}}))
    done = sip700("bindings", "get", "--x", "700100000000001", "--config", str(path))
    assert done.returncode == 1, done
    assert f"redis://***@127.0.0.1:{port}/0" in done.stderr and "secret" not in done.stderr
    assert "111" in done.stderr or "refused" in done.stderr.lower(), done.stderr
