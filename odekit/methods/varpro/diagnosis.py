"""Is Gauss-Newton a good model of Phi_red here? Predicted vs actual decrease per outer iteration.

Every GNvpro outer iteration records the decrease its quadratic model predicted for the step
(``predicted_decrease``), the actual decrease of Phi at the trial point (``actual_decrease``)
and Phi before the step. Two numbers summarise a run:

* the median ratio actual / predicted: near 1 the model predicts Phi well; far from 1 (below
  0.25 or above 4) the model is wrong over the steps taken (strong nonlinearity);
* the median predicted decrease as a fraction of Phi: a Gauss-Newton model of least squares
  promises at most Phi minus what the linearised network cannot fit. A model that keeps
  promising only a small fraction (< 0.1) while the step is not cut by the radius sees a
  large residual: the network fits the data only coarsely, the regime where Gauss-Newton
  drops the residual-curvature term and L-BFGS or Adam can do better per work unit.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

RATIO_RANGE = (0.25, 4.0)
SMALL_FRACTION = 0.1


@dataclass(frozen=True)
class GaussNewtonDiagnosis:
    steps: int
    median_ratio: float
    median_predicted_fraction: float
    median_interior_fraction: float | None  # over steps shorter than the radius (not cut by it)
    verdict: str  # "good" | "mispredicts" | "large-residual" | "no-steps"
    line: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def diagnose(history: Sequence[dict[str, float]]) -> GaussNewtonDiagnosis:
    """Summarise the history rows of a GNvpro run (rows without a prediction are skipped)."""
    rows = [h for h in history if h.get("predicted_decrease", 0.0) > 0 and h.get("phi_before", 0.0) > 0]
    if not rows:
        return GaussNewtonDiagnosis(0, float("nan"), float("nan"), None, "no-steps", "Gauss-Newton diagnosis: no outer iterations")
    ratio = statistics.median(h["actual_decrease"] / h["predicted_decrease"] for h in rows)
    fraction = statistics.median(h["predicted_decrease"] / h["phi_before"] for h in rows)
    interior = [h["predicted_decrease"] / h["phi_before"] for h in rows if h.get("interior", 0.0) > 0]
    inner = statistics.median(interior) if interior else None
    head = (f"Gauss-Newton diagnosis ({len(rows)} steps): median actual/predicted decrease of Phi {ratio:.2f}, "
            f"median predicted decrease {100 * fraction:.1f}% of Phi")  # fmt: skip
    if inner is not None:
        head += f" ({100 * inner:.1f}% on {len(interior)} steps inside the radius)"
    if not RATIO_RANGE[0] <= ratio <= RATIO_RANGE[1]:
        return GaussNewtonDiagnosis(len(rows), ratio, fraction, inner, "mispredicts",
                                    head + ": a poor model here, it mispredicts Phi over the steps taken")  # fmt: skip
    if (inner if inner is not None else fraction) < SMALL_FRACTION:
        return GaussNewtonDiagnosis(len(rows), ratio, fraction, inner, "large-residual",
                                    head + ": a poor model here, it promises little per step (large residual; try lbfgs or adam)")  # fmt: skip
    return GaussNewtonDiagnosis(len(rows), ratio, fraction, inner, "good", head + ": Gauss-Newton models Phi well here")
