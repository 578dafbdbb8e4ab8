"""`odekit.asnet`: active-subspace analysis of a model's layers and ASNet compression (thesis ch. 6)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from odekit.api.asnet_figures import baselines_figure, spectrum_figure
from odekit.api.compression import inputs_of
from odekit.api.defaults import DISTILLATION_BETA, FINETUNE_LR, STREAM_BATCH_SIZE
from odekit.api.finetune_report import FINETUNE_PLOT, history_figure, history_table
from odekit.api.inputs import ModelLike, as_dataset, as_loaded, layer_spec
from odekit.api.onnx_export import OnnxDeployment, check_export_format, deploy_onnx, onnx_headline
from odekit.api.progress import shown
from odekit.api.results import RELOAD_PROBE, Claim, RunResult, model_file, save_derived_model
from odekit.device import resolve_device, seed_everything
from odekit.distributed import Distributed
from odekit.errors import UsageError
from odekit.io.datasets import Dataset
from odekit.io.model_meta import LoadedModel, ModelMeta
from odekit.methods.asnet import (
    ASNetResult,
    ASNetSettings,
    LayerAnalysis,
    SubspaceSettings,
    analyze_layers,
    build_asnet_from_teacher,
    cut_model,
    default_sketch_size,
    parse_rank,
)
from odekit.methods.evaluation import ModelCost
from odekit.progress import Progress
from odekit.stats import accuracy_text
from odekit.writers.atomic import atomic_write_bytes
from odekit.writers.plots import save_figure
from odekit.writers.tables import ReportTable


@dataclass(frozen=True)
class ASNetRunResult(RunResult):
    """The ASNet (``.model``; None for an analysis only), the layer analyses and the measurements."""

    model: nn.Module | None = None
    built: ASNetResult | None = None
    analyses: list[LayerAnalysis] = field(default_factory=list)
    meta: ModelMeta | None = None
    input_shape: tuple[int, ...] = ()
    probe: torch.Tensor | None = None
    eps: float = 0.05
    baselines: bool = True
    onnx: OnnxDeployment | None = None  # export="onnx": the ASNet as ONNX, checked and timed

    def write_outputs(self, claim: Claim, force: bool) -> dict[str, Any]:
        """asnet.safetensors (asnet.pt2 for a teacher no registry entry rebuilds), spectrum.png
        and baselines.png; the reload check's difference goes to the report."""
        written: dict[str, Any] = {}
        if self.built is not None and self.model is not None and self.meta is not None and self.probe is not None:
            path = claim(model_file("asnet", self.built.registered))
            diff, _ = save_derived_model(path, self.model, self.meta, self.input_shape, self.probe, force=force)
            written = {"checkpoint": str(path), "reload_max_abs_diff": diff}
        if self.onnx is not None:
            onnx_path = claim("asnet.onnx")
            atomic_write_bytes(onnx_path, self.onnx.model_bytes, force)
            written["onnx_path"] = str(onnx_path)
        if self.built is not None and self.built.history is not None:
            history_path = claim(FINETUNE_PLOT)
            title = f"ASNet cut {self.built.cut.cut.index}: fine-tuning"
            save_figure(history_figure(self.built.history, title), history_path, force=force)
            written["finetune"] = {**self.results.get("finetune", {}), "plot": str(history_path)}
        used = (self.built.cut.cut.index, self.built.cut.rank) if self.built is not None else None
        save_figure(spectrum_figure(self.analyses, self.eps, used), claim("spectrum.png"), force=force)
        if self.baselines:
            save_figure(baselines_figure(self.analyses, self.results), claim("baselines.png"), force=force)
        return written


