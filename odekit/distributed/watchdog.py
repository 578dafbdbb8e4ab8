"""Failure handling across ranks: the peer-failed error and the per-rank watchdog thread.

The watchdog posts a heartbeat to the rendezvous store over its own connection and watches for
the abort key a failing rank writes; a peer whose heartbeat stops moving, or a store that goes
away, counts as a failure too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from odekit.errors import OdekitError

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

