"""A FLOPs budget for the channel mode, allocated globally over the channel groups.

1. ``measure_sensitivity``: one teacher pass over the fitting images gives every group's channel
   second moments; each group alone is then cut to a few probe widths (maxvol pick, least-squares
   reconstruction from the teacher's own kept channels) and the mean KL(teacher || student) on a
   validation split held out from the training data is measured.
2. ``allocate``: starting at full width, greedily take the step (a few channels of one group)
   with the smallest interpolated loss increase per FLOP saved, until the predicted FLOPs meet
   the target. FLOPs and parameters are predicted exactly from the layer shapes (every conv and
   linear scales with the kept fraction of its input and output groups).

Under ``torchrun`` each rank streams its block of the fitting images and scores its block of the
validation images; moments and KL sums are summed over the ranks, so every rank measures the
same sensitivities and allocates the same widths.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from odekit.distributed import Distributed
from odekit.errors import UsageError
from odekit.methods.ron.channel import (
    ChannelPlan,
    changed_modules,
    pod_basis,
    reconstruction,
    select_channels,
)
from odekit.methods.ron.channel_ops import (
    Cut,
    PrefixRunner,
    ReadGrams,
    add_gram,
    apply_selection,
    batches,
    channel_rows,
    rank_block,
    read_dims,
)
from odekit.models.channel_groups import ChannelGroup, split_width
from odekit.models.layers import layer_flops, total_flops
from odekit.progress import Progress, silent_if_none

PROBE_FRACTIONS = (0.5, 0.25, 0.125, 0.0625)
STEPS_PER_GROUP = 32  # greedy step: ceil(C / 32) channels
MIN_FRACTION = 1 / 64  # no group below ceil(C / 64) channels
LANDING = 0.97  # a budget is met when the predicted FLOPs lie in [0.97 x target, target]


@dataclass
class CostModel:
    """FLOPs and parameters per sample as a function of the group widths."""

    base_flops: float  # FLOPs no group width changes (attention products, fixed layers)
    base_params: float
    terms: list[
        tuple[float, float, int | None, int | None]
    ]  # (flops, params, input slot, output slot)
    channels: dict[int, int]
    # slot -> (group, first segment, end segment, channels): a whole group or a concatenation's part
    slots: list[tuple[int, int, int, int]] = field(default_factory=list)
    segments: dict[int, list[int]] = field(default_factory=dict)  # group -> segment lengths

    def cost(self, widths: dict[int, int]) -> tuple[float, float]:
        kept = self._kept(widths)
        flops, params = self.base_flops, self.base_params
        for f, p, sin, sout in self.terms:
            scale = 1.0
            if sin is not None:
                scale *= kept[sin]
            if sout is not None:
                scale *= kept[sout]
            flops += f * scale
            params += p * scale
        return flops, params

    def _kept(self, widths: dict[int, int]) -> list[float]:
        """The kept fraction of every slot (a part keeps `split_width`'s share of its segments)."""
        split: dict[int, list[int]] = {}
        out: list[float] = []
        for g, first, end, n in self.slots:
            w = widths.get(g, self.channels[g])
            lengths = self.segments.get(g)
            if lengths is None or w >= self.channels[g]:
                out.append(min(w, n) / n)
                continue
            if g not in split:
                split[g] = split_width(lengths, w)
            out.append(sum(split[g][first:end]) / n)
        return out


def _slots(plan: ChannelPlan) -> tuple[dict[str, int], dict[str, int], CostModel]:
    """Input and output slots of every module a reducible group resizes, and an empty model."""
    model = CostModel(0.0, 0.0, [], {g.index: g.channels for g in plan.groups})
    index: dict[tuple[int, int, int], int] = {}

    def slot(g: ChannelGroup, lo: int, n: int) -> int:
        starts = [a for a, _ in g.segments]
        key = (g.index, starts.index(lo), starts.index(lo) + sum(1 for a in starts if lo <= a < lo + n))
        if key not in index:
            index[key] = len(model.slots)
            model.slots.append((*key, n))
        return index[key]

    gin, gout = {}, {}
    for g in plan.reducible:
        if g.parts:
            model.segments[g.index] = [b - a for a, b in g.segments]
        for c in g.consumers:
            gin[c.module] = slot(g, 0, g.channels)
        for name in (*g.producers, *g.channelwise):
            gout[name] = slot(g, *g.span(name))
    return gin, gout, model


def cost_model(plan: ChannelPlan) -> CostModel:
    """The exact FLOPs/params of ``plan.gm`` for any widths (one probe pass: hooks read each
    layer's FLOPs while `total_flops` counts every FLOP the layer table counts). A conv or linear
    scales with the kept fraction of its input and output channels (a concatenation's part with
    its own share, `ChannelGroup.segment_widths`)."""
    gm = plan.gm
    flops: dict[str, float] = {}
    hooks = []
    for name, m in gm.named_modules():
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):

            def hook(mod: nn.Module, _: object, out: Tensor, name: str = name) -> None:
                flops[name] = flops.get(name, 0.0) + layer_flops(mod, out)

            hooks.append(m.register_forward_hook(hook))
    try:  # attention products too, so budgets mean what `info` says
        total = float(total_flops(gm, plan.input_shape))
    finally:
        for h in hooks:
            h.remove()
    gin, gout, model = _slots(plan)
    for name, m in gm.named_modules():
        own = {k: p.numel() for k, p in m.named_parameters(recurse=False)}
        if name in gin or name in gout:
            # the weight scales with its input and output widths, a bias or BN scale with the output only
            weight = (
                float(own.pop("weight", 0))
                if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d)
                else 0.0
            )
            model.terms.append((flops.get(name, 0.0), weight, gin.get(name), gout.get(name)))
            if own:
                model.terms.append((0.0, float(sum(own.values())), None, gout.get(name)))
        else:
            model.base_params += sum(own.values())
    model.base_flops = total - sum(t[0] for t in model.terms)
    return model


