"""The attack space: [0, 1] pixels, whatever normalisation the model applies.

Attacks work on a `PixelModel` (the checkpoint's model behind its own normalisation), so bounds
are the box [0, 1], budgets are in pixel units (RobustBench: linf 8/255, l2 0.5) and the same
code serves every data set. `to_model_units` converts a pixel-space perturbation back.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from odekit.errors import DataError, UnsupportedModelError, UsageError
from odekit.io.datasets import Dataset

NORMS = ("2", "inf")
_NORM_ALIASES = {
    "2": "2",
    "l2": "2",
    "inf": "inf",
    "linf": "inf",
    "l_inf": "inf",
    "infinity": "inf",
}
BOUNDS_TOL = 1e-4  # round-off of normalise/denormalise; anything larger is a real violation


def parse_norm(text: str | int | float) -> str:
    """'2' | 'inf' from '2', 'l2', 'inf', 'linf' (case-insensitive)."""
    key = str(text).strip().lower()
    key = "2" if key in ("2.0",) else key
    if key not in _NORM_ALIASES:
        raise UsageError(f"unknown norm '{text}'", f"choose one of: {', '.join(NORMS)}")
    return _NORM_ALIASES[key]


def lp_norms(v: Tensor, norm: str) -> Tensor:
    """Per-sample norms (B,) of a batch (B, ...)."""
    flat = v.reshape(v.shape[0], -1)
    return flat.norm(p=2, dim=1) if norm == "2" else flat.abs().amax(dim=1)


def lp_norm(v: Tensor, norm: str) -> float:
    """Norm of one perturbation (any shape)."""
    return float(lp_norms(v.reshape(1, -1), norm)[0])


def project(v: Tensor, norm: str, radius: float) -> Tensor:
    """Project every sample of a batch (B, ...) onto the ``norm`` ball of ``radius``."""
    if norm == "inf":
        return v.clamp(-radius, radius)
    n = lp_norms(v, "2").clamp_min(1e-12)
    factor = (radius / n).clamp(max=1.0)
    return v * factor.view(-1, *([1] * (v.dim() - 1)))


def scale_to(v: Tensor, norm: str, radius: float) -> Tensor:
    """Rescale every sample of a batch (B, ...) to norm exactly ``radius``."""
    n = lp_norms(v, norm).clamp_min(1e-12)
    return v * (radius / n).view(-1, *([1] * (v.dim() - 1)))


def apply_perturbation(x: Tensor, v: Tensor) -> Tensor:
    """x + v kept inside the valid pixel box [0, 1] (the clipping the reference code forgot)."""
    return (x + v).clamp(0.0, 1.0)


class PixelModel(nn.Module):
    """``model`` fed with [0, 1] pixels: normalises inside, so attacks see a plain box."""

    mean: Tensor
    std: Tensor

    def __init__(self, model: nn.Module, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("std", std.detach().clone().float())

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x - self.mean) / self.std)


def pixel_model(model: nn.Module, data: Dataset) -> PixelModel:
    """Wrap ``model`` with the normalisation of ``data`` (the model's own), on the model's device."""
    lo, _ = data.bounds
    std = data.pixel_scale
    mean = -lo * std
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return PixelModel(model, mean, std).to(device).eval()


def to_pixels(x: Tensor, data: Dataset, what: str = "the input") -> Tensor:
    """Model-input units -> [0, 1] pixels; data outside the valid box is a `DataError`."""
    lo, _ = data.bounds
    x_pix = (x - lo) * data.pixel_scale
    low, high = float(x_pix.min()), float(x_pix.max())
    if low < -BOUNDS_TOL or high > 1.0 + BOUNDS_TOL:
        raise DataError(
            f"{what} violates the data bounds: pixel values span [{low:.4g}, {high:.4g}], outside [0, 1]",
            "give raw images in [0, 1] (or uint8); odekit normalises them itself",
        )
    return x_pix.clamp(0.0, 1.0)


BUDGET_UNITS = ("pixel", "model")


def budget_scale(data_sets: list[Dataset]) -> float:
    """Pixel units per model-input unit of a budget norm: the channel std, which must be one
    number for every channel (and every model), since otherwise a model-unit l2/linf ball is no
    ball in pixels."""
    stds = {round(float(s), 12) for d in data_sets for s in d.pixel_scale.flatten()}
    if len(stds) != 1:
        raise UsageError(
            f"budgets in model units need one normalisation std for all channels and models, "
            f"got {sorted(stds)}",
            "give the budgets in [0, 1] pixel units (`units` pixel)",
        )
    return stds.pop()


def to_model_units(v: Tensor, data: Dataset) -> Tensor:
    """A pixel-space perturbation expressed in model-input units (divided by the channel std)."""
    return v / data.pixel_scale.to(v.device)


def check_in_box(x: Tensor, what: str = "the input") -> None:
    """Raise `DataError` unless every value lies in [0, 1] (up to round-off)."""
    low, high = float(x.min()), float(x.max())
    if low < -BOUNDS_TOL or high > 1.0 + BOUNDS_TOL:
        raise DataError(
            f"{what} violates the data bounds: values span [{low:.4g}, {high:.4g}], outside [0, 1]",
            "attacks take pixels in [0, 1]",
        )


def check_differentiable(model: nn.Module, x: Tensor) -> None:
    """Raise `UnsupportedModelError` unless logits (B, K) depend differentiably on the input."""
    probe = x[:2].detach().clone().requires_grad_(True)
    hint = "gradient attacks need a model whose logits are a differentiable function of the input"
    try:
        with torch.enable_grad():
            out = model(probe)
    except RuntimeError as exc:
        raise UnsupportedModelError(
            f"the model failed on the data ({str(exc).splitlines()[0][:160]})", hint
        ) from exc
    if not isinstance(out, Tensor) or out.dim() != 2 or not out.is_floating_point():
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise UnsupportedModelError(
            f"the model must return float logits of shape (batch, classes), got {shape}", hint
        )
    if not out.requires_grad:
        raise UnsupportedModelError(
            "the model's output is not differentiable with respect to its input", hint
        )
    (grad,) = torch.autograd.grad(out.sum(), probe, allow_unused=True)
    if grad is None or not bool(torch.isfinite(grad).all()) or float(grad.abs().max()) == 0.0:
        raise UnsupportedModelError(
            "the model's output has no usable gradient with respect to its input (zero, NaN or detached)",
            hint,
        )
