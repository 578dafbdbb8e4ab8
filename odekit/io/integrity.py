"""Integrity checks: a hash of the tensor data odekit writes, and zip CRCs of torch archives."""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from odekit.errors import IntegrityError

DIGEST_KEY = "odekit_tensors_sha256"


def tensor_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of ``state``, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def verify_tensor_digest(state: Mapping[str, torch.Tensor], recorded: str | None, path: Path) -> None:
    """Compare the recorded hash (files odekit wrote carry one) with the tensors read back."""
    if recorded is None:
        return
    if tensor_digest(state) != recorded:
        raise IntegrityError(
            f"'{path}' is corrupted: its tensor data does not match the hash odekit recorded when writing it",
            "copy the file again from its source, or re-run the command that made it",
        )


def verify_zip_crc(archive: zipfile.ZipFile, path: Path) -> None:
    """Read every member of a zip archive (.pt, TorchScript) and check its CRC-32."""
    try:
        bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, ValueError) as exc:
        bad = f"? ({exc})"
    if bad is not None:
        raise IntegrityError(
            f"'{path}' is corrupted: archive member '{bad}' fails its CRC-32 check",
            "the file was damaged in transfer or on disk; copy or export it again",
        )
