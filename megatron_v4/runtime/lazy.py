"""Package names that load on first use (PEP 562), so that importing a package, or a light module inside
it, does not import PyTorch and Megatron-Core up front (the command-line tools answer `--help` and
argument mistakes at once)."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """(`__getattr__`, `__dir__`) for `package`, whose public names live in the modules `exports` maps
    them to."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
