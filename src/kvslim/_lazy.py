"""Lazy re-exports for package ``__init__`` modules: import the defining module on first attribute access."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str], namespace: dict[str, Any],
                 submodules: tuple[str, ...] = ()) -> tuple[Callable, Callable]:  # fmt: skip
    """``(__getattr__, __dir__)`` for ``package`` whose public ``exports`` map name -> defining module; the
    ``submodules`` are imported on first attribute access too (``kvslim.models.load`` after ``import kvslim``)."""

    def __getattr__(name: str) -> Any:
        if name in submodules:
            value = importlib.import_module(f"{package}.{name}")
            namespace[name] = value
            return value
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(namespace.get("__all__", ())) | set(submodules))

    return __getattr__, __dir__
