"""Progress reporting that library code can use without printing.

Library functions accept ``progress: Progress | None``; the CLI passes a rich-backed
implementation, tests and library users get the silent default.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar

T = TypeVar("T")


class Progress(Protocol):
    """Tracks iterations of long loops and shows live metrics."""

    def track(self, iterable: Iterable[T], total: int | None, description: str) -> Iterator[T]: ...

    def update(self, **metrics: float | int | str) -> None: ...


class SilentProgress:
    """The default: iterate and show nothing."""

    def track(self, iterable: Iterable[T], total: int | None, description: str) -> Iterator[T]:
        yield from iterable

    def update(self, **metrics: float | int | str) -> None:
        return None


def silent_if_none(progress: Progress | None) -> Progress:
    return progress if progress is not None else SilentProgress()
