"""Distances that measure attack budgets: l2 and linf in [0, 1] pixel units, and ADef's T-norm
(largest displacement of a deformation field, in pixels). One object per distance replaces norm
strings and per-method special cases in reports, plots and budget checks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from odekit.errors import UsageError
from odekit.methods.attacks.space import lp_norms, parse_norm, project


@dataclass(frozen=True)
class Distance:
    """``key`` is what reports call the norm ("2", "inf", "T")."""

    key: str
    label: str  # for titles and axes: "l2", "linf", "T-norm"
    unit: str  # what a budget counts

    def norms(self, v: Tensor) -> Tensor:
        """Per-sample sizes (B,) of a batch (B, ...); for the T-norm a batch of fields (B, 2, H, W)."""
        if self.key == "T":
            return v.pow(2).sum(1).sqrt().flatten(1).amax(1)
        return lp_norms(v, self.key)

    def project(self, v: Tensor, radius: float) -> Tensor:
        """Onto the ball of ``radius`` (exact for all three: the T-norm ball caps every pixel's
        displacement length)."""
        if self.key == "T":
            length = v.pow(2).sum(1, keepdim=True).sqrt().clamp_min(1e-12)
            return v * (radius / length).clamp(max=1.0)
        return project(v, self.key, radius)

    def largest(self, input_shape: Sequence[int]) -> float:
        """The largest budget that still means something for inputs of ``input_shape`` in the
        [0, 1] box: its diagonal (l2), its side (linf), the image diagonal in pixels (T-norm)."""
        if self.key == "inf":
            return 1.0
        if self.key == "T":
            return math.hypot(*input_shape[-2:]) if len(input_shape) >= 2 else 1.0
        return math.sqrt(math.prod(input_shape))

    def check_budgets(self, budgets: Sequence[float], input_shape: Sequence[int], what: str) -> None:
        """Every budget positive, finite and no larger than `largest` (`UsageError` otherwise)."""
        top = self.largest(input_shape)
        for b in budgets:
            if not (b > 0 and math.isfinite(b)):
                raise UsageError(f"{what} values must be positive and finite, got {b:g}",
                                 f"budgets are {self.unit}")
            if b > top * (1 + 1e-9):
                raise UsageError(
                    f"{what} {b:.4g} is larger than any {self.label} perturbation of a "
                    f"{tuple(input_shape)} input can be ({top:.4g})",
                    f"budgets are {self.unit}; give values up to {top:.4g}",
                )


L2 = Distance("2", "l2", "[0,1] pixel units")
LINF = Distance("inf", "linf", "[0,1] pixel units")
TNORM = Distance("T", "T-norm", "displacements in pixels (T-norm)")


def distance_for(norm: str) -> Distance:
    """L2 or LINF from '2', 'l2', 'inf', 'linf' (`UsageError` otherwise)."""
    return L2 if parse_norm(norm) == "2" else LINF
