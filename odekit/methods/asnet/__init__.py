"""Active-subspace analysis and ASNet compression (thesis ch. 6.2-6.3, Algorithms 2-3).

For a cut at compute layer l the teacher splits into pre-model (layers 1..l with the
normalisation/activation/pooling that follows layer l) and post-model. c_l(x) = CE(post(x), label)
is differentiated per sample with respect to the pre-model output x (model in eval mode,
log-softmax loss); every gradient enters a frequent-directions sketch (exact shrink), whose
right singular vectors V_1 span the active subspace. ASNet = pre-model + AS layer (V_1^T,
scaled so that z is standardised) + PCE layer (orthonormal Hermite basis, least squares on the
teacher's logits), optionally fine-tuned with distillation and L1 proximal steps (ASNet-s).
"""

from odekit.methods.asnet.analysis import LayerAnalysis, analyze_layers
from odekit.methods.asnet.baselines import Baselines
from odekit.methods.asnet.build import build_asnet_from_teacher, is_registered_teacher
from odekit.methods.asnet.head import (
    Head,
    Projection,
    _l1_prox,
    fit_head,
    max_rank_for_samples,
    project,
    sparse_cost,
)
from odekit.methods.asnet.rank_choice import RankChoice, choose_rank
from odekit.methods.asnet.result import (
    ASNetResult,
    CutReport,
    FinetuneReport,
    SparseCost,
    SplitCosts,
)
from odekit.methods.asnet.settings import (
    DEFAULT_SKETCH,
    LOGREG_MAX_SAMPLES,
    RANK_KEYWORDS,
    THESIS_RANK,
    ASNetSettings,
    SubspaceSettings,
    default_sketch_size,
    parse_rank,
)
from odekit.methods.asnet.subspace import ActiveSubspace, active_subspace, stream_features
from odekit.models.asnet import ASNet, build_asnet
from odekit.models.cut import ChainModel, Cut, CutModel, GraphModel, cut_model

__all__ = [
    "DEFAULT_SKETCH",
    "LOGREG_MAX_SAMPLES",
    "RANK_KEYWORDS",
    "THESIS_RANK",
    "ASNet",
    "ASNetResult",
    "ASNetSettings",
    "ActiveSubspace",
    "Baselines",
    "ChainModel",
    "Cut",
    "CutModel",
    "CutReport",
    "FinetuneReport",
    "GraphModel",
    "Head",
    "LayerAnalysis",
    "Projection",
    "RankChoice",
    "SparseCost",
    "SplitCosts",
    "SubspaceSettings",
    "_l1_prox",
    "active_subspace",
    "analyze_layers",
    "build_asnet",
    "build_asnet_from_teacher",
    "choose_rank",
    "cut_model",
    "default_sketch_size",
    "fit_head",
    "is_registered_teacher",
    "max_rank_for_samples",
    "parse_rank",
    "project",
    "sparse_cost",
    "stream_features",
]
