"""The channel mode end to end: plan, memory check, budget, reduction, accuracy guard."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch
from torch import nn

from odekit.distributed import Distributed, shard_indices
from odekit.io.datasets import Split
from odekit.methods.evaluation import accuracy
from odekit.methods.ron.channel import (
    ChannelPlan,
    ChannelResult,
    changed_modules,
    plan_channels,
    reduce_channels,
)
from odekit.methods.ron.channel_budget import (
    Allocation,
    CostModel,
    Sensitivity,
    allocate,
    cost_model,
    mean_kl,
    measure_sensitivity,
    uniform_allocation,
)
from odekit.methods.ron.channel_ops import PrefixRunner, rank_block
from odekit.methods.ron.memory import available_bytes, check_memory
from odekit.methods.ron.settings import RonSettings
from odekit.progress import Progress

CHANNEL_FIT_SAMPLES = (
    512  # default fitting images of the channel mode (the C x C moments converge fast)
)
VAL_FRACTION = 0.1
VAL_LIMITS = (64, 512)
LIVE_BATCH_BYTES = 2**30  # activations of one streamed batch (224 x 224 ResNet-50: 41 images)
RESUME_SHARE = 0.5  # resume at cuts while their values take under half the free memory
MAX_DROP_BUILDS = 5  # students built while bisecting the greedy path for --max-drop


def holdout(train: Split, settings: RonSettings, seed: int) -> tuple[Split, Split]:
    """A validation split held out from the training data (seeded) and the fitting samples."""
    n = len(train)
    n_val = (
        min(VAL_LIMITS[1], max(VAL_LIMITS[0], round(VAL_FRACTION * n)))
        if n > 2 * VAL_LIMITS[0]
        else n // 4
    )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    val = Split(train.x[order[:n_val]], train.y[order[:n_val]])
    rest = Split(train.x[order[n_val:]], train.y[order[n_val:]])
    return rest.subset(settings.samples or CHANNEL_FIT_SAMPLES, seed=seed), val


def estimate_bytes(plan: ChannelPlan, settings: RonSettings, samples: int) -> float:
    """Peak of the channel mode: three C x C float64 moments per read tensor, the live
    activations of one batch in teacher and student, and two copies of the weights."""
    moments = sum(3 * 8 * g.channels**2 * len(g.reads) for g in plan.reducible)
    param = next(plan.gm.parameters())
    batch = min(settings.batch_size, samples)
    live = 4 * batch * _largest_activation(plan) * param.element_size() * 2
    weights = 3 * sum(p.numel() * p.element_size() for p in plan.gm.parameters())
    return float(moments + live + weights)


def cut_bytes(plan: ChannelPlan, samples: int) -> float:
    """Memory of resuming runs at cuts: teacher and student keep every fitting image's live
    values before the next group (measured on one image at every group's start; the student's
    are no larger than the teacher's)."""
    runner = PrefixRunner(plan.gm)
    param = next(plan.gm.parameters())
    one = torch.zeros(1, *plan.input_shape, dtype=param.dtype, device=param.device)
    starts = [runner.start_of(changed_modules(g)) for g in plan.reducible]
    return float(2 * samples * runner.cut_bytes(one, starts))


def stream_batch_size(plan: ChannelPlan, settings: RonSettings) -> int:
    """``settings.batch_size``, lowered so that one batch's live activations (about eight of the
    largest, float32 and float64 copies included) stay within `LIVE_BATCH_BYTES`."""
    itemsize = next(plan.gm.parameters()).element_size()
    per_sample = 8 * _largest_activation(plan) * itemsize
    return max(1, min(settings.batch_size, LIVE_BATCH_BYTES // per_sample))


def _largest_activation(plan: ChannelPlan) -> int:
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out[0].numel()))
             for m in plan.gm.modules() if not list(m.children())]  # fmt: skip
    param = next(plan.gm.parameters())
    try:
        with torch.no_grad():
            plan.gm(torch.zeros(1, *plan.input_shape, dtype=param.dtype, device=param.device))
    finally:
        for h in hooks:
            h.remove()
    return max(sizes, default=math.prod(plan.input_shape))


