"""The optional compiled build: which modules `scripts/build-compiled` compiles with mypyc, and
which of them this process runs compiled.

The build puts each module's extension (`message.cpython-311-x86_64-linux-gnu.so`) next to its
`.py` file, and CPython's import prefers an extension module to the source in the same
directory; without the extensions (`scripts/build-compiled --clean`, or never built) the same
modules run as plain Python. This module itself is never compiled.
"""

from __future__ import annotations

import importlib.util
import os

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
    "proxy.gateways",
    "proxy.core",
)
SHARED_LIBRARY = "proxy._native"  # mypyc's group name: its library is proxy/_native__mypyc.*.so


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
    """"true" (every listed module compiled), "false" (none) or "partial (k of n)"."""
    k = len(compiled_modules())
    if k == len(MODULES):
        return "true"
    return "false" if k == 0 else f"partial ({k} of {len(MODULES)})"


def stale_modules() -> list[str]:
    """Compiled modules whose `.py` source changed after the build: the process runs the old
    code. Rebuild (`scripts/build-compiled`) or remove the build (`--clean`)."""
    out = []
    for module in compiled_modules():
        origin = _origin(module)
        assert origin is not None
        source = os.path.join(os.path.dirname(origin), module.rsplit(".", 1)[1] + ".py")
        try:
            if os.stat(source).st_mtime > os.stat(origin).st_mtime:
                out.append(module)
        except OSError:
            continue  # an installed package may ship the extension without the source
    return out
