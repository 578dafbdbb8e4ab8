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

Modules: `launch` (environment, backend, rank device), `sharding`, `watchdog` (peer failure
detection), `handle` (the `Distributed` handle and its collectives), `group` (joining the
process group).
"""

from odekit.distributed.group import init_distributed
from odekit.distributed.handle import Distributed, current
from odekit.distributed.launch import LaunchEnv, backend_for, read_launch_env
from odekit.distributed.sharding import shard_bounds, shard_indices
from odekit.distributed.watchdog import PeerFailedError

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
