"""Is Gauss-Newton a good model of Phi_red here? Predicted vs actual decrease per outer iteration.

Every GNvpro outer iteration records the decrease its quadratic model predicted for the step
(``predicted_decrease``), the actual decrease of Phi at the trial point (``actual_decrease``),
their ``ratio`` and Phi before the step. The summary:

* the median ratio actual / predicted, over all steps and over the second half of the run:
  near 1 the model predicts Phi well; outside [0.5, 2] it does not over the steps taken
  (strong nonlinearity, or near a large-residual minimum, where the residual-curvature term
  that Gauss-Newton drops dominates);
* the final relative training residual ||X - C|| / ||C|| (least squares): above 0.1 the
  network fits the data only coarsely, the large-residual regime in which Gauss-Newton's
  model of the curvature is incomplete and L-BFGS or Adam can do better per work unit;
* the median predicted decrease as a fraction of Phi (information: how much one step of r
  products promises; truncated Krylov steps keep it small even when the model is good).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

RATIO_RANGE = (0.5, 2.0)
LARGE_RESIDUAL = 0.1


@dataclass(frozen=True)
class GaussNewtonDiagnosis:
    steps: int
    median_ratio: float
    late_median_ratio: float  # over the second half of the steps
    median_predicted_fraction: float
    train_rel_residual: float | None  # the last row's ||X - C|| / ||C|| on the training set (least squares)
    verdict: str  # "good" | "mispredicts" | "large-residual" | "no-steps"
    line: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def diagnose(history: Sequence[dict[str, float]]) -> GaussNewtonDiagnosis:
    """Summarise the history rows of a GNvpro run (rows without a prediction are skipped)."""
    rows = [h for h in history if h.get("predicted_decrease", 0.0) > 0 and h.get("phi_before", 0.0) > 0]
    residual = history[-1].get("train_rel_error") if history else None
    if not rows:
        nan = float("nan")
        return GaussNewtonDiagnosis(0, nan, nan, nan, residual, "no-steps", "Gauss-Newton diagnosis: no outer iterations")
    ratios = [h["actual_decrease"] / h["predicted_decrease"] for h in rows]
    ratio, late = statistics.median(ratios), statistics.median(ratios[len(ratios) // 2 :])
    fraction = statistics.median(h["predicted_decrease"] / h["phi_before"] for h in rows)
    head = (f"Gauss-Newton diagnosis ({len(rows)} steps): median actual/predicted decrease of Phi {ratio:.2f} "
            f"(second half {late:.2f}), a step promises {100 * fraction:.1f}% of Phi")  # fmt: skip
    if residual is not None and math.isfinite(residual):
        head += f", training residual {100 * residual:.1f}%"

    def result(verdict: str, tail: str) -> GaussNewtonDiagnosis:
        return GaussNewtonDiagnosis(len(rows), ratio, late, fraction, residual, verdict, f"{head}: {tail}")

    if not all(RATIO_RANGE[0] <= r <= RATIO_RANGE[1] for r in (ratio, late)):
        return result("mispredicts", "a poor model here, it mispredicts the change of Phi (try lbfgs or adam)")
    if residual is not None and residual > LARGE_RESIDUAL:
        return result("large-residual", "a poor model here, a large-residual fit where Gauss-Newton drops curvature (try lbfgs or adam)")
    return result("good", "Gauss-Newton models Phi well here")
