"""The metadata odekit stores with a model (``ModelMeta``) and a loaded model with its origin
(``LoadedModel``); `odekit.io.checkpoints` reads and writes both."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from odekit import __version__
from odekit.errors import CheckpointError
from odekit.io.meta_schema import validate_meta_fields

META_KEY = "odekit"
TORCHSCRIPT_META_FILE = "odekit_meta.json"


@dataclass
class ModelMeta:
    """What odekit knows about a model: how to rebuild it and where it came from."""

    arch: str
    args: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    input_shape: list[int] | None = None
    normalization: dict[str, list[float]] | None = None
    dataset: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    source_sha256: str | None = None
    odekit_version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelMeta:
        try:
            raw = validate_meta_fields(json.loads(text))
            known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
            return cls(**known)
        except (json.JSONDecodeError, TypeError, RecursionError) as exc:
            raise CheckpointError(
                f"checkpoint metadata is not valid odekit JSON: {exc}",
                "the file was not written by odekit; pass `arch` and `num_classes`",
            ) from exc

    def derived(self, arch: str, args: dict[str, Any], step: dict[str, Any], source: str) -> ModelMeta:
        """Metadata for a model made from this one (a student, an ASNet...)."""
        return ModelMeta(
            arch=arch,
            args=args,
            num_classes=self.num_classes,
            input_shape=self.input_shape,
            normalization=self.normalization,
            dataset=self.dataset,
            history=[*self.history, step],
            source_sha256=source,
            extra={},
        )


@dataclass
class LoadedModel:
    model: nn.Module
    meta: ModelMeta
    path: Path
    sha256: str
    format: str

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        return tuple(self.meta.input_shape) if self.meta.input_shape else None

