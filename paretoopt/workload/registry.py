"""Registries of built-in components and the loader for user factories.

A registry is a dict, a decorator and a ``names()`` list. User factories are named in the
space file as ``"module.path:callable"`` or ``"path/to/file.py:callable"``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from paretoopt.errors import SpaceError, one_line

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            return fn

        return decorator

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str, where: str) -> Callable[..., T]:
        if name not in self._items:
            raise SpaceError(
                f"{where}: {name!r} is not a built-in {self.kind}; choose from "
                f"{', '.join(self.names())} or give a 'factory'"
            )
        return self._items[name]


def load_callable(ref: str, where: str) -> Callable[..., Any]:
    """Import ``module:attr`` or ``/path/file.py:attr``; raise SpaceError naming ``where``."""
    target, attr = ref.rsplit(":", 1)
    module = _import_file(target, where) if target.endswith(".py") else _import(target, where)
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise SpaceError(f"{where}: {target!r} has no callable named {attr!r}")
    return fn


def _import(name: str, where: str) -> Any:
    cwd = str(Path.cwd())
    if cwd not in sys.path:  # users name modules relative to where they run paretoopt
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except Exception as exc:  # any import-time failure is the user's module, not ours
        raise SpaceError(
            f"{where}: cannot import {name!r}: {type(exc).__name__}: {one_line(str(exc))[:300]}"
        ) from exc


def _import_file(path: str, where: str) -> Any:
    file = Path(path)
    module_name = f"paretoopt_user_{file.stem}_{abs(hash(str(file.resolve())))}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise SpaceError(f"{where}: cannot load {path!r} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise SpaceError(
            f"{where}: cannot import {path!r}: {type(exc).__name__}: {one_line(str(exc))[:300]}"
        ) from exc
    return module


def call_factory(fn: Callable[..., T], kwargs: dict[str, Any], where: str) -> T:
    try:
        return fn(**kwargs)
    except Exception as exc:
        raise SpaceError(
            f"{where}: calling the factory with kwargs {kwargs} failed: {type(exc).__name__}: {exc}"
        ) from exc
