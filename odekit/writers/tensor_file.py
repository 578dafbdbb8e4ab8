"""Safetensors files with reproducible bytes.

safetensors keeps the ``__metadata__`` map in a hash map, so the same tensors and metadata give
a different header order (and a different sha256) in every process. Reports record checkpoint
hashes, and the shipped checkpoints must rebuild byte for byte, so the header is re-serialised
with sorted metadata keys before the atomic write; the tensor bytes are untouched.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from odekit.writers.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from torch import Tensor

_HEADER_ALIGNMENT = 8  # safetensors pads its JSON header with spaces to this multiple


def canonical_safetensors(payload: bytes) -> bytes:
    """The same file with its ``__metadata__`` keys sorted (tensor entries keep their order)."""
    (length,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8 : 8 + length])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % _HEADER_ALIGNMENT)
    return struct.pack("<Q", len(text)) + text + payload[8 + length :]


def write_safetensors(
    path: str | os.PathLike[str], state: dict[str, Tensor], metadata: dict[str, str], force: bool = False
) -> Path:
    """Write ``state`` with ``metadata`` atomically; equal inputs give equal bytes."""
    from safetensors.torch import save

    return atomic_write_bytes(path, canonical_safetensors(save(state, metadata=metadata)), force)
