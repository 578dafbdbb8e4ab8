"""ASNet construction from a teacher (thesis Algorithm 3): subspace, head, optional fine-tuning, evaluation."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from odekit.distributed import Distributed
from odekit.errors import UsageError
from odekit.io.datasets import Dataset, Split
from odekit.linalg import FrequentDirections
from odekit.methods.asnet.analysis import LayerAnalysis
from odekit.methods.asnet.baselines import Baselines, _baselines
from odekit.methods.asnet.head import (
    _l1_prox,
    _standardise_into,
    fit_head,
    project,
    sparse_cost,
)
from odekit.methods.asnet.rank_choice import choose_rank
from odekit.methods.asnet.result import (
    ASNetResult,
    CutReport,
    FinetuneReport,
    SparseCost,
    SplitCosts,
)
from odekit.methods.asnet.settings import LOGREG_MAX_SAMPLES, ASNetSettings
from odekit.methods.asnet.subspace import active_subspace
from odekit.methods.comparison import LatencyProbe, compare_student
from odekit.methods.evaluation import accuracy, model_cost
from odekit.methods.pce import basis_size
from odekit.methods.training import TrainHistory, TrainSettings, train_classifier
from odekit.models.asnet import ASNet
from odekit.models.cut import cut_model
from odekit.models.graph import runnable
from odekit.models.registry import ARCHITECTURES
from odekit.progress import Progress, silent_if_none

__all__ = ["ASNetResult", "build_asnet_from_teacher", "is_registered_teacher"]


def is_registered_teacher(arch: str) -> bool:
    """True when ``load_model`` can rebuild an ASNet of this teacher from its JSON args."""
    return arch.lower() in ARCHITECTURES and arch.lower() != "asnet"


def build_asnet_from_teacher(
    teacher: nn.Module,
    teacher_arch: str,
    teacher_args: dict[str, Any],
    input_shape: tuple[int, ...] | list[int],
    data: Dataset,
    settings: ASNetSettings,
    device: torch.device,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    dist: Distributed | None = None,
) -> ASNetResult:
    """Algorithm 2 end to end, with the thesis fig. 6.5b baselines at the same r.

    ``dist`` (several ranks): gradients, projections, the PCE fit, evaluation and fine-tuning
    are sharded over the ranks (sums all-reduced, sketches merged); the baselines, which fit
    scikit-learn models on all features at once, are skipped."""
    progress = silent_if_none(progress)
    say = log or (lambda _m: None)
    registered = is_registered_teacher(teacher_arch)
    teacher = runnable(teacher, input_shape).to(device).eval()
    chain = cut_model(teacher, input_shape)
    cut = chain.cut(settings.cut)
    sub_settings = settings.subspace
    n_train = len(data.train.subset(sub_settings.samples, seed=sub_settings.seed))
    notes: list[str] = []

    requested = settings.rank
    if isinstance(requested, int) and requested > cut.features:
        raise UsageError(
            f"`rank` {requested} exceeds the {cut.features} neurons of layer {cut.index}",
            f"use `rank` <= {cut.features}",
        )
    say(f"cut at layer {cut.index} ({cut.name}): n_l = {cut.features}; streaming per-sample gradients")
    subspace = active_subspace(chain, cut, data.train, sub_settings, device, progress=progress, dist=dist)
    choice = choose_rank(
        requested, subspace, cut.features, settings.degree, n_train, sub_settings.sketch_size, sub_settings.eps
    )
    rank = choice.rank
    V = subspace.V[:, :rank].double()
    analysis = LayerAnalysis(cut, subspace, sub_settings.eps, None, 0)

    pre = chain.pre_model(cut)
    post = chain.post_model(cut)
    fit_split = data.train.subset(sub_settings.samples, seed=sub_settings.seed)
    parallel = dist is not None and dist.world_size > 1
    if parallel and dist is not None:
        part = dist.shard(len(fit_split))
        fit_split = Split(fit_split.x[part.start : part.stop], fit_split.y[part.start : part.stop])
        if settings.baselines:
            notes.append(f"baselines skipped: they fit scikit-learn models on all features in one process ({dist.world_size} ranks)")
    bs = sub_settings.batch_size
    say(f"rank r = {rank} ({choice.rule}); fitting the degree-{settings.degree} PCE ({basis_size(rank, settings.degree)} basis functions)")
    pca_fd = FrequentDirections(cut.features, sub_settings.sketch_size, device=device) if settings.baselines and not parallel else None
    mean = subspace.mean_activation.to(device)
    keep = LOGREG_MAX_SAMPLES if pca_fd is not None else 0
    train = project(pre, fit_split, {"as": (V, None)}, bs, device, post=post, sketch=pca_fd, center=mean, keep_features=keep)
    assert train.logits is not None
    num_classes = int(train.logits.shape[1])  # the teacher's outputs, which may exceed the data's classes
    head = fit_head(train.z["as"], train.logits, settings.degree, settings.ridge, dist=dist)
    notes += head.fit.warnings

    asnet = ASNet(copy.deepcopy(pre), cut.features, rank, settings.degree, num_classes).to(device)
    _standardise_into(asnet.active, V, head.mu.to(device), head.sigma.to(device))
    with torch.no_grad():
        asnet.pce.linear.weight.copy_(head.pce.linear.weight)
    asnet.eval()
    acc_before = accuracy(asnet, data.test, device=device, dist=dist)
    baselines = Baselines(as_pce=acc_before)
    if pca_fd is not None:
        say("baselines: PCA+PCE, AS+LR, PCA+LR and LR on all n_l features")
        baselines = _baselines(pre, fit_split, data, train, pca_fd, V, mean, rank, settings, device, acc_before)

    history = None
    if settings.finetune_epochs > 0:
        say(f"fine-tuning {settings.finetune_epochs} epochs (beta = {settings.beta}{', L1 ' + str(settings.l1) if settings.sparse else ''})")
        history = _finetune(asnet, teacher, data, settings, device, progress, dist)
    asnet.eval()
    probes = []
    if settings.latency:  # teacher and ASNet timed interleaved, one example and one batch
        probes = [LatencyProbe("batch1", data.test.x[:1], 20),
                  LatencyProbe(f"batch{min(len(data.test), bs)}", data.test.x[:bs], 5)]  # fmt: skip
    comparison = compare_student(
        teacher, asnet, data.test, input_shape, device, dist, student_before=acc_before, latency=probes, warmup=2
    )
    notes += _baseline_warning(comparison.student.accuracy, baselines, settings.finetune_epochs > 0)
    split = SplitCosts(
        model_cost(asnet.pre, input_shape),
        model_cost(nn.Sequential(asnet.active, asnet.pce), (cut.features,)),
        model_cost(post, tuple(cut.out_shape)),
    )
    report = CutReport(
        cut=cut, rank=rank, rank_rule=choice.rule, degree=settings.degree, n_basis=basis_size(rank, settings.degree),
        eps=sub_settings.eps, active_neurons=subspace.active_neurons(sub_settings.eps),
        active_neurons_eq612=subspace.active_neurons_eq612(sub_settings.eps), eps_at_rank=subspace.eps_at_rank(rank),
        sketch_size=sub_settings.sketch_size, gradient_samples=subspace.n_samples,
        sketch_covariance_error_rel=subspace.covariance_error_rel,
    )  # fmt: skip
    finetune = FinetuneReport(
        epochs=settings.finetune_epochs, beta=settings.beta, lr=settings.lr,
        head_lr=settings.head_lr if settings.head_lr is not None else settings.lr, sparse=settings.sparse,
        l1=settings.l1 if settings.sparse else None, history=history.epochs if history else [],
        selection={k: v for k, v in history.to_dict().items() if k != "epochs"} if history else {},
    )  # fmt: skip
    args = {
        "teacher_arch": teacher_arch.lower(),
        "teacher_args": dict(teacher_args),
        "cut": cut.index,
        "end": cut.end,
        "features": cut.features,
        "rank": rank,
        "degree": settings.degree,
        "num_classes": num_classes,
    }
    if cut.node is not None:
        args.update(node=cut.node, input_shape=[int(v) for v in input_shape])
    sparse = SparseCost.of(sparse_cost(asnet, input_shape)) if settings.sparse else None
    return ASNetResult(
        asnet.cpu(), args, report, comparison, split, head.fit, baselines, finetune, analysis, notes, history, sparse,
        registered,
    )  # fmt: skip


def _finetune(
    asnet: ASNet, teacher: nn.Module, data: Dataset, settings: ASNetSettings, device: torch.device,
    progress: Progress, dist: Distributed | None,
) -> TrainHistory:
    """Distillation fine-tuning on the training split less its validation part, keeping the best
    epoch (ASNet-s: the best trained epoch, since the untuned ASNet is dense)."""
    sub = settings.subspace
    train_settings = TrainSettings(
        epochs=settings.finetune_epochs, lr=settings.lr, batch_size=sub.batch_size, beta=settings.beta, seed=sub.seed,
        val_fraction=settings.val_fraction, patience=settings.patience,
    )  # fmt: skip
    return train_classifier(
        asnet, data, train_settings, device, teacher=teacher, after_step=_l1_prox(settings.l1) if settings.sparse else None,
        progress=progress,
        lr_overrides={asnet.active: settings.head_lr, asnet.pce: settings.head_lr} if settings.head_lr else None,
        dist=dist, keep_untuned=not settings.sparse,
    )  # fmt: skip


BASELINE_GAP = 0.05  # a fine-tuned head this far (accuracy fraction) below a baseline gets a warning


def _baseline_warning(reached: float, baselines: Baselines, tuned: bool) -> list[str]:
    """One warning when the ASNet's test accuracy ``reached`` sits far below the best baseline
    fitted on the same cut's features, naming that baseline and what to try."""
    scores = {k: v for k, v in baselines.accuracies().items() if k != "as_pce"}
    if not scores:
        return []
    best_name, best = max(scores.items(), key=lambda kv: kv[1])
    if reached >= best - BASELINE_GAP:
        return []
    what = "the fine-tuned ASNet" if tuned else "the ASNet"
    return [f"{what} reaches {100 * reached:.1f}% on the test split, {100 * (best - reached):.1f} points below the "
            f"'{best_name}' baseline ({100 * best:.1f}%) on the same cut: try a larger `rank`, `degree` 1, a lower `lr` "
            "(e.g. 1e-5) with more `finetune` epochs, or that baseline as the head"]  # fmt: skip
