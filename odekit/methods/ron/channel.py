"""Channel-level reduction (``reduce --mode channel``): the same graph with fewer channels.

For every reducible channel group (``odekit.models.channel_groups``), from the input side:

1. stream the C-dimensional channel vectors (every pixel of every sample) of the tensors the
   group's consumers read, in the teacher and in the student reduced so far: the C x C second
   moments Zs^T Zs, Zs^T Zt, Zt^T Zt (an exact streamed sketch of the channel covariance);
2. POD basis V (C x P) of the teacher's channel vectors; P channels S by maxvol on V (the
   thesis' DEIM selection);
3. reconstruction T (C x P): ridge least squares from the student's kept channels to the
   teacher's full channels (``lsq``), or the POD interpolation T = V (S V)^+ (``interp``);
4. keep S in the producers and channel-wise layers, fold T into every consumer's input weights.

BatchNorm statistics are re-estimated on the fitting images at the end.

Under ``torchrun`` (a ``dist`` handle) every rank streams its contiguous block of the fitting
images and the moments are summed over the ranks: every rank selects the same channels and
builds the same student, with the moments one process gets from all the images.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from odekit.distributed import Distributed
from odekit.errors import UsageError
from odekit.linalg.maxvol import rect_maxvol
from odekit.linalg.rank import RankContext, parse_rank_spec, rule_rank
from odekit.methods.batchnorm import batchnorm_layers, recalibrate_batchnorm
from odekit.methods.ron.channel_ops import (
    Cut,
    PrefixRunner,
    ReadGrams,
    apply_selection,
    batches,
    channel_rows,
    pick_by_segment,
    rank_block,
    read_dims,
    sum_grams,
    top_by_segment,
)
from odekit.methods.ron.settings import RonSettings
from odekit.models.channel_groups import ChannelGroup, channel_groups
from odekit.models.graph import runnable, trace_graph
from odekit.models.layers import layer_table, resolve_layers
from odekit.progress import Progress, silent_if_none

RIDGE = 1e-6  # ridge of the least-squares fit, relative to the mean kept-channel energy
SELECTIONS = ("maxvol", "l1")


@dataclass
class ChannelGroupReport:
    """One channel group: its width before and after, and why it stayed when it did."""

    index: int
    name: str
    channels: int
    width: int
    reducible: bool
    blocked: str | None
    producers: list[str]
    consumers: list[str]
    pod_energy: float | None = (
        None  # fraction of the channel vectors' energy in the top-`width` POD modes
    )

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ChannelResult:
    """What the channel mode builds: the student (a GraphModule) and one report per group."""

    student: fx.GraphModule
    groups: list[ChannelGroupReport]
    n_samples: int
    reconstruct: str
    selection: str
    budget: dict[str, Any] = field(default_factory=dict)  # target, predicted FLOPs, greedy steps
    # world size, backend and the fitting images each rank streamed (report.json's `distributed`)
    distributed: dict[str, Any] = field(default_factory=dict)

    @property
    def widths(self) -> list[int]:
        return [g.width for g in self.groups if g.reducible]


@dataclass
class ChannelPlan:
    """A traced teacher and its channel groups (what ``info`` and the budget look at)."""

    gm: fx.GraphModule
    groups: list[ChannelGroup]
    input_shape: tuple[int, ...]

    @property
    def reducible(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.reducible]


def plan_channels(
    teacher: nn.Module, input_shape: tuple[int, ...], layers: str | None = None
) -> ChannelPlan:
    """Trace ``teacher`` and find its channel groups; with ``layers`` only groups produced by
    those compute layers stay reducible."""
    # a copy: an fx trace shares its submodules with the model it traced
    gm = copy.deepcopy(trace_graph(runnable(teacher, input_shape), input_shape, what="reduce"))
    gm.eval()
    groups = channel_groups(gm, input_shape)
    if layers is not None:
        chosen = {layer.name for layer in resolve_layers(layers, layer_table(gm, input_shape))}
        for g in groups:
            if g.reducible and not chosen.intersection(g.producers):
                g.blocked = f"outside `layers` {layers}"
    if not any(g.reducible for g in groups):
        reasons = "; ".join(f"{g.name}: {g.blocked}" for g in groups[:4])
        raise UsageError(
            f"no channel group of this model can be reduced ({reasons})",
            "try `mode` region with `layers`, or another `layers` range",
        )
    return ChannelPlan(gm, groups, tuple(input_shape))


def _fit_grams(
    teacher: PrefixRunner,
    student: PrefixRunner,
    group: ChannelGroup,
    cuts: list[tuple[Cut, Cut]],
    device: torch.device,
    stop_at: int | None,
    dist: Distributed | None = None,
) -> tuple[dict[str, ReadGrams], list[tuple[Cut, Cut]]]:
    """Stream the group's read tensors of teacher and student (one pass over the batches, each
    resumed from its cut); with ``stop_at`` also every batch's cuts before that node. ``cuts``
    hold this rank's block of the images; the moments are summed over the ranks (``dist``)."""
    dims = read_dims(group)
    grams = {r: ReadGrams.zeros(group.channels, device) for r in group.reads}
    after: list[tuple[Cut, Cut]] = []
    for t_cut, s_cut in cuts:
        want = list(group.reads)
        t_vals, t_next = teacher.resume(t_cut, want, stop_at)
        s_vals, s_next = student.resume(s_cut, want, stop_at)
        for r, g in grams.items():
            g.update(channel_rows(s_vals[r], dims[r]), channel_rows(t_vals[r], dims[r]))
        after.append((t_next or t_cut, s_next or s_cut))
    sum_grams(grams, dist)
    return grams, after


