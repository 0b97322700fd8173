"""The optional compiled build: which modules `scripts/build-compiled` compiles with mypyc, and
which of them this process runs compiled.

The build puts each module's extension (`message.cpython-311-x86_64-linux-gnu.so`) next to its
`.py` file, and CPython's import prefers an extension module to the source in the same
directory; without the extensions (`scripts/build-compiled --clean`, or never built) the same
modules run as plain Python. This module itself is never compiled.

A build older than one of its sources (a module edited, a `git checkout`) would run the old
code. `guard()`, called when the package is imported, then makes every listed module load from
its source instead, all of them: compiled modules call each other's native code directly, so one
module cannot be swapped back alone. The process says so (`status()`, the `compiled_stale` log
line) until the build is redone or removed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from typing import Any

# The sans-IO per-message code: parse, privacy rewrite, bodies, transactions, the core. The
# build compiles exactly these (one shared library, `proxy._native__mypyc`); the asyncio shell,
# the config, the stores and the API stay interpreted (they are not what a call's CPU goes to).
MODULES = (
    "proxy.sip.errors",
    "proxy.sip.uri",
    "proxy.sip.address",
    "proxy.sip.message",
    "proxy.sip.transaction",
    "proxy.numbers",
    "proxy.scanner",
    "proxy.isup",
    "proxy.bodies",
    "proxy.privacy",
    "proxy.timers",
    "proxy.legs",
    "proxy.calltime",
    "proxy.flood",
    "proxy.policy.blocklist",
    "proxy.policy.windows",
    "proxy.policy.engine",
    "proxy.gateways",
    "proxy.linewriter",
    "proxy.calllog",
    "proxy.core",
    "proxy.transport",
)
SHARED_LIBRARY = "proxy._native"  # mypyc's group name: its library is proxy/_native__mypyc.*.so
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_LISTED = frozenset(MODULES)
# the listed modules whose source is newer than their extension when the package was imported:
# the build is then not used at all (guard)
IGNORED: list[str] = []


def _files(module: str) -> tuple[str, list[str]]:
    """A listed module's source file and the extension files built for it, from the disk alone
    (nothing imported)."""
    base = os.path.join(_PACKAGE_DIR, *module.split(".")[1:])
    built = [base + suffix for suffix in importlib.machinery.EXTENSION_SUFFIXES
             if os.path.exists(base + suffix)]
    return base + ".py", built


def stale_on_disk() -> list[str]:
    """The listed modules whose source changed after their extension was built."""
    out = []
    for module in MODULES:
        source, built = _files(module)
        try:
            if built and os.stat(source).st_mtime > min(os.stat(b).st_mtime for b in built):
                out.append(module)
        except OSError:
            continue  # an installed package may ship the extension without the source
    return out


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Loads every listed module from its `.py` file, ahead of the extension next to it."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in _LISTED:
            return None
        source, _ = _files(name)
        return importlib.util.spec_from_file_location(name, source) \
            if os.path.exists(source) else None


def guard() -> None:
    """Run the sources when the build is stale (see the module's docstring); before any listed
    module is imported."""
    stale = stale_on_disk()
    if stale and not any(isinstance(f, _SourceFinder) for f in sys.meta_path):
        IGNORED[:] = stale
        sys.meta_path.insert(0, _SourceFinder())


def _origin(module: str) -> str | None:
    spec = importlib.util.find_spec(module)
    return spec.origin if spec is not None else None


def compiled_modules() -> list[str]:
    """The listed modules that load from an extension module (`.so`, `.pyd`) here."""
    out = []
    for module in MODULES:
        origin = _origin(module)
        if origin is not None and not origin.endswith(".py"):
            out.append(module)
    return out


def status() -> str:
    """"true" (every listed module compiled), "false" (none), "partial (k of n)", or "false
    (stale build ignored)"."""
    k = len(compiled_modules())
    if k == len(MODULES):
        return "true"
    if k == 0:
        return "false (stale build ignored)" if IGNORED else "false"
    return f"partial ({k} of {len(MODULES)})"


def stale_modules() -> list[str]:
    """Listed modules whose `.py` source changed after the build, so that this process runs
    every listed module from source. Rebuild (`scripts/build-compiled`) or remove the build
    (`--clean`)."""
    return list(IGNORED)
