"""`scripts/install --venv`: the package in a virtual environment made from the interpreter
the script picks (SIP700_PYTHON, else the distribution's /usr/bin/python3 when it can make
one, else python3), run from there. Real installs, with pip, into temporary directories."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "scripts" / "install"


def venv_capable(python: str) -> bool:
    """The script's own rule for a usable base interpreter, asked of the interpreter itself."""
    try:
        return subprocess.run(
            [python, "-c", "import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))"],
            capture_output=True, timeout=30).returncode == 0
    except OSError:
        return False


def base_prefix(python: str) -> str:
    return subprocess.run([python, "-c", "import sys; print(sys.base_prefix)"], check=True,
                          capture_output=True, text=True, timeout=30).stdout.strip()


def run_install(env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SIP700_PYTHON", "VIRTUAL_ENV")}
    env.update(env_extra)
    return subprocess.run([str(INSTALL), "--venv"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_venv_is_made_from_the_picked_interpreter_and_runs_this_checkout(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    done = run_install({"SIP700_VENV": str(venv)})
    assert done.returncode == 0, done.stderr[-2000:]
    expected = "/usr/bin/python3" if venv_capable("/usr/bin/python3") else "python3"
    python = venv / "bin" / "python3"
    assert base_prefix(str(python)) == base_prefix(expected)
    assert f"creating {venv} from {expected}" in done.stdout
    assert "'. " in done.stdout and "/bin/activate' puts its python3 and sip700 first" \
        in done.stdout
    # editable: the environment's proxy is this checkout's, with every dependency importable
    probe = subprocess.run(
        [str(python), "-c", "import proxy, uvloop, yaml, redis, hiredis, cryptography, "
                            "structlog, pydantic; print(proxy.__file__)"],
        capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()) == ROOT / "proxy" / "__init__.py"
    version = subprocess.run([str(venv / "bin" / "sip700"), "--version"], capture_output=True,
                             text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("sip700 "), version.stderr
    # once made, the environment is kept: a second run reuses it, whatever SIP700_PYTHON says
    again = run_install({"SIP700_VENV": str(venv), "SIP700_PYTHON": "/nonexistent/python3"})
    assert again.returncode == 0, again.stderr[-2000:]
    assert "creating" not in again.stdout


def test_a_bad_sip700_python_is_named_and_nothing_is_made(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    done = run_install({"SIP700_VENV": str(venv), "SIP700_PYTHON": str(tmp_path / "nope")})
    assert done.returncode != 0
    assert f"SIP700_PYTHON={tmp_path / 'nope'} is not a Python 3.11+" in done.stderr
    assert not venv.exists()


def test_sip700_python_without_its_venv_module_is_refused(tmp_path: Path) -> None:
    # a real interpreter that fails the rule: Python whose `venv` import is shadowed
    fake = tmp_path / "python3"
    fake.write_text(f"#!/bin/sh\nPYTHONPATH={tmp_path}/shadow exec {sys.executable} \"$@\"\n")
    fake.chmod(0o755)
    (tmp_path / "shadow").mkdir()
    (tmp_path / "shadow" / "venv.py").write_text("raise ImportError('no venv here')\n")
    done = run_install({"SIP700_VENV": str(tmp_path / "venv"), "SIP700_PYTHON": str(fake)})
    assert done.returncode != 0
    assert "is not a Python 3.11+ with its venv module" in done.stderr
    assert not (tmp_path / "venv").exists()
