"""Spawn N ranks of a worker script on loopback with torchrun's environment variables."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

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


def spawn_ranks(
    args: list[str], world: int, timeout: float = 120.0, extra_env: dict[str, str] | None = None
) -> RankRun:
    """Start ``world`` processes ``python *args`` as ranks 0..world-1; wait for all of them."""
    port = free_port()
    procs = []
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
        procs.append(
            subprocess.Popen(
                [sys.executable, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True,
            )
        )
    codes, errs = [], []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        codes.append(p.returncode)
        errs.append(err)
    return RankRun(codes, errs, time.monotonic() - start)


@pytest.fixture
def ranks():
    return spawn_ranks
