"""The README's run command on a fresh machine: `scripts/demo` in a clean virtual environment
(none of the project's dependencies installed) with sipp missing from PATH at first. It must
install what it needs (pip: the dependencies; apt: sip-tester) and then pass every call.

Real processes: the demo script itself (which starts the proxy and SIPp), pip and apt-get.
Takes about a minute (the pip install into the new environment).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.procs import free_port_range

ROOT = Path(__file__).resolve().parents[1]


def path_without_sipp(tmp_path: Path) -> str:
    """A PATH with every system command but sipp (links to them, in one directory)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for system in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin",
                   "/bin"):
        if not os.path.isdir(system):
            continue
        for entry in os.scandir(system):
            target = bin_dir / entry.name
            if entry.name != "sipp" and not target.exists():
                target.symlink_to(entry.path)
    return str(bin_dir)


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="installs sipp with apt-get")
def test_demo_installs_what_it_needs_in_a_clean_venv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    path = f"{venv / 'bin'}:{path_without_sipp(tmp_path)}"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=path, VIRTUAL_ENV=str(venv))
    probe = subprocess.run(["bash", "-c", "command -v sipp; python3 -c 'import structlog'"],
                           env=env, capture_output=True, text=True, check=False)
    assert probe.returncode != 0 and "sipp" not in probe.stdout  # nothing there at first
    port = free_port_range(6)  # the SIP port and the workers' own ports after it
    env.update(SIP700_DEMO_PORT=str(port), SIP700_DEMO_GATEWAY_PORT=str(port + 5))
    done = subprocess.run(["scripts/demo"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert "pip install" in output and "installing sip-tester (sipp)" in output, output[-3000:]
    assert output.count("result       OK") == 4, output[-3000:]
    assert "FAILED" not in output
    # it stops everything it started (its SIPp callee, the proxy and its workers)
    left = [cmd for cmd in _command_lines() if f"-p {port + 5} " in cmd or str(port) in cmd]
    assert not left, left


def _command_lines() -> list[str]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                raw = Path(f"/proc/{entry.name}/cmdline").read_bytes()
            except OSError:
                continue
            out.append(raw.replace(b"\0", b" ").decode(errors="replace"))
    return [c for c in out if "sipp" in c or "proxy run" in c]
