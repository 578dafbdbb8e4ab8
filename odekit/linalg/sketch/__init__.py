"""Streaming matrix sketches: frequent directions (deterministic) and count sketch (hashing).

Both summarise a tall matrix ``A`` (N x D) that arrives as row batches, holding only
O(sketch_size x D) numbers, and both are mergeable across shards or devices.

Frequent directions (Liberty 2013; Ghashami, Liberty, Phillips, Woodruff 2016) keeps
``B`` (ell x D) with

    0 <= x^T (A^T A - B^T B) x <= delta   for every unit x,
    delta <= ||A - A_k||_F^2 / (ell - k)  for every k < ell,

where ``delta`` is the sum of all shrinkage steps and is tracked exactly, so the sketch
certifies its own covariance error (``covariance_error_bound``). Every shrink uses an exact
SVD of the (at most 2 ell x D) buffer, and every row, including the first batch, enters it.

Modules: `frequent_directions`, `count_sketch`, `streaming_svd` (top-R SVD with error bounds),
`across_ranks` (merging the ranks' sketches), `dense` (shared helpers).
"""

from odekit.linalg.sketch.across_ranks import SketchMerge, merge_across_ranks
from odekit.linalg.sketch.count_sketch import CountSketch
from odekit.linalg.sketch.frequent_directions import FrequentDirections
from odekit.linalg.sketch.streaming_svd import StreamingSVD, SVDResult, subspace_sin_theta

__all__ = [
    "CountSketch",
    "FrequentDirections",
    "SVDResult",
    "SketchMerge",
    "StreamingSVD",
    "merge_across_ranks",
    "subspace_sin_theta",
]
