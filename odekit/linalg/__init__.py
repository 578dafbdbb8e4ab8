"""Sketches (frequent directions, count sketch), streaming SVD, maxvol, rank selection and
active-subspace helpers. Pure torch, device-agnostic, no printing."""

from odekit.linalg.active import active_count, dominant_direction
from odekit.linalg.maxvol import maxvol, maxvol_coefficients, rect_maxvol, rect_maxvol_error_factor
from odekit.linalg.rank import (
    RANK_RULES,
    RankContext,
    RankSpec,
    energy_rank,
    parse_rank_spec,
    select_rank,
    vbmf_rank,
)
from odekit.linalg.sketch import (
    CountSketch,
    FrequentDirections,
    StreamingSVD,
    SVDResult,
    subspace_sin_theta,
)

__all__ = [
    "RANK_RULES",
    "CountSketch",
    "FrequentDirections",
    "RankContext",
    "RankSpec",
    "SVDResult",
    "StreamingSVD",
    "active_count",
    "dominant_direction",
    "energy_rank",
    "maxvol",
    "maxvol_coefficients",
    "parse_rank_spec",
    "rect_maxvol",
    "rect_maxvol_error_factor",
    "select_rank",
    "subspace_sin_theta",
    "vbmf_rank",
]
