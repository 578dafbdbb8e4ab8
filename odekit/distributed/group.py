"""Join a ``torchrun`` process group with a bounded timeout and start the rank's watchdog."""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from odekit.distributed.handle import Distributed, set_current
from odekit.distributed.launch import LaunchEnv, backend_for, rank_device, read_launch_env
from odekit.distributed.watchdog import STALE_S, _Watchdog
from odekit.errors import UsageError

DEFAULT_TIMEOUT_S = 1800.0  # a process group collective never waits longer than this


def _timeout_s() -> float:
    raw = os.environ.get("ODEKIT_DIST_TIMEOUT_S", "").strip()
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UsageError(f"ODEKIT_DIST_TIMEOUT_S='{raw}' is not a number of seconds") from None
    if value <= 0:
        raise UsageError(f"ODEKIT_DIST_TIMEOUT_S must be positive, got {value}")
    return value


def init_distributed(
    device: torch.device,
    env: LaunchEnv | None = None,
    timeout_s: float | None = None,
    stale_s: float = STALE_S,
) -> Distributed:
    """Join the run described by ``env`` (default: the environment) on ``device``.

    World 1: returns a handle without a process group. World > 1: picks the backend from the
    device, moves CUDA ranks to ``cuda:LOCAL_RANK``, creates the rendezvous store (rank 0
    serves it unless torchrun's agent already does), joins the process group with a bounded
    timeout and starts the watchdog."""
    env = env or read_launch_env()
    if not env.distributed:
        handle = Distributed(env, device)
        set_current(handle)
        return handle
    import torch.distributed as dist

    if not dist.is_available():
        raise UsageError("this PyTorch build has no torch.distributed", "run a single process")
    device = rank_device(device, env)
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s if timeout_s is not None else _timeout_s())
    assert env.master_addr is not None and env.master_port is not None
    try:
        store = dist.TCPStore(
            env.master_addr,
            env.master_port,
            env.world_size,
            is_master=env.rank == 0 and not env.agent_store,
            timeout=timeout,
            wait_for_workers=False,
        )
        dist.init_process_group(
            backend=backend,
            store=dist.PrefixStore(f"odekit/{env.restart}/pg", store),
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
        )
    except Exception as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UsageError(
            f"rank {env.rank} could not join the process group at "
            f"{env.master_addr}:{env.master_port} ({first})",
            "check MASTER_ADDR/MASTER_PORT and that every rank was started",
        ) from None
    handle = Distributed(env, device, backend=backend, store=store)
    watchdog = _Watchdog(
        store.clone(),
        f"odekit/{env.restart}",
        env.rank,
        env.world_size,
        handle._on_peer_abort,
        stale_s=stale_s,
    )
    handle._watchdog = watchdog
    watchdog.start()
    set_current(handle)
    return handle