def build_channel_student(
    teacher: nn.Module,
    input_shape: tuple[int, ...],
    fit: Split,
    val: Split,
    settings: RonSettings,
    device: torch.device,
    progress: Progress | None = None,
    dist: Distributed | None = None,
) -> ChannelResult:
    """The channel student: widths from ``--target-flops``/``--max-drop`` (global greedy on the
    validation split) or from the rank rule per group. ``dist`` (every rank passes the same
    splits): each rank streams its block of ``fit`` and scores its block of ``val``, moments,
    BatchNorm statistics and scores are summed over the ranks; every rank builds the same student."""
    plan = plan_channels(teacher, tuple(input_shape), settings.layers)
    settings = dataclasses.replace(settings, batch_size=stream_batch_size(plan, settings))
    check_memory(
        estimate_bytes(plan, settings, len(fit)), "the channel reduction",
        "lower `batch_size` (activations) or reduce fewer groups (`layers`)", device,
    )  # fmt: skip
    free = available_bytes(device)
    resume = free is None or cut_bytes(plan, len(rank_block(fit.x, dist))) < RESUME_SHARE * free
    if settings.target_flops is None and settings.max_drop is None:
        return reduce_channels(
            plan, fit.x, settings, device, resume=resume, progress=progress, dist=dist
        )
    model = cost_model(plan)
    start = time.perf_counter()
    sens = measure_sensitivity(plan, fit.x, val.x, settings.batch_size, device, resume, dist, progress)
    seconds = {"sensitivity": time.perf_counter() - start}
    result, alloc = build_within_budget(
        plan, model, sens, fit, val, settings, device, resume, progress, dist
    )
    seconds["builds"] = time.perf_counter() - start - seconds["sensitivity"]
    teacher_acc = accuracy(plan.gm, val, device=device, dist=dist)
    drop = 100 * (teacher_acc - accuracy(result.student, val, device=device, dist=dist))
    if settings.max_drop is not None and (
        drop > settings.max_drop or settings.target_flops is None
    ):
        if len(alloc.path) < 2:  # the uniform widths won: bisect the greedy path instead
            alloc = allocate(plan, model, sens, settings.target_flops)
        result, alloc, drop = _bisect_max_drop(
            plan, fit, val, settings, device, alloc, teacher_acc, (result, drop), resume, dist
        )
    result.budget = {**_budget_json(alloc, settings, teacher_acc, drop, len(val)),
                     "candidates": result.budget.get("candidates", []), "seconds": seconds,
                     "streaming_batch_size": settings.batch_size, "resumed_runs": resume}  # fmt: skip
    if dist is not None:
        result.distributed["validation_images_per_rank"] = [
            len(shard_indices(len(val), r, dist.world_size)) for r in range(dist.world_size)
        ]
    return result


