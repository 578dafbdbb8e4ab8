"""Loading steps shared by the commands: checkpoint and data, recorded in the report inputs."""

from __future__ import annotations

from pathlib import Path

import torch

from odekit.cli.options import ModelOptions
from odekit.cli.runner import CommandContext
from odekit.errors import DataError, UnsupportedModelError
from odekit.io.checkpoints import LoadedModel, load_model
from odekit.io.datasets import Dataset, dataset_for_model
from odekit.io.preprocessing import (
    FOREIGN_DEFAULT_NORMALIZE,
    Preprocessing,
    describe_normalization,
    parse_normalize,
)
from odekit.io.user_arch import parse_arch_args
from odekit.io.validation import check_classes_match
from odekit.models.graph import TORCHSCRIPT_HINT
from odekit.stats import accuracy_text

__all__ = ["accuracy_text", "load_checkpoint", "load_data", "require_python_module"]

DEFAULT_DATA = "digits"
DEFAULT_DATA_SHAPES = ((1, 8, 8), (64,))


def load_checkpoint(ctx: CommandContext, opts: ModelOptions, key: str = "checkpoint") -> LoadedModel:
    """Load ``opts.checkpoint`` and record its path, hash and format in the report inputs."""
    loaded = load_model(
        opts.checkpoint,
        arch=opts.arch,
        num_classes=opts.num_classes,
        trust_checkpoint=opts.trust_checkpoint,
        arch_args=parse_arch_args(opts.arch_args),
    )
    loaded.model.to(ctx.device)
    ctx.inputs[key] = {
        "path": str(opts.checkpoint),
        "sha256": loaded.sha256,
        "format": loaded.format,
        "arch": loaded.meta.arch,
    }
    return loaded


def require_python_module(loaded: LoadedModel, command: str) -> None:
    """Refuse TorchScript for commands that rewrite the model's layers."""
    if isinstance(loaded.model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            f"'{loaded.path}' is a TorchScript archive, which {command} cannot rewrite: it needs the model's "
            "Python code or a torch.export archive",
            TORCHSCRIPT_HINT,
        )


def has_odekit_metadata(loaded: LoadedModel) -> bool:
    """True when the checkpoint records the data and normalisation it was trained with."""
    return loaded.meta.dataset is not None or loaded.meta.normalization is not None


def load_data(
    ctx: CommandContext,
    loaded: LoadedModel,
    data: str | None,
    data_dir: Path | None,
    key: str = "data",
    prep: Preprocessing | None = None,
) -> Dataset:
    """The data for ``loaded`` (its own data set unless --data says otherwise), recorded under ``key``.

    Explicit preprocessing options win; otherwise the checkpoint's metadata decides, and a
    checkpoint without metadata gets [0, 1] pixels in the data's own shape, with one warning.
    """
    prep = prep or Preprocessing()
    meta = loaded.meta
    foreign = not has_odekit_metadata(loaded)
    if prep.normalize is not None:
        normalization, norm_source = prep.normalize.as_dict(), "--normalize"
    elif foreign:
        normalization, norm_source = parse_normalize(FOREIGN_DEFAULT_NORMALIZE).as_dict(), "assumed (no odekit metadata)"
    else:
        normalization, norm_source = meta.normalization, "checkpoint"
    shape = prep.input_shape or (tuple(meta.input_shape) if meta.input_shape else None)
    if foreign and data is None and prep.input_shape is None and shape is not None and shape not in DEFAULT_DATA_SHAPES:
        raise DataError(
            f"'{loaded.path}' takes inputs of shape {_shape(shape)} and records no data set; odekit will not "
            f"stretch its default data ({DEFAULT_DATA}, 1x8x8) to fit",
            "pass --data with the data it was trained on (PATH.npz, or cifar10 --data-dir DIR, ...)",
        )
    dataset = dataset_for_model(
        shape, normalization, meta.dataset, data or (DEFAULT_DATA if foreign else None), data_dir, **prep.npz_options()
    )
    if foreign:
        _probe(loaded, dataset, data, ctx.device)
        meta.input_shape, meta.normalization = list(dataset.input_shape), dataset.normalization()
        meta.dataset = dataset.describe()
        _warn_assumed(ctx, loaded, dataset, assumed_norm=prep.normalize is None, assumed_shape=shape is None)
    check_classes_match(
        dataset.num_classes, dataset.num_classes - 1, dataset.source.get("classes"), meta.num_classes, dataset.name
    )
    ctx.inputs[key] = {
        **dataset.describe(),
        "normalization": {**dataset.normalization(), "source": norm_source},
        **({"layout": prep.layout, "pixel_max": prep.pixel_max} if str(data or "").endswith(".npz") else {}),
    }
    return dataset


def _warn_assumed(ctx: CommandContext, loaded: LoadedModel, dataset: Dataset, *, assumed_norm: bool, assumed_shape: bool) -> None:
    """One warning line naming what was assumed for a checkpoint without metadata, and only that:
    a ``.pt2`` holds its input shape, ``--normalize``/``--input-shape`` state theirs."""
    said = [
        f"normalisation {describe_normalization(dataset.mean, dataset.std)} (assumed)" if assumed_norm else "",
        f"input shape {_shape(dataset.input_shape)} (assumed: as stored in {dataset.name})" if assumed_shape else "",
    ]
    flags = [flag for flag, on in (("--normalize", assumed_norm), ("--input-shape", assumed_shape)) if on]
    if not flags:
        return
    ctx.log_console.print(  # one line, however narrow the terminal
        f"[yellow]Warning:[/yellow] '{loaded.path}' carries no odekit metadata; using "
        f"{' and '.join(s for s in said if s)}; pass {' and '.join(flags)} to state {'both' if len(flags) == 2 else 'it'}",
        highlight=False,
        soft_wrap=True,
    )


def _fixed_batch(message: str) -> bool:
    """torch.export's guard on a program exported for one batch size (e.g. 'x.size()[0] == 1')."""
    return "Guard failed" in message and ".size()[0] ==" in message


def _probe(loaded: LoadedModel, dataset: Dataset, data: str | None, device: torch.device) -> None:
    """Run two test samples through a model without metadata: a clear error beats a failure deep in a method."""
    sample = dataset.test.x[:2].to(device)
    try:
        with torch.no_grad():
            out = loaded.model(sample)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        hint = (
            "pass --input-shape C,H,W to resize the data, or --layout NHWC if the .npz is channels-last"
            if data
            else "pass --data with the data it was trained on (PATH.npz, or cifar10 --data-dir DIR, ...)"
        )
        if _fixed_batch(first):
            hint = ("the .pt2 program was exported for one batch size: export it again with a dynamic batch "
                    "dimension (torch.export.export(..., dynamic_shapes=({0: torch.export.Dim('batch')},)))")  # fmt: skip
        what = (
            f"the model does not accept {dataset.name} inputs of shape {_shape(dataset.input_shape)}"
            if data
            else f"'{loaded.path}' records no data set, and odekit's default data ({dataset.name}, "
            f"{_shape(dataset.input_shape)}) does not fit it"
        )
        raise DataError(f"{what} ({first})", hint) from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UnsupportedModelError(
            f"the model returns {got}, not logits of shape (batch, classes)",
            "odekit works on classifiers; wrap the model so forward() returns the logits tensor",
        )
    if loaded.meta.num_classes is None:
        loaded.meta.num_classes = int(out.shape[1])


def _shape(shape: tuple[int, ...] | list[int]) -> str:
    return "x".join(str(s) for s in shape)
