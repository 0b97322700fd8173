"""Every Python script in scripts/ answers `--help` with its usage and exit status 0.

A help text is read by argparse as a %-format, so a bare `%` in it crashes `--help` (it did in
bench_core.py); a script reading sys.argv by hand must not take `--help` for an argument.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.py"))


def test_there_are_scripts_to_check() -> None:
    assert len(SCRIPTS) >= 5


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_exits_cleanly_with_usage(script: Path) -> None:
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "usage" in done.stdout.lower(), done.stdout[:500]


def test_bench_sip_refuses_a_bad_round_count() -> None:
    script = next(p for p in SCRIPTS if p.name == "bench_sip.py")
    done = subprocess.run([sys.executable, str(script), "many"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "usage: bench_sip.py" in done.stderr and "invalid int value" in done.stderr
    assert "Traceback" not in done.stderr