def asnet(
    model: ModelLike,
    data: Any = None,
    *,
    cut: Any = None,
    rank: int | str | None = None,
    analyze: bool = False,
    layers: Any = None,
    energy_tol: float = 0.05,
    degree: int = 2,
    sketch_size: int | None = None,
    fit_samples: int | None = None,
    ridge: float = 0.0,
    finetune: int = 0,
    beta: float = DISTILLATION_BETA,
    lr: float = FINETUNE_LR,
    head_lr: float | None = None,
    sparse: bool = False,
    l1: float = 1.0,
    baselines: bool = True,
    latency: bool = True,
    batch_size: int = STREAM_BATCH_SIZE,
    test: Any = None,
    normalization: tuple[list[float], list[float]] | None = None,
    export: str | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool | Progress | None = None,
    **more: Any,
) -> ASNetRunResult:
    """Cut ``model`` after layer ``cut`` (a module, its name or index) and replace the rest by an
    active-subspace layer and a polynomial chaos expansion (ASNet); ``analyze``/``layers`` study
    the active neurons of layers. Other `ASNetSettings` fields are passed on when given.
    Returns an `ASNetRunResult`: ``.model``, ``.to_dict()``, ``.save(folder)``."""
    loaded = as_loaded(model)
    dataset = as_dataset(data, loaded, test=test, normalization=normalization)
    shape = tuple(loaded.input_shape or dataset.input_shape)
    cut_spec = layer_spec(cut, loaded.model, shape, "cut")
    layer_list = layer_spec(layers, loaded.model, shape)
    analyze = analyze or layer_list is not None
    check_request(analyze, cut_spec, finetune, sparse, rank, export)
    parsed_rank = parse_rank(str(rank)) if rank is not None else None
    sub = SubspaceSettings(eps=energy_tol, sketch_size=sketch_size if sketch_size is not None else default_sketch_size(parsed_rank),
                           samples=fit_samples, batch_size=batch_size, seed=seed)  # fmt: skip
    settings = None
    if cut_spec is not None:
        settings = ASNetSettings(cut=cut_spec, rank=parsed_rank, degree=degree, ridge=ridge, finetune_epochs=finetune, lr=lr,
                                 head_lr=head_lr, beta=beta, sparse=sparse, l1=l1, baselines=baselines, latency=latency,
                                 subspace=sub, **more)  # fmt: skip
    elif more:
        raise UsageError(f"asnet() takes `{sorted(more)[0]}` only with `cut`", "give cut=LAYER")
    params = {"analyze": analyze, "layers": layer_list, "cut": cut_spec, "rank": None if rank is None else str(rank),
              "eps": energy_tol, "degree": degree, "sketch_size": sketch_size, "samples": fit_samples, "ridge": ridge,
              "finetune": finetune, "beta": beta, "lr": lr, "head_lr": head_lr, "sparse": sparse, "l1": l1,
              "baselines": baselines, "latency": latency, "batch_size": batch_size,
              "data": data if isinstance(data, str | type(None)) else None, **more}  # fmt: skip
    seed_everything(seed)
    with shown(progress) as bars:
        return run_asnet(loaded, dataset, settings, sub, resolve_device(device), analyze=analyze, layers=layer_list,
                         baselines=baselines, params=params, progress=bars, export=check_export_format(export))  # fmt: skip


def check_request(analyze: bool, cut: str | None, finetune: int, sparse: bool, rank: Any, export: str | None = None) -> None:
    """Something to do, and no build options without a build."""
    if not analyze and cut is None:
        raise UsageError("nothing to do", "give `cut` to build an ASNet and/or `analyze` to study layers")
    if cut is None and (finetune or sparse or rank is not None):
        raise UsageError("`rank`, `finetune` and `sparse` belong to an ASNet build", "add `cut`")
    if cut is None and export is not None:
        raise UsageError("`export` writes the ASNet that `cut` builds", "add `cut`")


def run_asnet(
    loaded: LoadedModel,
    dataset: Dataset,
    settings: ASNetSettings | None,
    sub: SubspaceSettings,
    device: torch.device,
    *,
    analyze: bool,
    layers: str | None,
    baselines: bool,
    params: dict[str, Any],
    inputs: dict[str, Any] | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    dist: Distributed | None = None,
    export: str | None = None,
) -> ASNetRunResult:
    """The layer analyses and/or the ASNet build of ``loaded`` (the CLI and `asnet` share this)."""
    shape = tuple(loaded.input_shape or dataset.input_shape)
    results: dict[str, Any] = {}
    tables: list[ReportTable] = []
    headline: list[str] = []
    analyses: list[LayerAnalysis] = []
    built, meta, onnx = None, None, None
    if analyze:
        chain = cut_model(loaded.model, shape)
        analyses = analyze_layers(chain, layers, dataset, sub, device, logreg=baselines, progress=progress, dist=dist)
        results["layers"] = [a.to_dict() for a in analyses]
        tables.append(_layer_table(analyses))
    if settings is not None:
        built = build_asnet_from_teacher(
            loaded.model, loaded.meta.arch, loaded.meta.args, shape, dataset, settings, device,
            progress=progress, log=log, dist=dist,
        )  # fmt: skip
        meta = _asnet_meta(built, loaded)
        results.update(built.to_dict())
        if not any(a.cut.index == built.cut_analysis.cut.index for a in analyses):
            analyses.append(built.cut_analysis)
        tables += _asnet_tables(built)
        headline.append(_asnet_headline(built))
        if built.history is not None:
            headline.append(built.history.summary())
            tables.append(history_table(built.history))
        if export == "onnx":
            example = dataset.test.x[:sub.batch_size] if len(dataset.test) else dataset.train.x[:sub.batch_size]
            onnx = deploy_onnx(built.model, shape, example, teacher=loaded.model)
            results["onnx"] = onnx.to_dict()
            tables.append(onnx.table("ASNet"))
            headline.append(onnx_headline(onnx))
    results["active_neurons"] = {str(a.cut.index): a.subspace.active_neurons(sub.eps) for a in analyses}
    results.setdefault("warnings", [])
    headline.append(
        f"active neurons at eps = {sub.eps}: "
        + ", ".join(f"layer {a.cut.index}: {a.subspace.active_neurons(sub.eps)} of {a.cut.features}" for a in analyses)
    )
    probe = dataset.test.x[:RELOAD_PROBE] if len(dataset.test) else dataset.train.x[:RELOAD_PROBE]
    return ASNetRunResult(
        command="asnet", results=results, inputs=inputs if inputs is not None else inputs_of(loaded, dataset),
        params=params, tables=tables, headline=headline, device=str(device), model=built.model if built else None,
        built=built, analyses=analyses, meta=meta, input_shape=shape, probe=probe.to(device), eps=sub.eps,
        baselines=baselines, onnx=onnx,
    )  # fmt: skip


