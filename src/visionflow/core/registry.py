"""One generic registry, one instance per kind of thing (models, datamodules, ...).

Entries register themselves with a decorator when their module is imported; the `compose`
modules import the packages that register them (importing `visionflow.compose.validation` fills
every registry). This module imports nothing of visionflow.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name that is not in a registry. Its message lists what is."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to builders of one kind.

    >>> models = Registry("model")
    >>> @models.register("tiny")
    ... def tiny(num_classes: int): ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def add(obj: T) -> T:
            key = name or obj.__name__  # type: ignore[attr-defined]
            if key in self._entries and self._entries[key] is not obj:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; available: {', '.join(self.list()) or 'none'}"
            ) from None

    def list(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style wildcard, sorted."""
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)


MODELS: Registry[Callable] = Registry("model")
DATAMODULES: Registry[Callable] = Registry("datamodule")
TRANSFORMS: Registry[Callable] = Registry("transform")
CALLBACKS: Registry[Callable] = Registry("callback")
