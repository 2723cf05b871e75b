"""Lazily imported package attributes: names served from their submodules on first access (PEP 562)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_attributes(package: str, lazy: dict[str, str], namespace: dict[str, Any]) -> tuple[Callable, Callable]:
    """`__getattr__` and `__dir__` for `package`, whose attributes `lazy` (``{name: submodule}``) are imported from
    ``package.submodule`` on first access and then kept in the package's `namespace` (its `globals()`)."""

    def __getattr__(name: str) -> Any:
        if name in lazy:
            value = getattr(importlib.import_module(f".{lazy[name]}", package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted([*namespace, *lazy])

    return __getattr__, __dir__
