"""`odekit reduce` as one library call: build the student, fine-tune it, compare it with the teacher."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from odekit.distributed import Distributed
from odekit.errors import LayerSelectionError, OdekitError, UnsupportedModelError
from odekit.io.datasets import Dataset
from odekit.methods.comparison import LatencyProbe, StudentComparison, compare_student
from odekit.methods.evaluation import LatencyComparison, model_cost
from odekit.methods.ron.build import build_student
from odekit.methods.ron.channel import ChannelResult
from odekit.methods.ron.channel_build import build_channel_student, holdout
from odekit.methods.ron.memory import allocation_guard
from odekit.methods.ron.settings import RonResult, RonSettings
from odekit.methods.training import TrainHistory, TrainSettings, train_classifier
from odekit.progress import Progress

LATENCY_REPEATS = 30
LATENCY_PROBE = "batch"  # the one latency probe: a batch of the CLI's --latency-batch test inputs


@dataclass
class RonRun:
    """The built student (``build``), its fine-tuning history and its comparison with the teacher."""

    build: RonResult | ChannelResult
    comparison: StudentComparison
    history: TrainHistory
    mode: str = "region"  # the mode that built the student ("region" or "channel")

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
    """Build the student (``settings.mode``: the thesis' region RON, the channel mode, or auto:
    the cheaper of the two over ``settings.layers``, channel when no range is given) on
    ``settings.samples`` training samples (seeded subset) and refuse one bigger than the teacher.
    Then ``train_classifier``: BatchNorms after a region recalibrated (``train.recalibrate_bn``),
    ``train.epochs`` of fine-tuning on the training split less its validation part (distilled
    from the teacher at ``train.beta``; structural zeros of region input maps kept), keeping the
    best epoch on validation (the untuned student included); then ``compare_student`` on the
    test split with latency timed on ``latency_example``. ``distill`` is kept for callers:
    distillation follows ``train.beta``."""
    teacher = teacher.to(device).eval()
    hint = "use `mode` channel, lower `fit_samples`, `sketch_size` or `batch_size`"
    with allocation_guard("building the student", hint):
        built, mode = _build(
            teacher,
            teacher_arch,
            teacher_args,
            input_shape,
            data,
            settings,
            device,
            seed,
            progress,
            dist,
        )
    refuse_bigger(teacher, built.student, input_shape, mode)
    student = built.student.to(device).eval()
    # a channel student is a plain module whose BatchNorms the build already recalibrated
    ron = built.student if isinstance(built, RonResult) else None
    history = train_classifier(
        student, data, train, device, teacher=teacher, progress=progress, dist=dist,
        bn_layers=ron.changed_batchnorms() if ron is not None else None,
        grad_masks=ron.structural_masks() if ron is not None else None,
    )  # fmt: skip
    before = history.epochs[0]["test_accuracy"]
    student.eval()
    comparison = compare_student(
        teacher, student, data.test, input_shape, device, dist, student_before=before,
        latency=[LatencyProbe(LATENCY_PROBE, latency_example, LATENCY_REPEATS)],
    )  # fmt: skip
    return RonRun(built, comparison, history, mode)


def _build(
    teacher: nn.Module,
    teacher_arch: str,
    teacher_args: dict[str, Any],
    input_shape: tuple[int, ...],
    data: Dataset,
    settings: RonSettings,
    device: torch.device,
    seed: int,
    progress: Progress | None,
    dist: Distributed | None,
) -> tuple[RonResult | ChannelResult, str]:
    """The student of ``settings.mode`` (auto: both over the range, the one with fewer FLOPs)."""
    region: RonResult | None = None
    if settings.mode in ("region", "auto") and settings.layers is not None:
        fit = data.train.subset(settings.samples, seed=seed)
        try:
            region = build_student(
                teacher,
                teacher_arch,
                teacher_args,
                input_shape,
                fit.x,
                settings,
                device,
                progress=progress,
                dist=dist,
            )
        except (
            UnsupportedModelError,
            LayerSelectionError,
        ):  # the range is not a region: auto goes channel
            if settings.mode == "region":
                raise
    per_state_ranks = (
        len(str(settings.rank).split(",")) > 1
    )  # a rank per reduced activation: region only
    if settings.mode == "region" or (region is not None and per_state_ranks):
        assert region is not None
        return region, "region"
    fit_split, val_split = holdout(data.train, settings, seed)
    try:
        channel = build_channel_student(
            teacher, input_shape, fit_split, val_split, settings, device, progress, dist
        )
    except OdekitError:
        if region is None:
            raise
        return region, "region"
    if region is not None:
        r, c, t = (model_cost(m, input_shape) for m in (region.student, channel.student, teacher))
        if r.flops < c.flops and r.params <= t.params:
            return region, "region"
    return channel, "channel"


def refuse_bigger(
    teacher: nn.Module, student: nn.Module, input_shape: tuple[int, ...], mode: str
) -> None:
    """Never write a student with more FLOPs or parameters than its teacher (issue 26)."""
    t, s = model_cost(teacher, input_shape), model_cost(student, input_shape)
    if s.flops <= t.flops and s.params <= t.params:
        return
    raise LayerSelectionError(
        f"the {mode} student would be bigger than the teacher: {s.flops / 1e6:.2f} MFLOPs and "
        f"{s.params / 1e6:.3f} M parameters against {t.flops / 1e6:.2f} MFLOPs and {t.params / 1e6:.3f} M",
        "try `mode` channel, a range of later, spatially smaller layers, or `target_flops` 0.5",
    )
