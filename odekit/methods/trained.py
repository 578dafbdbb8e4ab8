"""What a train-ode job hands back to the CLI: the model, its checkpoint metadata, the data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from odekit.io.checkpoints import ModelMeta


@dataclass(frozen=True)
class TrainedModelResult:
    """A trained model ready to save; subclasses add the record of their training."""

    task: str
    arch: str
    model_args: dict[str, Any]  # the builder's arguments, as the checkpoint records them
    data_name: str
    data_info: dict[str, Any]  # the data set as the report's inputs record it
    model: nn.Module
    meta: ModelMeta
