"""The per-process handle: rank, world size and device, bounded collectives, failure handling.

With ``world_size == 1`` (a plain run) every collective returns its input and nothing is
communicated. `current` returns the handle `init_distributed` made for this process.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import torch
from torch import Tensor

from odekit.distributed.launch import LaunchEnv
from odekit.distributed.sharding import shard_indices
from odekit.distributed.watchdog import (
    GRACE_S,
    HEARTBEAT_S,
    PeerFailedError,
    _peer_failed_type,
    _Watchdog,
)
from odekit.errors import UsageError


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

    def all_reduce_sum_many(self, tensors: list[Tensor]) -> list[Tensor]:
        """Elementwise sums over ranks of several tensors (one dtype and device) in one
        all-reduce: new tensors of the same shapes, in order."""
        if not tensors:
            return []
        flat = self.all_reduce_sum(torch.cat([t.reshape(-1) for t in tensors]))
        sizes = [t.numel() for t in tensors]
        return [part.reshape(t.shape) for part, t in zip(flat.split(sizes), tensors, strict=True)]

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


def set_current(handle: Distributed) -> None:
    """Make ``handle`` the one `current` returns (until it is closed)."""
    global _CURRENT
    _CURRENT = handle
