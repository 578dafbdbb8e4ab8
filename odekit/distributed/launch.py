"""What the launcher tells this process: torchrun's variables, the backend, the rank device."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from odekit.errors import UsageError


@dataclass(frozen=True)
class LaunchEnv:
    """What ``torchrun`` (or any launcher setting the same variables) tells this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    agent_store: bool = False  # torchrun's agent already serves the rendezvous store
    restart: int = 0  # torchrun restart count: keeps store keys of earlier attempts apart

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(
            f"environment variable {name}='{raw}' is not an integer",
            "launch with torchrun, or unset the variable for a single-process run",
        ) from None


def read_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``.

    Absent variables mean a single process (rank 0 of 1)."""
    environ = os.environ if environ is None else environ
    world = _env_int(environ, "WORLD_SIZE", 1)
    rank = _env_int(environ, "RANK", 0)
    local = _env_int(environ, "LOCAL_RANK", rank if world > 1 else 0)
    if world < 1:
        raise UsageError(f"WORLD_SIZE must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    if local < 0:
        raise UsageError(f"LOCAL_RANK must be >= 0, got {local}")
    addr = environ.get("MASTER_ADDR", "").strip() or None
    port = _env_int(environ, "MASTER_PORT", 0) or None
    if world > 1 and (addr is None or port is None):
        raise UsageError(
            f"WORLD_SIZE={world} but MASTER_ADDR/MASTER_PORT are not set",
            "launch with torchrun, which sets them, or set both for every rank",
        )
    return LaunchEnv(
        rank=rank,
        world_size=world,
        local_rank=local,
        master_addr=addr,
        master_port=port,
        agent_store=environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
        restart=_env_int(environ, "TORCHELASTIC_RESTART_COUNT", 0),
    )


def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, env: LaunchEnv) -> torch.device:
    """Rank k of a multi-process CUDA run uses ``cuda:LOCAL_RANK``; CPU stays CPU."""
    if device.type != "cuda" or not env.distributed:
        return device
    count = torch.cuda.device_count()
    if env.local_rank >= count:
        raise UsageError(
            f"LOCAL_RANK={env.local_rank} but this node has {count} CUDA device(s)",
            f"use --nproc-per-node <= {count}, or --device cpu",
        )
    return torch.device("cuda", env.local_rank)

