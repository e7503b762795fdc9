"""Lazy package exports (PEP 562): a package's public name is imported from its submodule on first
access and then kept in the package namespace, so importing the package itself stays cheap."""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, namespace: dict, names: dict[str, str],
                 submodules: tuple[str, ...] = ()) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The ``(__getattr__, __dir__)`` pair of ``package``: ``names`` maps a public name to the submodule that
    defines it, ``submodules`` are public names that are submodules; ``namespace`` is the package's
    ``globals()`` (it caches what was imported and holds ``__all__``, which ``__dir__`` lists)."""
    def __getattr__(name: str):
        if name in names:
            value = getattr(importlib.import_module(f".{names[name]}", package), name)
        elif name in submodules:
            value = importlib.import_module(f".{name}", package)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return list(namespace["__all__"])

    return __getattr__, __dir__
