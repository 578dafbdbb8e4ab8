"""Loading steps shared by the commands: checkpoint and data, recorded in the report inputs."""

from __future__ import annotations

from pathlib import Path

from odekit.cli.options import ModelOptions
from odekit.cli.runner import CommandContext
from odekit.io.checkpoints import LoadedModel, load_model
from odekit.io.datasets import Dataset, dataset_for_model
from odekit.io.validation import check_classes_match


def load_checkpoint(ctx: CommandContext, opts: ModelOptions, key: str = "checkpoint") -> LoadedModel:
    """Load ``opts.checkpoint`` and record its path, hash and format in the report inputs."""
    loaded = load_model(
        opts.checkpoint, arch=opts.arch, num_classes=opts.num_classes, trust_checkpoint=opts.trust_checkpoint
    )
    loaded.model.to(ctx.device)
    ctx.inputs[key] = {
        "path": str(opts.checkpoint),
        "sha256": loaded.sha256,
        "format": loaded.format,
        "arch": loaded.meta.arch,
    }
    return loaded


def load_data(
    ctx: CommandContext, loaded: LoadedModel, data: str | None, data_dir: Path | None, key: str = "data"
) -> Dataset:
    """The data for ``loaded`` (its own data set unless --data says otherwise), recorded under ``key``."""
    dataset = dataset_for_model(
        loaded.meta.input_shape, loaded.meta.normalization, loaded.meta.dataset, data, data_dir
    )
    check_classes_match(
        dataset.num_classes, dataset.num_classes - 1, dataset.source.get("classes"), loaded.meta.num_classes, dataset.name
    )
    ctx.inputs[key] = dataset.describe()
    return dataset
