"""Measurement helpers shared by the benchmark scripts (run them as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


class PeakRSS:
    """Peak resident set size increase over the value at entry, sampled every 2 ms (Linux)."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __enter__(self) -> PeakRSS:
        self.start = self._rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mb(self) -> float:
        return (self.peak - self.start) / 2**20


def results_path(name: str) -> Path:
    """benchmarks/results/NAME.jsonl, or NAME.jsonl in $ODEKIT_BENCH_RESULTS when it is set
    (smoke tests and scratch runs keep the recorded results clean)."""
    folder = os.environ.get("ODEKIT_BENCH_RESULTS")
    base = Path(folder) if folder else Path(__file__).resolve().parent / "results"
    return base / f"{name}.jsonl"


def emit_line(path: Path, line: str) -> None:
    """Print one JSON line and append it to ``path`` (the benchmark's results file)."""
    print(line, flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(line + "\n")
