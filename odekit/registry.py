"""A small named registry, one instance per family (architectures, solvers, attacks...)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from odekit.errors import UsageError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    value: T
    description: str


class Registry(Generic[T]):
    """Maps names to objects; unknown names give a `UsageError` that lists the valid ones."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._entries: dict[str, Entry[T]] = {}

    def add(self, name: str, value: T, description: str = "") -> T:
        key = name.lower()
        if key in self._entries:
            raise ValueError(f"{self.family} '{name}' is registered twice")
        self._entries[key] = Entry(key, value, description)
        return value

    def register(self, name: str, description: str = "") -> Callable[[T], T]:
        """Decorator form of `add`."""

        def decorator(value: T) -> T:
            return self.add(name, value, description)

        return decorator

    def get(self, name: str) -> T:
        return self.entry(name).value

    def entry(self, name: str) -> Entry[T]:
        key = name.strip().lower()
        if key not in self._entries:
            raise UsageError(
                f"unknown {self.family} '{name}'", f"choose one of: {', '.join(self.names())}"
            )
        return self._entries[key]

    def names(self) -> list[str]:
        return list(self._entries)

    def help_text(self) -> str:
        """One line per entry, for `--help` texts and docs."""
        return "; ".join(f"{e.name}: {e.description}" if e.description else e.name for e in self)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.strip().lower() in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)
