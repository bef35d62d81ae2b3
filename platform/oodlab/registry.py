"""Plug-in registries: methods, post-hoc scores and datasets, looked up by name.

A plug-in registers itself where it is defined, with one decorator::

    @METHODS.register
    class MyMethod(Method):
        name = "my_method"

Lower layers (the spec validator, the search-space checks) look plug-ins up by *name* here,
so they never import the layers that define them. On the first lookup a registry imports
every module of its package (``pkgutil``), so a new file in ``oodlab/methods/`` is found
with no edit anywhere else; a class registered from elsewhere (a test, a user package) is
found as soon as its module is imported.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> plug-in, filled by :meth:`register` and by scanning ``package`` once."""

    def __init__(self, kind: str, package: str) -> None:
        self.kind = kind
        self.package = package
        self._items: dict[str, T] = {}
        self._scanned = False
        self._lock = threading.RLock()
        self.version = 0  # bumped on every registration (lets caches rebuild)

    def register(self, item: T | None = None, *, name: str | None = None) -> Any:
        """Register ``item`` under ``name`` (default: its ``name`` attribute); a decorator."""

        def add(obj: T) -> T:
            key = name or getattr(obj, "name", None)
            if not isinstance(key, str) or not key:
                raise TypeError(f"a registered {self.kind} needs a non-empty str `name`")
            with self._lock:
                old = self._items.get(key)
                if old is not None and old is not obj and _qualname(old) != _qualname(obj):
                    raise ValueError(f"{self.kind} {key!r} is registered twice: by "
                                     f"{_qualname(old)} and {_qualname(obj)}")
                self._items[key] = obj
                self.version += 1
            return obj

        return add if item is None else add(item)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a toy plug-in clean up with this)."""
        with self._lock:
            if self._items.pop(name, None) is not None:
                self.version += 1

    def scan(self) -> None:
        """Import every module of ``package`` once, so that their decorators run."""
        with self._lock:
            if self._scanned:
                return
            self._scanned = True
            pkg = importlib.import_module(self.package)
            for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{self.package}."):
                importlib.import_module(info.name)

    def get(self, name: str) -> T:
        """The plug-in called ``name``; a ``KeyError`` naming every known one otherwise."""
        self.scan()
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {self.names()}") from None

    def names(self) -> list[str]:
        self.scan()
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        """(name, plug-in) pairs in registration order."""
        self.scan()
        return list(self._items.items())

    def __contains__(self, name: object) -> bool:
        self.scan()
        return name in self._items

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self.scan()
        return len(self._items)


def _qualname(obj: Callable | object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


METHODS: Registry[Any] = Registry("method", "oodlab.methods")
SCORES: Registry[Any] = Registry("score", "oodlab.detect")
DATASETS: Registry[Any] = Registry("dataset", "oodlab.data")
