"""Rich progress bars on stderr implementing `odekit.progress.Progress`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


class RichProgress:
    """One live display; each `track` call adds a task, `update` shows live metrics on it."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=console,
            transient=False,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def track(self, iterable: Iterable[T], total: int | None, description: str) -> Iterator[T]:
        task = self._progress.add_task(description, total=total, metrics="")
        previous, self._task = self._task, task
        try:
            for item in iterable:
                yield item
                self._progress.advance(task)
        finally:
            self._task = previous

    def update(self, **metrics: float | int | str) -> None:
        if self._task is None:
            return
        text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        self._progress.update(self._task, metrics=text)
