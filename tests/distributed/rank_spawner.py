"""Spawn N ranks of a worker script on loopback with torchrun's environment variables.

A module with its own name, not conftest: `from conftest import ...` picks whichever test
folder's conftest was imported first when several folders run together."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RankRun:
    returncodes: list[int]
    stderr: list[str]
    seconds: float
    ended_at: list[float]  # seconds from the start until each rank exited


def spawn_ranks(
    args: list[str],
    world: int,
    timeout: float = 120.0,
    extra_env: dict[str, str] | None = None,
    cwds: list[Path] | None = None,
) -> RankRun:
    """Start ``world`` processes ``python *args`` as ranks 0..world-1 (in ``cwds[rank]``, default
    the repository); wait for all of them."""
    port = free_port()
    procs: list[subprocess.Popen[str]] = []
    logs: list[IO[str]] = []
    start = time.monotonic()
    for rank in range(world):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(ROOT),
        )
        env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        env.update(extra_env or {})
        logs.append(tempfile.TemporaryFile("w+"))  # noqa: SIM115  (closed after the rank exits)
        procs.append(
            subprocess.Popen(
                [sys.executable, *args], env=env, cwd=cwds[rank] if cwds else ROOT,
                stdout=subprocess.DEVNULL, stderr=logs[-1], text=True,
            )
        )
    ended: dict[int, float] = {}
    while len(ended) < world and time.monotonic() - start < timeout:
        for rank, p in enumerate(procs):
            if rank not in ended and p.poll() is not None:
                ended[rank] = time.monotonic() - start
        time.sleep(0.05)
    codes, errs = [], []
    for p, log in zip(procs, logs, strict=True):
        if p.poll() is None:
            p.kill()
        codes.append(p.wait())
        log.seek(0)
        errs.append(log.read())
        log.close()
    return RankRun(codes, errs, time.monotonic() - start, [ended.get(r, float("inf")) for r in range(world)])