@dataclass
class Sensitivity:
    """Validation loss (mean KL to the teacher) of each group cut alone to probe widths."""

    curves: dict[int, list[tuple[int, float]]]  # group -> [(width, loss)], width descending
    teacher_grams: dict[int, Tensor] = field(default_factory=dict)

    def loss(self, group: int, width: int) -> float:
        """Piecewise-linear loss at ``width`` (0 at full width, extrapolated below the last probe)."""
        pts = self.curves[group]
        for (w0, l0), (w1, l1) in itertools.pairwise(pts):
            if w1 <= width <= w0:
                return l0 + (l1 - l0) * (w0 - width) / max(w0 - w1, 1)
        (w0, l0), (w1, l1) = pts[-2], pts[-1]
        return l1 + (l1 - l0) * (w1 - width) / max(w0 - w1, 1)


def teacher_grams(
    plan: ChannelPlan,
    x: Tensor,
    batch_size: int,
    device: torch.device,
    dist: Distributed | None = None,
) -> dict[int, dict[str, Tensor]]:
    """Every reducible group's read tensors' second moments Zt^T Zt in one teacher pass
    (``dist``: over this rank's block of ``x``, summed over the ranks in one all-reduce)."""
    runner = PrefixRunner(plan.gm.to(device).eval())
    reads = {r: (g.index, d) for g in plan.reducible for r, d in read_dims(g).items()}
    channels = {g.index: g.channels for g in plan.reducible}
    grams: dict[int, dict[str, Tensor]] = {g.index: {} for g in plan.reducible}
    for r, (gi, _) in reads.items():  # zeros first: a rank without images still takes part
        grams[gi][r] = torch.zeros(channels[gi], channels[gi], dtype=torch.float64, device=device)

    def visit(name: str, value: Tensor) -> None:  # one read at a time, as the pass reaches it
        gi, d = reads[name]
        rows = channel_rows(value, d)
        add_gram(grams[gi][name], rows, rows)

    for xb in batches(rank_block(x, dist), batch_size, device):
        runner.resume(Cut(0, {}, xb), list(reads), visit=visit)
    if dist is not None and dist.world_size > 1:
        keys = [(gi, r) for gi, g in grams.items() for r in g]
        summed = dist.all_reduce_sum_many([grams[gi][r] for gi, r in keys])
        for (gi, r), m in zip(keys, summed, strict=True):
            grams[gi][r] = m
    return grams


def _logits(runner: PrefixRunner, cuts: list[Cut]) -> Tensor:
    """The graph's outputs (float32, on the CPU) from ``cuts``; (0, 0) for no cuts."""
    if not cuts:
        return torch.zeros(0, 0)
    return torch.cat([torch.as_tensor(runner.finish(cut)).float().cpu() for cut in cuts])


def mean_kl(teacher_logp: Tensor, student_logits: Tensor, dist: Distributed | None = None) -> float:
    """Mean KL(teacher || student) of the class probabilities over this rank's rows (``dist``:
    the sum and the count are summed over the ranks; a rank may have no rows)."""
    total, count = 0.0, 0.0
    if len(student_logits):
        logp = F.log_softmax(student_logits, dim=-1)
        kl = (teacher_logp.exp() * (teacher_logp - logp)).sum(-1).double()
        total, count = float(kl.sum()), float(kl.numel())
    if dist is not None:
        return dist.mean(total, count)
    return total / count if count else float("nan")


