"""Progress implementing `odekit.progress.Progress`: rich bars on a terminal or in a notebook,
plain lines in logs. The CLI's runner and the Python API (`shown`) choose between them."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO, TypeVar

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

from odekit.progress import Progress as ProgressLike
from odekit.progress import SilentProgress

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


class PlainProgress:
    """Progress for logs (CI, pipes, files): plain stderr lines, never control codes.

    A stage prints a line when it starts and when it ends; in between at most one ``k/n`` line
    every ``interval`` seconds, so a ten-minute run says something about every ten seconds.
    """

    def __init__(
        self, stream: TextIO | None = None, interval: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._stream = stream
        self._interval = interval
        self._clock = clock
        self._metrics: list[str] = []  # one entry per open stage (stages nest)

    def _print(self, text: str) -> None:
        print(f"[odekit] {text}", file=self._stream or sys.stderr, flush=True)

    def track(self, iterable: Iterable[T], total: int | None, description: str) -> Iterator[T]:
        of_total = f"/{total}" if total is not None else ""
        self._print(f"{description}: start" + (f" ({total} steps)" if total is not None else ""))
        start = last = self._clock()
        done = 0
        self._metrics.append("")
        try:
            for item in iterable:
                yield item
                done += 1
                now = self._clock()
                if now - last >= self._interval:
                    last = now
                    metrics = f" {self._metrics[-1]}" if self._metrics[-1] else ""
                    self._print(f"{description}: {done}{of_total} ({now - start:.0f} s){metrics}")
        finally:
            metrics = f" {self._metrics.pop()}".rstrip()
            self._print(f"{description}: end {done}{of_total} in {self._clock() - start:.1f} s{metrics}")

    def update(self, **metrics: float | int | str) -> None:
        if self._metrics:
            self._metrics[-1] = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


PROGRESS_ENV = "ODEKIT_PROGRESS"


def plain_progress(stderr_is_terminal: bool) -> PlainProgress | None:
    """Plain lines when stderr is not a terminal (CI, pipes; a terminal with --json stays quiet).

    ``ODEKIT_PROGRESS=off`` silences them (the test suite does, to compare error output exactly),
    ``ODEKIT_PROGRESS=plain`` forces them even on a terminal.
    """
    mode = os.environ.get(PROGRESS_ENV, "auto").strip().lower()
    if mode == "off" or (mode != "plain" and stderr_is_terminal):
        return None
    return PlainProgress()


def in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython's ZMQ shell)."""
    shell = sys.modules.get("IPython")
    get = getattr(shell, "get_ipython", None)
    return get is not None and type(get()).__name__ == "ZMQInteractiveShell"


@contextlib.contextmanager
def shown(progress: bool | ProgressLike | None) -> Iterator[ProgressLike]:
    """The progress of one API call: ``None`` shows bars in a notebook or on a terminal (plain
    lines with ``ODEKIT_PROGRESS=plain``), ``True`` always, ``False`` never; any `Progress` object
    is used as it is."""
    if progress is not None and not isinstance(progress, bool):
        yield progress
        return
    console = Console(file=sys.stderr)
    mode = os.environ.get(PROGRESS_ENV, "auto").strip().lower()
    if progress is False or mode == "off":
        yield SilentProgress()
    elif progress or in_notebook() or console.is_terminal:
        with RichProgress(console) as bars:
            yield bars
    else:
        yield PlainProgress() if mode == "plain" else SilentProgress()
