"""What a model's inputs are: normalisation, input shape and the layout/pixel range of ``.npz`` files.

``--normalize`` grammar (per-channel lists separated by ``/`` between mean and std):

- ``data``: mean/std of the training split (what ``odekit train-ode`` records),
- ``none``: pixels in [0, 1] as they are (mean 0, std 1),
- ``MEAN,STD``: one mean and std for every channel, e.g. ``0.5,0.25``,
- ``M1,M2,M3/S1,S2,S3``: per channel, e.g. ``0.4914,0.4822,0.4465/0.247,0.243,0.261``.

Checkpoints with odekit metadata carry their normalisation and input shape; for others odekit
assumes ``none`` and the data's own shape, and says so once on stderr.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from odekit.errors import UsageError

NORMALIZE_HELP = "data | none | MEAN,STD | M1,M2,M3/S1,S2,S3"
LAYOUTS = ("auto", "nchw", "nhwc")
FOREIGN_DEFAULT_NORMALIZE = "none"


@dataclass(frozen=True)
class Normalization:
    """A parsed ``--normalize``: ``mode`` is data | none | given (then ``mean``/``std`` hold the values)."""

    mode: str
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in ("data", "none", "given"):
            raise UsageError(f"unknown normalisation mode '{self.mode}'", f"use {NORMALIZE_HELP}")
        if self.mode == "given":
            if not self.mean or len(self.mean) != len(self.std):
                raise UsageError("`normalize` needs as many means as standard deviations", f"use {NORMALIZE_HELP}")
            if any(s <= 0 for s in self.std):
                raise UsageError("`normalize` standard deviations must be positive", "e.g. `normalize` 0.5,0.25")

    def as_dict(self) -> dict[str, list[float]] | None:
        """The ``normalization`` argument of `odekit.io.datasets.load_dataset` (None: from the data)."""
        if self.mode == "data":
            return None
        if self.mode == "none":
            return {"mean": [0.0], "std": [1.0]}
        return {"mean": list(self.mean), "std": list(self.std)}


def parse_normalize(text: str) -> Normalization:
    value = text.strip().lower()
    if value in ("data", "none"):
        return Normalization(value)
    try:
        if "/" in value:
            means, stds = value.split("/", 1)
            mean = tuple(float(v) for v in means.split(","))
            std = tuple(float(v) for v in stds.split(","))
        else:
            parts = [float(v) for v in value.split(",")]
            if len(parts) != 2:
                raise ValueError(value)
            mean, std = (parts[0],), (parts[1],)
    except ValueError as exc:
        raise UsageError(f"cannot read `normalize` '{text}'", f"use {NORMALIZE_HELP}") from exc
    return Normalization("given", mean, std)


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``C,H,W`` (or ``CxHxW``, or ``D`` for flat inputs)."""
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise UsageError(f"cannot read input shape '{text}'", "write it as C,H,W (e.g. 3,32,32) or D")
    return shape


@dataclass(frozen=True)
class Preprocessing:
    """The data options of a command; None means 'not given' (the checkpoint or the defaults decide)."""

    normalize: Normalization | None = None
    input_shape: tuple[int, ...] | None = None
    layout: str = "auto"
    pixel_max: float | None = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise UsageError(f"unknown `layout` '{self.layout}'", "choose NCHW, NHWC or auto")
        if self.pixel_max is not None and self.pixel_max <= 0:
            raise UsageError("`pixel_max` must be positive", "1 for floats in [0, 1], 255 for 8-bit images")

    @classmethod
    def from_options(
        cls, normalize: str | None, input_shape: str | None, layout: str | None = None, pixel_max: float | None = None
    ) -> Preprocessing:
        return cls(
            normalize=parse_normalize(normalize) if normalize is not None else None,
            input_shape=parse_input_shape(input_shape) if input_shape is not None else None,
            layout=(layout or "auto").strip().lower(),
            pixel_max=pixel_max,
        )

    def npz_options(self) -> dict[str, Any]:
        return {"layout": self.layout, "pixel_max": self.pixel_max}


def describe_normalization(mean: list[float], std: list[float]) -> str:
    """``none`` or ``mean=[...] std=[...]`` for messages."""
    if all(m == 0.0 for m in mean) and all(s == 1.0 for s in std):
        return "none ([0, 1] pixels as they are)"
    fmt = lambda values: "[" + ", ".join(f"{v:.4g}" for v in values) + "]"  # noqa: E731
    return f"mean={fmt(mean)} std={fmt(std)}"
