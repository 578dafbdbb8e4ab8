"""`odekit reduce` as one library call: build the student, fine-tune it, compare it with the teacher."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from odekit.distributed import Distributed
from odekit.io.datasets import Dataset
from odekit.methods.comparison import LatencyProbe, StudentComparison, compare_student
from odekit.methods.evaluation import LatencyComparison
from odekit.methods.ron.build import build_student
from odekit.methods.ron.settings import RonResult, RonSettings
from odekit.methods.training import TrainHistory, TrainSettings, train_classifier
from odekit.progress import Progress

LATENCY_REPEATS = 30
LATENCY_PROBE = "batch"  # the one latency probe: a batch of the CLI's --latency-batch test inputs


@dataclass
class RonRun:
    """The built student (``build``), its fine-tuning history and its comparison with the teacher."""

    build: RonResult
    comparison: StudentComparison
    history: TrainHistory

    @property
    def student(self) -> nn.Module:
        return self.build.student

    @property
    def latency(self) -> LatencyComparison:
        """Teacher and student timed interleaved on the latency example."""
        return self.comparison.latency[LATENCY_PROBE]


def reduce_teacher(
    teacher: nn.Module,
    teacher_arch: str,
    teacher_args: dict[str, Any],
    input_shape: tuple[int, ...],
    data: Dataset,
    settings: RonSettings,
    train: TrainSettings,
    device: torch.device,
    latency_example: torch.Tensor,
    distill: bool = True,
    seed: int = 0,
    progress: Progress | None = None,
    dist: Distributed | None = None,
) -> RonRun:
    """Algorithm 1 on ``settings.samples`` training samples (seeded subset); the BatchNorms after
    the region recalibrated (``train.recalibrate_bn``); ``train.epochs`` of fine-tuning on the
    training split less its validation part (distilled from the teacher at ``train.beta``;
    structural zeros of the input maps kept), keeping the best epoch on validation (the untuned
    student included); then ``compare_student`` on the test split with latency timed on
    ``latency_example``. ``distill`` is kept for callers: distillation follows ``train.beta``."""
    teacher = teacher.to(device).eval()
    fit = data.train.subset(settings.samples, seed=seed)
    built = build_student(
        teacher, teacher_arch, teacher_args, input_shape, fit.x, settings, device, progress=progress, dist=dist
    )
    student = built.student.to(device).eval()
    history = train_classifier(
        student, data, train, device, teacher=teacher, progress=progress, dist=dist,
        bn_layers=student.changed_batchnorms(), grad_masks=student.structural_masks(),
    )  # fmt: skip
    before = history.epochs[0]["test_accuracy"]
    student.eval()
    comparison = compare_student(
        teacher, student, data.test, input_shape, device, dist, student_before=before,
        latency=[LatencyProbe(LATENCY_PROBE, latency_example, LATENCY_REPEATS)],
    )  # fmt: skip
    return RonRun(built, comparison, history)
