"""``torch.export`` archives (``.pt2``): self-contained models that load without their code.

The archive stores an aten-level graph plus weights; odekit adds its metadata as the extra file
``odekit_meta.json``. The batch dimension is exported dynamic so any batch size runs.
"""

from __future__ import annotations

import io
import types
from pathlib import Path

import torch
from torch import nn

from odekit.errors import CheckpointError, UnsupportedModelError
from odekit.writers.atomic import atomic_write_bytes

EXPORT_META_FILE = "odekit_meta.json"
# torch.export cannot specialise a dynamic dimension to the sample size it was traced with,
# so trace with 2 and declare the batch dimension free.
_TRACE_BATCH = 2
_MAX_BATCH = 1 << 24


def export_program(model: nn.Module, input_shape: tuple[int, ...]) -> torch.export.ExportedProgram:
    """Export ``model`` (eval mode, on the CPU) with a dynamic batch dimension."""
    was_training = model.training
    model.eval()
    try:
        param = next(iter(model.parameters()), None)
        dtype = param.dtype if param is not None else torch.float32
        device = param.device if param is not None else torch.device("cpu")
        example = torch.zeros(_TRACE_BATCH, *input_shape, dtype=dtype, device=device)
        batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as exc:  # torch raises many kinds (UserError, GuardOnDataDependentSymNode, ...)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(
            f"torch.export could not trace the model ({type(exc).__name__}: {first})",
            "data-dependent control flow in forward() cannot be exported; rewrite it with torch.cond or tensor ops",
        ) from exc
    finally:
        model.train(was_training)


def save_exported(
    path: str | Path, model: nn.Module, input_shape: tuple[int, ...], meta_json: str | None, *, force: bool = False
) -> Path:
    """Write ``model`` as a ``.pt2`` archive carrying odekit's metadata JSON, atomically."""
    program = export_program(model, input_shape)
    buffer = io.BytesIO()
    extra = {EXPORT_META_FILE: meta_json} if meta_json is not None else {}
    torch.export.save(program, buffer, extra_files=extra)
    return atomic_write_bytes(path, buffer.getvalue(), force)


def is_export_archive(names: list[str]) -> bool:
    """True for the member list of a ``torch.export.save`` zip archive."""
    return any(name.endswith("/archive_format") for name in names) and any(
        name.endswith("/models/model.json") or "/models/" in name for name in names
    )


def load_exported(path: str | Path) -> tuple[nn.Module, str | None]:
    """Load a ``.pt2`` archive: the runnable module (a GraphModule) and odekit's metadata JSON, if any."""
    extra = {EXPORT_META_FILE: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as exc:
        raise CheckpointError(
            f"'{path}' is not a loadable torch.export archive ({type(exc).__name__})",
            "the file may be truncated; write it again with torch.export.save",
        ) from exc
    module = program.module()
    _freeze_mode(module)
    return module, (extra[EXPORT_META_FILE] or None)


def _freeze_mode(module: nn.Module) -> None:
    """Make ``train()``/``eval()`` no-ops on an exported module.

    torch makes them raise on ``ExportedProgram.module()``: the graph is fixed to the mode it was
    traced in (eval: batch norm uses running statistics). Callers put every model in eval mode
    before use, so a no-op keeps that contract without special cases everywhere.
    """

    def keep_mode(self: nn.Module, mode: bool = True) -> nn.Module:
        return self

    module.train = types.MethodType(keep_mode, module)  # type: ignore[method-assign]
    module.eval = types.MethodType(lambda self: self, module)  # type: ignore[method-assign]
    object.__setattr__(module, "training", False)
