"""Safetensors files odekit writes have reproducible bytes (sha256 in reports means something)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from odekit.writers.tensor_file import canonical_safetensors, write_safetensors

_WRITER = """
import sys, torch
from odekit.writers.tensor_file import write_safetensors
g = torch.Generator().manual_seed(0)
state = {"w": torch.randn(3, 4, generator=g), "b": torch.arange(5.0), "i": torch.arange(3)}
meta = {f"key{k}": str(k) for k in range(12)} | {"format": "pt"}
write_safetensors(sys.argv[1], state, meta)
"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_processes_write_identical_bytes(tmp_path: Path) -> None:
    paths = [tmp_path / f"run{k}.safetensors" for k in range(3)]
    for path in paths:  # separate processes: separate hash seeds in safetensors' metadata map
        subprocess.run([sys.executable, "-c", _WRITER, str(path)], check=True)
    assert len({_sha(p) for p in paths}) == 1


def test_canonical_file_reads_back_unchanged(tmp_path: Path) -> None:
    state = {"a": torch.randn(7, 3, dtype=torch.float64), "z": torch.ones(1, dtype=torch.int8), "m": torch.zeros(0)}
    meta = {"b": "2", "a": "1", "format": "pt"}
    path = write_safetensors(tmp_path / "x.safetensors", state, meta)
    loaded = load_file(str(path))
    assert loaded.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor) and loaded[key].dtype == tensor.dtype
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == meta
    raw = path.read_bytes()
    assert int.from_bytes(raw[:8], "little") % 8 == 0
    assert canonical_safetensors(raw) == raw  # idempotent
