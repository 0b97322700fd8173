"""Loading one of scripts/*.py as a module, for the tests of that script."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str) -> Iterator[ModuleType]:
    """scripts/<name>.py (or scripts/<name>, a script without the suffix, such as
    build-compiled) as a module, registered in sys.modules while in use (dataclasses look their
    module up there); a generator, for a pytest fixture."""
    path = SCRIPTS / f"{name}.py"
    if not path.exists():
        path = SCRIPTS / name
    name = name.replace("-", "_")
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