def _asnet_meta(built: ASNetResult, loaded: LoadedModel) -> ModelMeta:
    """The ASNet's metadata: the teacher's, with this build as a history step."""
    compared = built.comparison
    step = {
        "command": "asnet",
        "cut": built.cut.cut.index,
        "rank": built.cut.rank,
        "degree": built.cut.degree,
        "finetune_epochs": built.finetune.epochs,
        "sparse": built.finetune.sparse,
        "test_accuracy": compared.student.accuracy,
    }
    meta = loaded.meta.derived("asnet", built.args, step, source=loaded.sha256)
    meta.extra = {"test_accuracy": compared.student.accuracy, "teacher_accuracy": compared.teacher.accuracy}
    return meta


def _asnet_headline(built: ASNetResult) -> str:
    compared = built.comparison
    return (
        f"ASNet({built.cut.cut.index}), r = {built.cut.rank}: accuracy {100 * compared.student.accuracy:.2f}% "
        f"(teacher {100 * compared.teacher.accuracy:.2f}%, before fine-tuning "
        f"{100 * (compared.student_before or 0.0):.2f}%), storage {compared.storage_reduction:.2f}x smaller, "
        f"FLOPs {compared.flop_reduction:.2f}x fewer"
    )


def _layer_table(analyses: list[LayerAnalysis]) -> ReportTable:
    rows = [
        [a.cut.index, a.cut.alias, a.cut.features, a.subspace.active_neurons(a.eps), a.subspace.active_neurons_eq612(a.eps),
         a.logreg_accuracy if a.logreg_accuracy is not None else "-", a.subspace.covariance_error_rel]
        for a in analyses
    ]  # fmt: skip
    return ReportTable(
        "Active neurons per layer",
        ["layer", "alias", "n_l", "active (eq. 6.17)", "active (eq. 6.12)", "LR accuracy", "sketch cov. err (rel)"],
        rows,
    )


BASELINE_LABELS = {
    "as_pce": "AS + PCE (ASNet, no fine-tuning)",
    "pca_pce": "PCA + PCE",
    "as_logreg": "AS + logistic regression",
    "pca_logreg": "PCA + logistic regression",
    "logreg_features": "logistic regression on all n_l features",
}


def _asnet_tables(built: ASNetResult) -> list[ReportTable]:
    compared, split = built.comparison, built.split
    teacher, asnet = compared.teacher, compared.student
    teacher_accuracy = accuracy_text(teacher.accuracy, teacher.n)
    asnet_accuracy = accuracy_text(asnet.accuracy, asnet.n)

    def cost(part: ModelCost) -> list[Any]:  # storage MB (4 digits, as in report.json), FLOPs, params
        d = part.to_dict()
        return [d["storage_mb"], d["flops"], d["params"]]

    split_dict = split.to_dict()
    rows = [
        ["teacher", teacher_accuracy, *cost(teacher.cost), "-", "-"],
        ["teacher post-model", "-", *cost(split.teacher_post_model), "-", "-"],
        ["ASNet pre-model", "-", *cost(split.pre_model), "-", "-"],
        ["ASNet AS+PCE", "-", *cost(split.as_pce), split_dict["post_storage_reduction"], split_dict["post_flop_reduction"]],
        ["ASNet overall", asnet_accuracy, *cost(asnet.cost), compared.storage_reduction, compared.flop_reduction],
    ]
    sparse = built.sparse_cost
    if sparse is not None:
        teacher_cost = teacher.cost.to_dict()
        rows.append(["ASNet-s (non-zeros)", asnet_accuracy, sparse.storage_mb_nonzero, sparse.flops_nonzero,
                     sparse.nonzero_params, teacher_cost["storage_mb"] / max(sparse.storage_mb_nonzero, 1e-12),
                     teacher_cost["flops"] / max(sparse.flops_nonzero, 1)])  # fmt: skip
    return [
        ReportTable(
            "Storage and FLOPs (thesis table 6.2 layout; FLOPs = 2 x MACs)",
            ["part", "accuracy [Wilson 95%] n", "storage MB", "FLOPs", "params", "storage x", "FLOPs x"],
            rows,
        ),
        ReportTable(
            f"Baselines at r = {built.cut.rank} (test accuracy, no fine-tuning)",
            ["method", "accuracy"],
            [[BASELINE_LABELS[key], value] for key, value in built.baselines.accuracies().items()],
        ),
    ]