def measure_sensitivity(
    plan: ChannelPlan,
    fit_x: Tensor,
    val_x: Tensor,
    batch_size: int,
    device: torch.device,
    resume: bool = True,
    dist: Distributed | None = None,
    progress: Progress | None = None,
) -> Sensitivity:
    """Cut each group alone to ``PROBE_FRACTIONS`` of its width and measure the validation KL.
    ``resume``: each probe runs from the teacher's live values before the group's first changed
    layer (kept for every validation batch, groups in graph order), not from the input.
    ``dist``: every rank passes all the images, streams its block of ``fit_x`` and scores its
    block of ``val_x``; moments and KL sums are summed over the ranks."""
    grams = teacher_grams(plan, fit_x, batch_size, device, dist)
    gm = plan.gm
    runner = PrefixRunner(gm)
    entries = [Cut(0, {}, xb) for xb in batches(rank_block(val_x, dist), batch_size, device)]
    teacher_logp = F.log_softmax(_logits(runner, entries), -1)
    starts = {g.index: runner.start_of(changed_modules(g)) if resume else 0 for g in plan.reducible}
    cuts = entries
    curves: dict[int, list[tuple[int, float]]] = {}
    ordered = sorted(plan.reducible, key=lambda g: starts[g.index])
    for g in silent_if_none(progress).track(ordered, len(ordered), "probing group sensitivities"):
        cuts = [runner.resume(c, [], starts[g.index])[1] or c for c in cuts]
        curves[g.index] = _probe_curve(
            plan, runner, g, grams[g.index], (cuts, teacher_logp), device, dist
        )
    return Sensitivity(curves, {g.index: sum(grams[g.index].values()) for g in plan.reducible})  # type: ignore[misc]


def _probe_curve(
    plan: ChannelPlan,
    runner: PrefixRunner,
    g: ChannelGroup,
    grams: dict[str, Tensor],
    val: tuple[list[Cut], Tensor],
    device: torch.device,
    dist: Distributed | None = None,
) -> list[tuple[int, float]]:
    """[(width, validation KL)] of group ``g`` alone cut to each probe width (copies of its layers
    are cut, never the teacher's own); ``val``: this rank's validation cuts and the teacher's
    log-probabilities on them."""
    gm = plan.gm
    tt = sum(
        grams.values(), torch.zeros(g.channels, g.channels, dtype=torch.float64, device=device)
    )
    points = [(g.channels, 0.0)]
    basis = pod_basis(tt)[1]
    for frac in PROBE_FRACTIONS:
        width = max(1, round(frac * g.channels))
        if width >= points[-1][0]:
            continue
        keep = select_channels(tt, width, "maxvol", basis=basis, group=g)
        maps = {r: reconstruction(ReadGrams(m, m, m), keep, "lsq") for r, m in grams.items()}
        saved = {n: gm.get_submodule(n) for n in set(changed_modules(g))}
        for n, module in saved.items():
            _install(gm, n, copy.deepcopy(module))
        runner.mods = dict(gm.named_modules())
        apply_selection(gm, g, keep, maps)
        loss = mean_kl(val[1], _logits(runner, val[0]), dist)
        for n, module in saved.items():
            _install(gm, n, module)
        runner.mods = dict(gm.named_modules())
        points.append((width, max(loss, points[-1][1])))  # a narrower group never costs less
    if len(points) == 1:
        points.append((0, 1.0))
    return points


