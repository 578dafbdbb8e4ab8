"""Teacher-vs-student comparison shared by `reduce` and `asnet` (issue 12).

One measurement of a compressed model against the model it came from: top-1 accuracy of both
with its sample count and Wilson 95% interval, top-1 agreement and mean KL(teacher || student),
parameters/FLOPs/storage and their ratios, and latency timed with the two models interleaved.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from odekit.distributed import Distributed
from odekit.errors import UsageError
from odekit.io.datasets import Split
from odekit.methods.evaluation import (
    LatencyComparison,
    ModelCost,
    accuracy,
    agreement,
    compare_latency,
    model_cost,
)
from odekit.stats import accuracy_fields

LAYOUTS = ("reduce", "asnet")


class LatencyProbe(NamedTuple):
    """One latency measurement: a label for the report, the batch timed, timed repetitions."""

    label: str
    example: torch.Tensor
    repeats: int


@dataclass(frozen=True)
class ScoredModel:
    """A model's test accuracy (on ``n`` samples) and its cost."""

    accuracy: float
    n: int
    cost: ModelCost

    @property
    def fields(self) -> dict[str, object]:
        """accuracy_n and accuracy_ci95 (Wilson 95%)."""
        return accuracy_fields(self.accuracy, self.n)


def ratio_or_none(a: float, b: float) -> float | None:
    """a / b, or None when b is not positive (a cost that rounds to zero)."""
    return a / b if b > 0 else None


@dataclass(frozen=True)
class StudentComparison:
    """Teacher and student measured on the same test split (and the same batches for latency)."""

    teacher: ScoredModel
    student: ScoredModel
    agreement: float  # fraction of equal top-1 predictions
    mean_kl: float  # nats, KL(teacher || student) averaged over the test split
    compared: int  # test samples agreement and KL were measured on
    student_before: float | None = None  # the student's accuracy before fine-tuning
    latency: dict[str, LatencyComparison] = field(default_factory=dict)

    @property
    def accuracy_drop(self) -> float:
        return self.teacher.accuracy - self.student.accuracy

    @property
    def flop_reduction(self) -> float:
        return self.teacher.cost.flops / max(self.student.cost.flops, 1)

    @property
    def param_reduction(self) -> float:
        return self.teacher.cost.params / max(self.student.cost.params, 1)

    @property
    def storage_reduction(self) -> float | None:
        """Teacher over student storage in MB as reported (rounded to 4 digits, as asnet reports it)."""
        return ratio_or_none(self.teacher.cost.to_dict()["storage_mb"], self.student.cost.to_dict()["storage_mb"])

    def latency_ms(self, label: str) -> tuple[float, float]:
        """Median teacher and student milliseconds of the probe ``label``."""
        timed = self.latency[label]
        return statistics.median(timed.teacher_ms), statistics.median(timed.student_ms)

    def to_dict(self, layout: str = "reduce") -> dict[str, Any]:
        """The report.json fields of this comparison as `odekit reduce` (``layout="reduce"``: one
        latency probe, unrounded storage) or `odekit asnet` (``"asnet"``: the student under the key
        "asnet", probes by label, costs as ``ModelCost.to_dict``) writes them."""
        if layout == "reduce":
            return self._reduce_dict()
        if layout == "asnet":
            return self._asnet_dict()
        raise UsageError(f"unknown comparison layout '{layout}'", f"use one of: {', '.join(LAYOUTS)}")

    def _reduce_dict(self) -> dict[str, Any]:
        def entry(scored: ScoredModel) -> dict[str, Any]:
            cost = scored.cost
            return {"accuracy": scored.accuracy, **scored.fields, "flops": cost.flops, "params": cost.params,
                    "storage_mb": cost.storage_mb}  # fmt: skip

        teacher, student = entry(self.teacher), entry(self.student)
        if self.student_before is not None:
            student["accuracy_before_finetune"] = self.student_before
        out: dict[str, Any] = {"teacher": teacher, "student": student, "flop_reduction": self.flop_reduction,
                               "param_reduction": self.param_reduction}  # fmt: skip
        if self.latency:
            label, timed = next(iter(self.latency.items()))
            teacher["latency_ms"], student["latency_ms"] = self.latency_ms(label)
            out["latency_speedup"] = timed.speedup
        out.update(agreement=self.agreement, mean_kl=self.mean_kl)
        if self.latency:
            out["latency"] = timed.to_dict()
        drop = self.accuracy_drop
        out.update(accuracy_drop=drop, accuracy_drop_points=100.0 * drop)
        return out

    def _asnet_dict(self) -> dict[str, Any]:
        teacher = {"accuracy": self.teacher.accuracy, **self.teacher.cost.to_dict(), **self.teacher.fields}
        student: dict[str, Any] = {"accuracy": self.student.accuracy}
        if self.student_before is not None:
            student["accuracy_before_finetune"] = self.student_before
        student.update(**self.student.cost.to_dict(), **self.student.fields)
        latency_ms: dict[str, float] = {}
        for label in self.latency:
            latency_ms[f"teacher_ms_{label}"], latency_ms[f"asnet_ms_{label}"] = self.latency_ms(label)
        out: dict[str, Any] = {
            "teacher": teacher,
            "asnet": student,
            "storage_reduction": self.storage_reduction,
            "flop_reduction": ratio_or_none(self.teacher.cost.flops, self.student.cost.flops),
            "accuracy_drop_points": 100 * self.accuracy_drop,
            "latency_ms": latency_ms,
            "agreement": self.agreement,
            "mean_kl": self.mean_kl,
        }
        if self.latency:
            out["latency"] = {label: timed.to_dict() for label, timed in self.latency.items()}
        return out


def compare_student(
    teacher: nn.Module,
    student: nn.Module,
    test: Split,
    input_shape: tuple[int, ...] | list[int],
    device: torch.device,
    dist: Distributed | None = None,
    *,
    student_before: float | None = None,
    latency: tuple[LatencyProbe, ...] | list[LatencyProbe] = (),
    warmup: int = 3,
    batch_size: int = 512,
) -> StudentComparison:
    """Measure ``student`` against ``teacher`` on ``test``: accuracies (n = the whole split),
    agreement and mean KL, costs per sample of ``input_shape``, and each latency probe timed with
    teacher and student alternated. ``dist`` (several ranks): accuracy and agreement are
    sharded and their counts summed; latency is timed on every rank's own device."""
    teacher.eval()
    student.eval()
    n = len(test)
    scored = [
        ScoredModel(accuracy(model, test, batch_size, device=device, dist=dist), n, model_cost(model, input_shape))
        for model in (teacher, student)
    ]
    fidelity = agreement(teacher, student, test, batch_size, device=device, dist=dist)
    timed = {
        probe.label: compare_latency(teacher, student, probe.example, device, warmup=warmup, repeats=probe.repeats)
        for probe in latency
    }
    return StudentComparison(
        scored[0], scored[1], fidelity["agreement"], fidelity["mean_kl"], int(fidelity["samples"]),
        student_before, timed,
    )  # fmt: skip