def changed_modules(group: ChannelGroup) -> list[str]:
    """The modules a selection in ``group`` rewrites."""
    return [*group.producers, *group.channelwise, *(c.module for c in group.consumers)]


def pod_basis(tt: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors of a channel second-moment matrix."""
    evals, evecs = torch.linalg.eigh(tt)
    return evals.flip(0).clamp_min(0.0), evecs.flip(1)


def select_channels(
    tt: Tensor,
    width: int,
    selection: str,
    producer_weights: Tensor | None = None,
    basis: Tensor | None = None,
    group: ChannelGroup | None = None,
) -> Tensor:
    """``width`` channels: maxvol rows of the top-``width`` POD basis (``basis``: the eigenvectors
    of ``tt`` when already computed), or the largest L1 norms of the producers' weights (``l1``,
    the pruning peers' pick). Sorted indices. A concatenation's ``group`` keeps
    `ChannelGroup.segment_widths` channels in each of its segments (at least one per part), so
    the cost model predicts the student's FLOPs from ``width`` alone."""
    c = tt.shape[0]
    if width >= c:
        return torch.arange(c)
    if group is not None and group.parts:
        segments, quotas = group.segments, group.segment_widths(width)
        if selection == "l1":
            assert producer_weights is not None
            return top_by_segment(producer_weights, segments, quotas)
        v = pod_basis(tt)[1] if basis is None else basis
        return pick_by_segment(v[:, : sum(quotas)], segments, quotas).cpu()
    if selection == "l1":
        assert producer_weights is not None
        return torch.topk(producer_weights, width).indices.sort().values.cpu()
    v = pod_basis(tt)[1] if basis is None else basis
    idx = rect_maxvol(v[:, :width].contiguous(), min_rows=width, max_rows=width)
    assert isinstance(idx, Tensor)
    return idx.sort().values.cpu()


def reconstruction(
    grams: ReadGrams, keep: Tensor, mode: str, basis: Tensor | None = None
) -> Tensor:
    """T (C x P): teacher channels ~ T (student's kept channels)."""
    k = keep.to(grams.ss.device)
    if mode == "interp":
        assert basis is not None
        v = basis[:, : k.numel()]
        return v @ torch.linalg.pinv(v[k])
    a = grams.ss[k][:, k]
    lam = RIDGE * float(torch.diagonal(a).mean().clamp_min(1e-30))
    a = a + lam * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return torch.linalg.solve(a, grams.st[k]).T.contiguous()


def producer_l1(gm: fx.GraphModule, group: ChannelGroup) -> Tensor:
    """Sum over the group's producers of each output channel's weight L1 norm."""
    mods = dict(gm.named_modules())
    total = torch.zeros(group.channels, dtype=torch.float64)
    for name in group.producers:
        w = mods[name].weight.detach()  # type: ignore[union-attr]
        lo, n = group.span(name)  # a concatenation's part makes channels [lo, lo + n)
        total[lo : lo + n] += w.reshape(w.shape[0], -1).abs().sum(1).double().cpu()
    return total


def rank_width(group: ChannelGroup, tt: Tensor, rows: int, rank: str) -> int:
    """The width a rank rule (vbmf, energy:F, factor:F, an integer) gives the group's spectrum,
    within [1, C] (a channel group narrower than its numerical rank is still a valid student)."""
    evals, _ = pod_basis(tt)
    ctx = RankContext(
        evals.sqrt(), n_samples=max(rows, 1), dim=group.channels, total_energy=float(evals.sum())
    )
    return max(1, min(group.channels, rule_rank(parse_rank_spec(rank), ctx)))


def reduce_channels(
    plan: ChannelPlan,
    fit_x: Tensor,
    settings: RonSettings,
    device: torch.device,
    widths: dict[int, int] | None = None,
    *,
    selection: str = "maxvol",
    recalibrate: bool = True,
    resume: bool = True,
    progress: Progress | None = None,
    label: str = "",
    dist: Distributed | None = None,
) -> ChannelResult:
    """Reduce every group in ``widths`` (index -> width; default: the rank rule's width of every
    reducible group), one group after another from the input side. ``resume``: keep every batch's
    live values before the next group's first changed layer (memory: see `cut_bytes`) instead of
    running teacher and student from the input for every group. ``dist``: this rank streams its
    block of ``fit_x`` (every rank passes all of it) and the moments and BatchNorm statistics
    are summed over the ranks, so every rank returns the same student."""
    if selection not in SELECTIONS:
        raise UsageError(
            f"unknown channel selection '{selection}'", f"choose one of {', '.join(SELECTIONS)}"
        )
    progress = silent_if_none(progress)
    teacher = plan.gm.to(device).eval()
    student = copy.deepcopy(teacher)
    t_run, s_run = PrefixRunner(teacher), PrefixRunner(student)
    chosen = dict(widths) if widths is not None else {g.index: -1 for g in plan.reducible}
    reports = {g.index: _report(g, g.channels) for g in plan.groups}
    block = rank_block(fit_x, dist)
    entries = [
        (Cut(0, {}, xb), Cut(0, {}, xb)) for xb in batches(block, settings.batch_size, device)
    ]
    cuts = entries
    for group in progress.track(
        [g for g in plan.groups if g.index in chosen], len(chosen), f"reducing channel groups{label}"
    ):
        # the layers before the group's first changed module stay as they are: resume there
        start = t_run.start_of(changed_modules(group)) if resume else None
        if start is None or not cuts or start < cuts[0][0].at:
            cuts = entries
        grams, cuts = _fit_grams(t_run, s_run, group, cuts, device, start, dist)
        tt = sum((g.tt for g in grams.values()), torch.zeros_like(grams[group.reads[0]].tt))
        width = chosen[group.index]
        if width < 0:
            width = rank_width(group, tt, grams[group.reads[0]].rows, settings.rank)
        evals, basis = pod_basis(tt)
        reports[group.index].width = width
        reports[group.index].pod_energy = float(evals[:width].sum() / evals.sum().clamp_min(1e-300))
        if width >= group.channels and widths is None:
            continue
        l1 = producer_l1(student, group) if selection == "l1" else None
        keep = select_channels(tt, width, selection, l1, basis, group)
        maps = {r: reconstruction(g, keep, settings.reconstruct, basis) for r, g in grams.items()}
        apply_selection(student, group, keep, maps)
    if recalibrate:
        recalibrate_batchnorm(student, block, batch_size=settings.batch_size, device=device)
        merge_batchnorm(student, len(block), dist)
    student.eval()
    return ChannelResult(
        student,
        [reports[g.index] for g in plan.groups],
        int(fit_x.shape[0]),
        settings.reconstruct,
        selection,
        distributed=distributed_json(len(block), dist),
    )


def merge_batchnorm(model: nn.Module, n_local: int, dist: Distributed | None) -> None:
    """Turn every BatchNorm's statistics, recalibrated on this rank's ``n_local`` images, into
    the image-weighted means over all the ranks (one all-reduce): the running mean is then the
    exact mean over all the images, the running variance the size-weighted mean of the batch
    variances, as `recalibrate_batchnorm` gives one process whose batches start at the same
    images."""
    layers = batchnorm_layers(model)
    if dist is None or dist.world_size == 1 or not layers:
        return
    if n_local == 0:  # nothing was recalibrated here: weigh in as zeros
        for bn in layers:
            bn.reset_running_stats()
    weighted = {"running_mean": True, "running_var": True, "num_batches_tracked": False}
    stats = [(bn, name) for bn in layers for name in weighted if getattr(bn, name) is not None]
    parts = [getattr(bn, name).double() * (n_local if weighted[name] else 1) for bn, name in stats]
    count = torch.tensor([float(n_local)], dtype=torch.float64, device=parts[0].device)
    *summed, total = dist.all_reduce_sum_many([*parts, count])
    images = max(float(total), 1.0)
    for (bn, name), s in zip(stats, summed, strict=True):
        t = getattr(bn, name)
        t.copy_((s / images if weighted[name] else s).to(t.dtype))


def distributed_json(n_local: int, dist: Distributed | None) -> dict[str, Any]:
    """World size, backend and the fitting images every rank streamed (gathered, rank order)."""
    if dist is None:
        return {"world_size": 1, "backend": None, "fit_images_per_rank": [n_local]}
    counts = dist.all_gather(torch.tensor([n_local], dtype=torch.int64))
    return {**dist.describe(), "fit_images_per_rank": [int(c) for c in counts]}


def _report(group: ChannelGroup, width: int) -> ChannelGroupReport:
    return ChannelGroupReport(
        group.index, group.name, group.channels, width, group.reducible, group.blocked, list(group.producers),
        [c.module for c in group.consumers],
    )  # fmt: skip