def _install(gm: fx.GraphModule, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    owner._modules[child] = module


@dataclass
class Allocation:
    """Widths meeting a FLOPs target, the predicted cost and the greedy path (FLOPs, widths)."""

    widths: dict[int, int]
    flops: float
    params: float
    teacher_flops: float
    target: float
    path: list[tuple[float, dict[int, int]]]
    model: CostModel


def allocate(
    plan: ChannelPlan, model: CostModel, sens: Sensitivity, target_fraction: float | None
) -> Allocation:
    """Greedy: repeatedly narrow the group whose next step costs the least loss per FLOP saved.
    Without a target the path runs down to the narrowest widths (for --max-drop)."""
    widths = {g.index: g.channels for g in plan.reducible}
    teacher_flops, _ = model.cost(widths)
    target = (target_fraction or 0.0) * teacher_flops
    path: list[tuple[float, dict[int, int]]] = [(teacher_flops, dict(widths))]
    flops = teacher_flops
    while flops > target:
        best: tuple[float, int, int] | None = None
        for g in plan.reducible:
            w = widths[g.index]
            step = max(1, -(-g.channels // STEPS_PER_GROUP))
            floor = max(1, -(-g.channels // round(1 / MIN_FRACTION)))
            if w - step < floor:
                step = w - floor
            if step <= 0:
                continue
            trial = {**widths, g.index: w - step}
            saved = flops - model.cost(trial)[0]
            if saved <= 0:
                continue
            dloss = sens.loss(g.index, w - step) - sens.loss(g.index, w)
            score = (max(dloss, 0.0) + 1e-12) / saved
            if best is None or score < best[0]:
                best = (score, g.index, w - step)
        if best is None and target_fraction is None:
            break
        if best is None:
            smallest = model.cost(widths)[0]
            raise UsageError(
                f"`target_flops` {target_fraction:g} is out of reach: the narrowest channel student still has "
                f"{smallest / teacher_flops:.3f} of the teacher's FLOPs",
                f"ask for at least {smallest / teacher_flops:.3f}, or reduce more layers (`layers`)",
            )
        _, gi, w_new = best
        trial = {**widths, gi: _last_width(model, widths, gi, w_new, target)}
        if (
            model.cost(trial)[0] < LANDING * target
        ):  # the step overshoots: land inside the band instead
            trial = _land(plan, model, sens, widths, target) or trial
        widths.update(trial)
        flops = model.cost(widths)[0]
        path.append((flops, dict(widths)))
    if target_fraction is not None:
        _fill_back(plan, model, sens, widths, target)
        path.append((model.cost(widths)[0], dict(widths)))
    flops, params = model.cost(widths)
    return Allocation(widths, flops, params, teacher_flops, target, path, model)


def uniform_allocation(
    plan: ChannelPlan, model: CostModel, sens: Sensitivity, target_fraction: float
) -> Allocation:
    """One kept fraction for every group (the pruning peers' uniform widths), bisected on the exact
    predicted FLOPs to just under the target, then channels given back to land in the 3% band."""
    channels = {g.index: g.channels for g in plan.reducible}
    teacher_flops, _ = model.cost(channels)
    target = target_fraction * teacher_flops

    def widths_at(frac: float) -> dict[int, int]:
        return {i: max(1, math.floor(frac * c)) for i, c in channels.items()}

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if model.cost(widths_at(mid))[0] <= target else (lo, mid)
    widths = widths_at(lo)
    if model.cost(widths)[0] > target:
        raise UsageError(
            f"`target_flops` {target_fraction:g} is out of reach with uniform widths",
            "ask for a larger `target_flops`",
        )
    _fill_back(plan, model, sens, widths, target)
    flops, params = model.cost(widths)
    return Allocation(widths, flops, params, teacher_flops, target, [(flops, dict(widths))], model)


def _land(
    plan: ChannelPlan, model: CostModel, sens: Sensitivity, widths: dict[int, int], target: float
) -> dict[int, int] | None:
    """The single narrowing (any group, any width) that lands in [LANDING x target, target] with
    the least loss, or None: on a small model one greedy step can jump past the 3% band."""
    best: tuple[float, int, int] | None = None
    for g in plan.reducible:
        for w in range(widths[g.index] - 1, 0, -1):
            flops = model.cost({**widths, g.index: w})[0]
            if flops < LANDING * target:
                break
            if flops <= target:
                dloss = sens.loss(g.index, w) - sens.loss(g.index, widths[g.index])
                if best is None or dloss < best[0]:
                    best = (dloss, g.index, w)
    return {**widths, best[1]: best[2]} if best is not None else None


def _fill_back(
    plan: ChannelPlan, model: CostModel, sens: Sensitivity, widths: dict[int, int], target: float
) -> None:
    """Give channels back (the most loss saved per FLOP first) while the target still holds: the
    greedy's last steps may undershoot by more than one channel's FLOPs on a small model."""
    while True:
        flops = model.cost(widths)[0]
        best: tuple[float, int] | None = None
        for g in plan.reducible:
            w = widths[g.index]
            if w >= g.channels:
                continue
            added = model.cost({**widths, g.index: w + 1})[0] - flops
            if flops + added > target:
                continue
            gain = sens.loss(g.index, w) - sens.loss(g.index, w + 1)
            score = (gain + 1e-12) / max(added, 1e-12)
            if best is None or score > best[0]:
                best = (score, g.index)
        if best is None:
            return
        widths[best[1]] += 1


def _last_width(
    model: CostModel, widths: dict[int, int], gi: int, w_new: int, target: float
) -> int:
    """The widest width in [w_new, current) that meets ``target``, else ``w_new`` (no overshoot)."""
    for w in range(widths[gi] - 1, w_new, -1):
        if model.cost({**widths, gi: w})[0] <= target:
            return w
    return w_new
