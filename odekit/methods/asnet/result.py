"""What an ASNet build returns: typed parts of the report (issue 12: no dicts read back by key)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from odekit.methods.asnet.analysis import LayerAnalysis
from odekit.methods.asnet.baselines import Baselines
from odekit.methods.comparison import StudentComparison, ratio_or_none
from odekit.methods.evaluation import ModelCost
from odekit.methods.pce import PCEFit
from odekit.methods.training import TrainHistory
from odekit.models.asnet import ASNet
from odekit.models.cut import Cut

FLOPS_CONVENTION = "2 x multiply-adds per sample (torch FlopCounterMode); PCE basis products not counted"


@dataclass(frozen=True)
class CutReport:
    """The cut layer, the rank used and what the gradient sketch says about it."""

    cut: Cut
    rank: int
    rank_rule: str
    degree: int
    n_basis: int
    eps: float
    active_neurons: int  # eq. 6.17 at eps
    active_neurons_eq612: int
    eps_at_rank: float
    sketch_size: int
    gradient_samples: int
    sketch_covariance_error_rel: float

    def to_dict(self) -> dict[str, Any]:
        fields = dict(self.__dict__)
        return {**fields.pop("cut").to_dict(), **fields}


@dataclass(frozen=True)
class SplitCosts:
    """Thesis table 6.2: pre-model, AS + PCE head, and the teacher post-model the head replaces."""

    pre_model: ModelCost
    as_pce: ModelCost
    teacher_post_model: ModelCost

    def to_dict(self) -> dict[str, Any]:
        pre, head, post = self.pre_model.to_dict(), self.as_pce.to_dict(), self.teacher_post_model.to_dict()
        return {
            "pre_model": pre,
            "as_pce": head,
            "teacher_post_model": post,
            "post_storage_reduction": ratio_or_none(post["storage_mb"], head["storage_mb"]),
            "post_flop_reduction": ratio_or_none(post["flops"], head["flops"]),
        }


@dataclass(frozen=True)
class FinetuneReport:
    epochs: int
    beta: float
    lr: float
    head_lr: float
    sparse: bool
    l1: float | None  # None unless sparse
    history: list[dict[str, float]]
    selection: dict[str, Any] = field(default_factory=dict)  # kept epoch, validation size, summary

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class SparseCost:
    """ASNet-s after its L1 proximal steps: non-zero weights, their float32 storage and FLOPs."""

    nonzero_params: int
    density: float
    storage_mb_nonzero: float
    flops_nonzero: int

    @classmethod
    def of(cls, cost: dict[str, float | int]) -> SparseCost:
        """From ``head.sparse_cost``'s fields."""
        return cls(int(cost["nonzero_params"]), float(cost["density"]), float(cost["storage_mb_nonzero"]),
                   int(cost["flops_nonzero"]))  # fmt: skip

    def to_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


@dataclass
class ASNetResult:
    """The ASNet, its checkpoint args and everything measured while building it."""

    model: ASNet
    args: dict[str, Any]
    cut: CutReport
    comparison: StudentComparison  # teacher vs ASNet on the test split
    split: SplitCosts
    pce: PCEFit
    baselines: Baselines
    finetune: FinetuneReport
    cut_analysis: LayerAnalysis
    warnings: list[str]
    history: TrainHistory | None
    sparse_cost: SparseCost | None = None  # ASNet-s only
    registered: bool = True  # load_model rebuilds it from args; otherwise write it as a .pt2 program

    def to_dict(self) -> dict[str, Any]:
        """The report.json fields of `odekit asnet --cut`."""
        compared = self.comparison.to_dict("asnet")
        if self.sparse_cost is not None:  # the non-zero counts sit beside the dense cost
            entry = compared["asnet"]
            tail = {key: entry.pop(key) for key in ("accuracy_n", "accuracy_ci95")}
            entry.update(**self.sparse_cost.to_dict(), **tail)
        head = ("teacher", "asnet", "storage_reduction", "flop_reduction", "accuracy_drop_points")
        return {
            **{key: compared.pop(key) for key in head},
            "cut": self.cut.to_dict(),
            "split": self.split.to_dict(),
            "pce": self.pce.to_dict(),
            "baselines": self.baselines.to_dict(),
            "latency_ms": compared.pop("latency_ms"),
            "finetune": self.finetune.to_dict(),
            "flops_convention": FLOPS_CONVENTION,
            "warnings": list(self.warnings),
            **compared,  # agreement, mean_kl and (when timed) latency
        }

    @property
    def results(self) -> dict[str, Any]:
        """``to_dict()``: the report's fields, for code that reads them by key."""
        return self.to_dict()
