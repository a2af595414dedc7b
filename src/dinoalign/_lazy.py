"""Lazy re-exports for package ``__init__``s that must stay import-light (PEP 562)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(
    package: str, lazy: Mapping[str, str], public: Iterable[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: a name of ``lazy`` (name -> submodule)
    is imported from ``package.<submodule>`` on first access, so that importing the
    package loads none of its heavy submodules."""
    names = sorted(set(public))

    def __getattr__(name: str) -> Any:
        if name in lazy:
            return getattr(importlib.import_module(f"{package}.{lazy[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return names

    return __getattr__, __dir__
