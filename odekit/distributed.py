"""Multi-process runs launched by ``torchrun``: environment, process group, sharding, collectives.

``torchrun --nproc-per-node N -m odekit <command> ...`` starts N copies of odekit with the
standard variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
`init_distributed` reads them, joins the process group (``nccl`` on CUDA, ``gloo`` on CPU) and
puts rank k on ``cuda:LOCAL_RANK``. Without those variables (a plain run) it returns a
world-of-one handle whose collectives return their input: no process group, nothing changes.

Every collective is bounded: besides the process group's own timeout, a watchdog thread per
rank posts a heartbeat to the rendezvous store and watches for an abort key. A rank that fails
calls `Distributed.fail` (its one-line error goes to the store); every other rank then raises
`PeerFailedError` in its main thread and, should that thread be stuck in a collective, runs its
cleanup callbacks and exits with status 1 after a short grace period. A rank that dies without
a word (killed, segfault) is noticed by its stale heartbeat or by the store going away.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
from torch import Tensor

from odekit.errors import OdekitError, UsageError

__all__ = [
    "Distributed",
    "LaunchEnv",
    "PeerFailedError",
    "backend_for",
    "current",
    "init_distributed",
    "read_launch_env",
    "shard_bounds",
    "shard_indices",
]

DEFAULT_TIMEOUT_S = 1800.0  # a process group collective never waits longer than this
HEARTBEAT_S = 0.5  # watchdog poll period
STALE_S = 20.0  # a peer whose heartbeat has not moved for this long is presumed dead
GRACE_S = 5.0  # time the main thread gets to unwind after a peer failed, before os._exit(1)


class PeerFailedError(OdekitError):
    """Another rank failed; this rank stops (exit 1) without printing a second error line."""

    default_message = "another rank failed"

    def __init__(self, message: str | None = None, hint: str | None = None) -> None:
        super().__init__(message or self.default_message, hint)


def _peer_failed_type(message: str) -> type[PeerFailedError]:
    """A subclass carrying ``message``: asynchronous exceptions are raised from the bare class."""
    return type("PeerFailedError", (PeerFailedError,), {"default_message": message})


# ----------------------------------------------------------------------------- environment


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


# ----------------------------------------------------------------------------- sharding


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous block [start, stop) of ``n`` items for ``rank``: sizes differ by at most one,
    blocks are disjoint and in rank order, and together they are exactly range(n)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"rank {rank} is outside 0..{world_size - 1}")
    if n < 0:
        raise UsageError(f"cannot shard {n} items")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """The indices of `shard_bounds` as a range."""
    return range(*shard_bounds(n, rank, world_size))


# ----------------------------------------------------------------------------- watchdog


class _Watchdog:
    """Heartbeats, abort flag and peer liveness through the rendezvous store (own connection)."""

    def __init__(
        self,
        store: Any,
        prefix: str,
        rank: int,
        world_size: int,
        on_abort: Callable[[str], None],
        poll_s: float = HEARTBEAT_S,
        stale_s: float = STALE_S,
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.rank = rank
        self.world_size = world_size
        self.on_abort = on_abort
        self.poll_s = poll_s
        self.stale_s = stale_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="odekit-dist-watchdog", daemon=True)

    @property
    def abort_key(self) -> str:
        return f"{self.prefix}/abort"

    def key(self, kind: str, rank: int) -> str:
        return f"{self.prefix}/{kind}/{rank}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5 * self.poll_s + 1.0)

    def _run(self) -> None:
        peers = [r for r in range(self.world_size) if r != self.rank]
        last_seen = {r: (-1, time.monotonic()) for r in peers}
        while not self._stop.wait(self.poll_s):
            try:
                self.store.add(self.key("hb", self.rank), 1)
                if self.store.check([self.abort_key]):
                    self._stop.set()
                    self.on_abort(self.store.get(self.abort_key).decode("utf-8", "replace"))
                    return
                now = time.monotonic()
                for r in peers:
                    if self.store.check([self.key("done", r)]):
                        continue
                    beat = int(self.store.add(self.key("hb", r), 0))
                    if beat != last_seen[r][0]:
                        last_seen[r] = (beat, now)
                    elif now - last_seen[r][1] > self.stale_s:
                        self._stop.set()
                        self.on_abort(f"rank {r} stopped responding for {self.stale_s:.0f} s")
                        return
            except Exception as exc:  # the store is gone: its host (rank 0 or torchrun) ended
                if self._stop.is_set():
                    return
                self._stop.set()
                first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
                self.on_abort(f"lost contact with the rendezvous store ({first})")
                return


# ----------------------------------------------------------------------------- the handle


class Distributed:
    """This process's place in the run: rank, world size, device, collectives.

    With ``world_size == 1`` every collective returns its input and nothing is communicated.
    Collectives take tensors on any device and return them on the same device.
    """

    def __init__(
        self,
        env: LaunchEnv,
        device: torch.device,
        backend: str | None = None,
        store: Any = None,
        grace_s: float = GRACE_S,
    ) -> None:
        self.env = env
        self.device = device
        self.backend = backend
        self.store = store
        self.grace_s = grace_s
        self.bytes_sent = 0  # payload bytes this rank sent through collectives (a lower bound)
        self._cleanups: list[Callable[[], None]] = []
        self._watchdog: _Watchdog | None = None
        self._main_thread = threading.main_thread()
        self._failure: str | None = None
        self._closed = False

    # ---- identity
    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    @property
    def active(self) -> bool:
        """True when a process group is joined (world size > 1 and not yet closed)."""
        return self.env.distributed and self.backend is not None and not self._closed

    def describe(self) -> dict[str, Any]:
        """What report.json records about the run's layout."""
        return {
            "world_size": self.world_size,
            "backend": self.backend if self.env.distributed else None,
            "rank_device": str(self.device),
        }

    def shard(self, n: int) -> range:
        """This rank's disjoint, contiguous share of ``n`` items (all of them at world 1)."""
        return shard_indices(n, self.rank, self.world_size)

    # ---- collectives
    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    @contextlib.contextmanager
    def _collective(self) -> Iterator[None]:
        """A collective that fails because a peer failed raises that peer's error instead
        (gloo notices the closed connection before the watchdog reads the abort key)."""
        try:
            yield
        except PeerFailedError:
            raise
        except Exception:
            message = self.posted_failure(wait_s=3 * HEARTBEAT_S + 1.0)
            if message is None:
                raise
            self._failure = message
            raise _peer_failed_type(message)() from None

    def posted_failure(self, wait_s: float) -> str | None:
        """Another rank's posted failure message, waiting up to ``wait_s`` for it to appear."""
        if self.store is None or self._watchdog is None:
            return None
        key = self._watchdog.abort_key
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if self.store.check([key]):
                    return str(self.store.get(key).decode("utf-8", "replace"))
            except Exception:
                return None
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    def _send_count(self, t: Tensor) -> None:
        self.bytes_sent += t.numel() * t.element_size()

    def _all_reduce(self, tensor: Tensor, op: str) -> Tensor:
        if not self.active:
            return tensor.clone()
        import torch.distributed as dist

        buf = tensor.detach().to(self._comm_device).clone()
        self._send_count(buf)
        with self._collective():
            dist.all_reduce(buf, op=getattr(dist.ReduceOp, op))
        return buf.to(tensor.device)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Elementwise sum over ranks (a new tensor; the input is left unchanged)."""
        return self._all_reduce(tensor, "SUM")

    def all_reduce_max(self, tensor: Tensor) -> Tensor:
        """Elementwise maximum over ranks (a new tensor)."""
        return self._all_reduce(tensor, "MAX")

    def sum_numbers(self, *values: float) -> list[float]:
        """Sum plain numbers (counts, sums of squares...) over ranks, in float64: exact for
        integer counts below 2^53."""
        reduced = self.all_reduce_sum(torch.tensor(values, dtype=torch.float64))
        return [float(v) for v in reduced]

    def mean(self, total: float, count: float) -> float:
        """Global mean from this rank's partial sum and count."""
        s, n = self.sum_numbers(total, count)
        return s / n if n else float("nan")

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's tensor (same shape and dtype on every rank), in rank order."""
        if not self.active:
            return [tensor.clone()]
        import torch.distributed as dist

        buf = tensor.detach().to(self._comm_device).contiguous()
        out = [torch.empty_like(buf) for _ in range(self.world_size)]
        self._send_count(buf)
        with self._collective():
            dist.all_gather(out, buf)
        return [t.to(tensor.device) for t in out]

    def send(self, tensor: Tensor, dst: int) -> None:
        import torch.distributed as dist

        buf = tensor.detach().to(self._comm_device).contiguous()
        self._send_count(buf)
        with self._collective():
            dist.send(buf, dst)

    def recv_like(self, like: Tensor, src: int) -> Tensor:
        import torch.distributed as dist

        buf = torch.empty(like.shape, dtype=like.dtype, device=self._comm_device)
        with self._collective():
            dist.recv(buf, src)
        return buf.to(like.device)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Pickle-able object from ``src`` (small things: ranks, indices lists, messages)."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        with self._collective():
            dist.broadcast_object_list(box, src=src, device=self._comm_device)
        return box[0]

    def broadcast(self, tensor: Tensor | None, src: int = 0, device: torch.device | None = None) -> Tensor:
        """``src``'s tensor on every rank (others pass None: shape and dtype travel first).
        The result lands on ``device`` (default: this rank's device)."""
        target = device or self.device
        if not self.active:
            if tensor is None:
                raise UsageError("broadcast from a single process needs the tensor itself")
            return tensor.to(target)
        import torch.distributed as dist

        meta = None
        if self.rank == src and tensor is not None:
            meta = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
        meta = self.broadcast_object(meta, src=src)
        if meta is None:
            raise UsageError(f"rank {src} had nothing to broadcast")
        shape, dtype_name = meta
        if self.rank == src:
            assert tensor is not None
            buf = tensor.detach().to(self._comm_device).contiguous()
            self._send_count(buf)
        else:
            buf = torch.empty(shape, dtype=getattr(torch, dtype_name), device=self._comm_device)
        with self._collective():
            dist.broadcast(buf, src=src)
        return buf.to(target)

    def broadcast_tensors(self, tensors: dict[str, Tensor] | None, src: int = 0) -> dict[str, Tensor]:
        """A dict of tensors from ``src`` (keys travel with the metadata)."""
        keys = self.broadcast_object(sorted(tensors) if self.rank == src and tensors else None, src)
        keys = keys or []
        return {k: self.broadcast(tensors[k] if self.rank == src and tensors else None, src) for k in keys}

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            with self._collective():
                if self.backend == "nccl":
                    dist.barrier(device_ids=[self.device.index or 0])
                else:
                    dist.barrier()

    # ---- failure handling
    def add_cleanup(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` (e.g. remove half-written outputs) if a peer's failure forces exit."""
        self._cleanups.append(callback)

    @property
    def failure(self) -> str | None:
        """The failing rank's message once a failure is known (None while all is well)."""
        return self._failure

    def fail(self, message: str) -> None:
        """Tell every other rank that this one failed (one line, posted once)."""
        if not self.active or self.store is None or self._watchdog is None:
            return
        self._watchdog.stop()
        text = f"rank {self.rank}: {message}"
        self._failure = text
        with contextlib.suppress(Exception):
            # the first failure wins: later ones would only repeat the cascade
            self.store.compare_set(self._watchdog.abort_key, "", text)
        if self.rank == 0 and not self.env.agent_store:
            # this process serves the store: give the peers' watchdogs time to read the message
            time.sleep(3 * HEARTBEAT_S)

    def exit_after_failure(self, code: int = 1) -> NoReturn:
        """End a failed multi-process run now: flush stdio and leave without tearing the
        process group down (its destructors may wait on, or abort over, the broken peers)."""
        with contextlib.suppress(Exception):
            sys.stderr.flush()
            sys.stdout.flush()
        os._exit(code)

    def _on_peer_abort(self, message: str) -> None:
        """Watchdog thread: a peer failed. Interrupt the main thread, then force the exit."""
        self._failure = message
        exc_type = _peer_failed_type(message)
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(self._main_thread.ident or 0), ctypes.py_object(exc_type)
        )
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline:
            if not self._main_thread.is_alive():
                return
            time.sleep(0.05)
        # the main thread is stuck in C++ (a collective): clean up from here and leave
        for callback in reversed(self._cleanups):
            with contextlib.suppress(Exception):
                callback()
        self.exit_after_failure(1)

    # ---- shutdown
    def close(self) -> None:
        """Leave the process group after every rank got here (bounded by the group timeout)."""
        global _CURRENT
        if self._closed:
            return
        if self.active:
            import torch.distributed as dist

            watchdog = self._watchdog
            if watchdog is not None and self._failure is None:
                with contextlib.suppress(Exception):
                    self.store.set(watchdog.key("done", self.rank), "1")
            if watchdog is not None:
                watchdog.stop()
            try:
                if self._failure is None:
                    self.barrier()
            finally:
                with contextlib.suppress(Exception):
                    dist.destroy_process_group()
        self._closed = True
        if _CURRENT is self:
            _CURRENT = None


_CURRENT: Distributed | None = None


def current() -> Distributed:
    """The handle `init_distributed` made for this process (a world of one if none was made)."""
    if _CURRENT is not None:
        return _CURRENT
    return Distributed(LaunchEnv(), torch.device("cpu"))


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
    global _CURRENT
    env = env or read_launch_env()
    if not env.distributed:
        handle = Distributed(env, device)
        _CURRENT = handle
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
    _CURRENT = handle
    return handle
