"""The optional compiled build (scripts/build-compiled, the module list in proxy/compiled.py).

scripts/test runs the suite against the pure-Python modules (SIP700_EXPECT_COMPILED=0), then
builds and runs it again against the compiled ones (=1): each run checks it tested what it says.
"""

from __future__ import annotations

import ast
import importlib.machinery
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy import __version__, compiled
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


def source(module: str) -> Path:
    return (ROOT / Path(*module.split("."))).with_suffix(".py")


def test_every_listed_module_is_a_source_file_of_the_package() -> None:
    for module in compiled.MODULES:
        assert source(module).is_file(), module
    assert "proxy.compiled" not in compiled.MODULES  # it tells the others' state


def test_the_compiler_is_pinned() -> None:
    """mypyc's output (and what it accepts) changes with mypy's version: CI builds with one."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["compiled"]
    (mypy,) = [r for r in extra if r.startswith("mypy")]
    assert mypy.startswith("mypy==") and "," not in mypy, extra


def test_this_run_tests_what_it_says() -> None:
    state = compiled.status()
    assert not state.startswith("partial"), (
        f"compiled: {state}: run scripts/build-compiled, or remove the build with --clean")
    assert compiled.stale_modules() == [], "edited after the build: scripts/build-compiled"
    expected = os.environ.get("SIP700_EXPECT_COMPILED")
    if expected is not None:
        assert state == ("true" if expected == "1" else "false"), state


def test_the_proxy_run_from_the_checkout_says_whether_it_is_compiled() -> None:
    done = subprocess.run([sys.executable, "-m", "proxy", "--version"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == f"sip700 {__version__} (compiled: {compiled.status()})"


def _reused_exception_names(tree: ast.AST) -> list[str]:
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        types: dict[str, set[str]] = {}
        for node in ast.walk(fn):
            if isinstance(node, ast.ExceptHandler) and node.name and node.type is not None:
                types.setdefault(node.name, set()).add(ast.unparse(node.type))
        found += [f"{fn.name} (line {fn.lineno}): {name} as {sorted(t)}"
                  for name, t in types.items() if len(t) > 1]
    return found


def test_no_compiled_function_binds_one_name_to_two_exception_types() -> None:
    """Compiled, a local variable has one type. After `except ParseError as exc:`, a later
    `except Exception as exc:` in the same function types `exc` as ParseError, and any other
    exception reaching that clause raises TypeError instead of being handled (this hid the
    core's catch-all for bugs: receive_message)."""
    found = []
    for module in compiled.MODULES:
        for problem in _reused_exception_names(ast.parse(source(module).read_text())):
            found.append(f"{module}.{problem}")
    assert found == []


def test_a_stale_build_is_not_used(tmp_path: Path) -> None:
    """A copy of the package whose proxy/sip/uri has an extension file older than its source
    (edited after the build): every listed module loads from source, and the process says so.
    The extension here is not even a shared library: had it been loaded, the import would fail."""
    import shutil

    shutil.copytree(ROOT / "proxy", tmp_path / "proxy",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    fake = tmp_path / "proxy" / "sip" / f"uri{suffix}"
    fake.write_bytes(b"not a shared library")
    old = (tmp_path / "proxy" / "sip" / "uri.py").stat().st_mtime - 60
    os.utime(fake, (old, old))
    script = ("import proxy.core, proxy.sip.uri as u; from proxy import compiled; "
              "print(u.__file__); print(compiled.status()); print(compiled.stale_modules())")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    path, state, stale = done.stdout.splitlines()
    assert path == str(tmp_path / "proxy" / "sip" / "uri.py")
    assert state == "false (stale build ignored)"
    assert stale == "['proxy.sip.uri']"


# ---- the profile-guided build (scripts/build-compiled) -------------------------------------

@pytest.fixture
def build() -> Iterator[Any]:
    """scripts/build-compiled as a module."""
    yield from load_script("build-compiled")


def test_the_training_asks_bench_core_for_options_it_has(build: Any) -> None:
    """A bench_core option renamed must fail here, not turn every build quietly plain (the
    build falls back to it when the training fails)."""
    loaded = load_script("bench_core")
    bench = next(loaded)
    shapes = set()
    try:
        for args in build.TRAINING:
            parsed = bench.parse_args(list(args))
            shapes.add((parsed.shape, parsed.records, parsed.max_call_s is not None))
    finally:
        loaded.close()
    # the harness's rows, real UAs' rows, and records with a duration limit
    assert shapes == {("harness", False, False), ("production", False, False),
                      ("production", True, True)}


def test_the_profile_flags_are_only_for_gcc(build: Any, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    clang = tmp_path / "clang"
    clang.write_text("#!/bin/sh\necho 'Debian clang version 14.0.6'\n")
    clang.chmod(0o755)
    monkeypatch.setenv("CC", f"{clang} -pthread")
    assert build.compiler_is_gcc() is False
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert build.compiler_is_gcc() is False
    gcc = shutil.which("gcc")
    assert gcc is not None, "scripts/install --compiled installs gcc"
    monkeypatch.setenv("CC", gcc)
    assert build.compiler_is_gcc() is True


def test_a_failed_training_is_reported_not_raised(build: Any, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """What `train()` returns makes the build fall back to the plain one, saying why."""
    monkeypatch.setattr(build, "PROFILE", tmp_path / "pgo")
    monkeypatch.setattr(build, "TRAINING", (("10", "--no-such-option"),))
    failed = build.train()
    assert failed is not None and "exit 2" in failed and "--no-such-option" in failed
    # a run that works but counts nothing (no instrumented build here): no profile to use
    monkeypatch.setattr(build, "TRAINING", (
        ("20", "--rounds", "1", "--warmup", "0", "--bindings", "100", "--shape", "harness"),))
    assert build.train() == "the training wrote no profile"