def build_within_budget(
    plan: ChannelPlan,
    model: CostModel,
    sens: Sensitivity,
    fit: Split,
    val: Split,
    settings: RonSettings,
    device: torch.device,
    resume: bool = True,
    progress: Progress | None = None,
    dist: Distributed | None = None,
) -> tuple[ChannelResult, Allocation]:
    """The better of two width allocations at the same FLOPs, by mean KL to the teacher on the
    validation split: the global greedy (sensitivities of each group cut alone) and uniform
    widths. The greedy adds up single-group losses; at large cuts their interactions can make
    the uniform widths better (ResNet-18 on digits at 16x: greedy 72.5%, the uniform-width
    ThiNet-style peer 84.7%). ``dist``: every rank builds both and scores its block of the
    validation images (KL sums summed over the ranks): all ranks choose the same candidate."""
    if settings.target_flops is None:  # --max-drop alone: the greedy path is bisected later
        alloc = allocate(plan, model, sens, None)
        built = reduce_channels(
            plan, fit.x, settings, device, alloc.widths, resume=resume, progress=progress, dist=dist
        )
        return built, alloc
    candidates = {"greedy": allocate(plan, model, sens, settings.target_flops),
                  "uniform": uniform_allocation(plan, model, sens, settings.target_flops)}  # fmt: skip
    val_x = rank_block(val.x, dist)
    teacher_logp = torch.log_softmax(_logits(plan.gm, val_x, settings.batch_size, device), -1)
    best: tuple[float, str, ChannelResult] | None = None
    scores = []
    for name, alloc in candidates.items():
        built = reduce_channels(plan, fit.x, settings, device, alloc.widths, resume=resume,
                                progress=progress, label=f" ({name} widths)", dist=dist)  # fmt: skip
        kl = mean_kl(teacher_logp, _logits(built.student, val_x, settings.batch_size, device), dist)
        scores.append(
            {"allocation": name, "validation_mean_kl": kl, "predicted_flops": alloc.flops}
        )
        if best is None or kl < best[0]:
            best = (kl, name, built)
    assert best is not None
    for entry in scores:
        entry["chosen"] = entry["allocation"] == best[1]
    best[2].budget = {"candidates": scores}
    return best[2], candidates[best[1]]


@torch.no_grad()
def _logits(
    model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    model.to(device).eval()
    if len(x) == 0:
        return torch.zeros(0, 0)
    return torch.cat(
        [
            model(x[i : i + batch_size].to(device)).float().cpu()
            for i in range(0, len(x), batch_size)
        ]
    )


def _bisect_max_drop(
    plan: ChannelPlan,
    fit: Split,
    val: Split,
    settings: RonSettings,
    device: torch.device,
    alloc: Allocation,
    teacher_acc: float,
    last: tuple[ChannelResult, float],
    resume: bool,
    dist: Distributed | None = None,
) -> tuple[ChannelResult, Allocation, float]:
    """The cheapest point of the greedy path whose validation drop stays within --max-drop."""
    assert settings.max_drop is not None
    path = alloc.path
    lo, hi = (
        0,
        len(path) - 1,
    )  # path[lo] is known to pass (full width), path[hi] to fail or be unknown
    best: tuple[ChannelResult, float, int] | None = None
    if last[1] <= settings.max_drop:
        best, lo = (last[0], last[1], hi), hi
    for _ in range(MAX_DROP_BUILDS):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        built = reduce_channels(
            plan, fit.x, settings, device, path[mid][1], resume=resume, dist=dist
        )
        drop = 100 * (teacher_acc - accuracy(built.student, val, device=device, dist=dist))
        if drop <= settings.max_drop:
            best, lo = (built, drop, mid), mid
        else:
            hi = mid
    if best is None:  # even the first step lost too much: the teacher's widths
        built = reduce_channels(
            plan, fit.x, settings, device, path[0][1], resume=resume, dist=dist
        )
        best = (built, 0.0, 0)
    flops, widths = path[best[2]]
    chosen = Allocation(
        widths,
        flops,
        alloc.model.cost(widths)[1],
        alloc.teacher_flops,
        alloc.target,
        path,
        alloc.model,
    )
    return best[0], chosen, best[1]


def _budget_json(
    alloc: Allocation, settings: RonSettings, teacher_acc: float, drop: float, n_val: int
) -> dict[str, Any]:
    return {
        "target_flops": settings.target_flops,
        "max_drop_points": settings.max_drop,
        "predicted_flops": alloc.flops,
        "predicted_params": alloc.params,
        "teacher_flops": alloc.teacher_flops,
        "greedy_steps": len(alloc.path) - 1,
        "validation_samples": n_val,
        "validation_teacher_accuracy": teacher_acc,
        "validation_drop_points": drop,
    }
