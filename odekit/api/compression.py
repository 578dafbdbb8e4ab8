"""`odekit.reduce`: reduced-order (RON) compression of a model, as one call with a typed result."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from odekit.api.defaults import DISTILLATION_BETA, FINETUNE_LR, LATENCY_BATCH, STREAM_BATCH_SIZE
from odekit.api.finetune_report import FINETUNE_PLOT, history_figure, history_table
from odekit.api.inputs import ModelLike, as_dataset, as_loaded, layer_spec
from odekit.api.onnx_export import OnnxDeployment, check_export_format, deploy_onnx, onnx_headline
from odekit.api.progress import shown
from odekit.api.reduce_channel import (
    archive_cost,
    channel_report,
    registered_meta,
    speed_text,
    summary_table,
)
from odekit.api.results import RELOAD_PROBE, Claim, RunResult, model_file, save_derived_model
from odekit.device import resolve_device, seed_everything
from odekit.distributed import Distributed, current
from odekit.errors import UsageError
from odekit.io.datasets import Dataset
from odekit.io.model_meta import LoadedModel, ModelMeta
from odekit.methods.ron import (
    RON_ARCH,
    RonLayerReport,
    RonResult,
    RonRun,
    RonSettings,
    reduce_teacher,
)
from odekit.methods.ron.settings import parse_target_flops
from odekit.methods.training import TrainSettings
from odekit.models.registry import ARCHITECTURES
from odekit.progress import Progress
from odekit.writers.atomic import atomic_write_bytes
from odekit.writers.plots import save_figure
from odekit.writers.tables import ReportTable


@dataclass(frozen=True)
class ReduceResult(RunResult):
    """A compressed student, how it compares with its teacher, and how it was built."""

    student: nn.Module | None = None
    run: RonRun | None = None
    meta: ModelMeta | None = None
    input_shape: tuple[int, ...] = ()
    probe: torch.Tensor | None = None
    registered: bool = False  # `odekit.load` rebuilds the student from safetensors + metadata
    onnx: OnnxDeployment | None = None  # export="onnx": the student as ONNX, checked and timed

    def write_outputs(self, claim: Claim, force: bool) -> dict[str, Any]:
        """student.safetensors (student.pt2 for a teacher no registry entry rebuilds; a channel
        student of a registered teacher gets both), singular_values.png (region mode) and
        finetune_history.png; the reload checks' differences go to the report."""
        assert self.student is not None and self.meta is not None and self.run is not None and self.probe is not None
        student_path = claim(model_file("student", self.registered))
        reload_diff, reloaded = save_derived_model(student_path, self.student, self.meta, self.input_shape, self.probe, force=force)
        written: dict[str, Any] = {"reload_max_abs_diff": reload_diff, "student_checkpoint": str(student_path)}
        build = self.run.build
        if isinstance(build, RonResult):
            plot_path = claim("singular_values.png")
            save_figure(singular_value_figure(build.layers, build.first_layer, build.last_layer), plot_path, force=force)
            written["singular_value_plot"] = str(plot_path)
        else:
            written.update(archive_cost(reloaded, self.input_shape))
            if self.registered:  # the same student as a self-contained program (torch.export.load alone)
                program_path = claim("student.pt2")
                program_diff, _ = save_derived_model(program_path, self.student, self.meta, self.input_shape, self.probe, force=force)
                written.update(student_program=str(program_path), program_reload_max_abs_diff=program_diff)
        history_path = claim(FINETUNE_PLOT)
        span = f" layers {build.first_layer}-{build.last_layer}" if isinstance(build, RonResult) else " (channel mode)"
        title = f"reduce{span}: fine-tuning"
        save_figure(history_figure(self.run.history, title), history_path, force=force)
        written["finetune"] = {**self.results.get("finetune", {}), "plot": str(history_path)}
        if self.onnx is not None:
            onnx_path = claim("student.onnx")
            atomic_write_bytes(onnx_path, self.onnx.model_bytes, force)
            written["onnx_path"] = str(onnx_path)
        return written


def reduce(
    model: ModelLike,
    data: Any = None,
    *,
    layers: Any = None,
    rank: str | int = "vbmf",
    target_flops: float | str | None = None,
    mode: str | None = None,
    oversample: float = 1.5,
    fit_samples: int | None = None,
    sketch_size: int | None = None,
    finetune: int = 0,
    lr: float = FINETUNE_LR,
    beta: float = DISTILLATION_BETA,
    latency_batch: int = LATENCY_BATCH,
    batch_size: int = STREAM_BATCH_SIZE,
    test: Any = None,
    normalization: tuple[list[float], list[float]] | None = None,
    export: str | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool | Progress | None = None,
    **more: Any,
) -> ReduceResult:
    """Compress ``model`` into a reduced-order network and compare it with the teacher.

    ``layers``: module objects, names or the CLI's strings ("3-8", "conv3-conv8"); a tuple
    ``(first, last)`` is a range. ``target_flops``/``mode`` and any other settings of
    `RonSettings` (``max_drop``, ``reconstruct``...) or of `TrainSettings` (``patience``,
    ``val_fraction``...) are passed on when given. Returns a `ReduceResult`: ``.student``,
    ``.to_dict()`` (report.json's results), ``.save(folder)`` (what `odekit reduce` writes).
    ``export="onnx"`` also exports the student to ONNX, checked in onnxruntime and timed."""
    loaded = as_loaded(model)
    dataset = as_dataset(data, loaded, test=test, normalization=normalization)
    given = {"mode": mode, "target_flops": parse_target_flops(target_flops), **more}
    ron_extra, train_extra = _route({k: v for k, v in given.items() if v is not None})
    spec = layer_spec(layers, loaded.model, loaded.input_shape or dataset.input_shape)
    settings = RonSettings(layers=spec, rank=str(rank), oversample=oversample, samples=fit_samples,  # type: ignore[arg-type]
                           sketch_size=sketch_size, batch_size=batch_size, **ron_extra)  # fmt: skip
    train = TrainSettings(epochs=finetune, lr=lr, batch_size=min(batch_size, 128), beta=beta, seed=seed, **train_extra)
    params = {"layers": spec, "rank": str(rank), "oversample": oversample, "samples": fit_samples,
              "sketch_size": sketch_size, "finetune": finetune, "lr": lr, "beta": beta,
              "latency_batch": latency_batch, "batch_size": batch_size,
              "data": data if isinstance(data, str | type(None)) else None, **ron_extra, **train_extra}  # fmt: skip
    seed_everything(seed)
    with shown(progress) as bars:
        return run_reduce(loaded, dataset, settings, train, resolve_device(device), latency_batch=latency_batch,
                          seed=seed, params=params, progress=bars, export=check_export_format(export))  # fmt: skip


def _route(extra: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split extra keyword arguments into RonSettings and TrainSettings fields."""
    ron_fields = {f.name for f in fields(RonSettings)}
    train_fields = {f.name for f in fields(TrainSettings)}
    unknown = sorted(set(extra) - ron_fields - train_fields)
    if unknown:
        raise UsageError(f"reduce() takes no `{unknown[0]}`", "see help(odekit.reduce) for its parameters")
    return ({k: v for k, v in extra.items() if k in ron_fields}, {k: v for k, v in extra.items() if k in train_fields})


def inputs_of(loaded: LoadedModel, dataset: Dataset) -> dict[str, Any]:
    """The report's inputs for a model and data given in Python (the CLI records its own)."""
    return {
        "checkpoint": {"path": str(loaded.path), "sha256": loaded.sha256, "format": loaded.format, "arch": loaded.meta.arch},
        "data": {**dataset.describe(), "normalization": dataset.normalization()},
    }


def run_reduce(
    loaded: LoadedModel,
    dataset: Dataset,
    settings: RonSettings,
    train: TrainSettings,
    device: torch.device,
    *,
    latency_batch: int,
    seed: int,
    params: dict[str, Any],
    inputs: dict[str, Any] | None = None,
    progress: Progress | None = None,
    dist: Distributed | None = None,
    export: str | None = None,
) -> ReduceResult:
    """Build, fine-tune and measure the student of ``loaded`` (the CLI and `reduce` share this)."""
    dist = dist or current()
    shape = tuple(loaded.input_shape or dataset.input_shape)
    example = dataset.test.x[:latency_batch]
    if example.shape[0] == 0:
        example = dataset.train.x[:latency_batch]
    run = reduce_teacher(
        loaded.model, loaded.meta.arch, loaded.meta.args, shape, dataset, settings, train, device,
        example, distill=train.beta > 0, seed=seed, progress=progress, dist=dist,
    )  # fmt: skip
    probe = example[:RELOAD_PROBE].to(device)
    if run.mode == "channel":
        results, tables, headline, meta = channel_report(run, loaded, shape, params.get("target_flops"))
        rebuilt = registered_meta(run.student, loaded, meta, probe)
        registered, meta = rebuilt is not None, rebuilt or meta
    else:
        results, tables, headline, meta = _region_report(run, loaded, settings, train, dist)
        registered = loaded.meta.arch in ARCHITECTURES
    results["finetune_history"] = run.history.epochs
    results["finetune"] = run.history.to_dict()
    results["units"] = {
        "accuracy": "fraction in [0, 1]",
        "flops": "2 x multiply-adds per sample",
        "latency_ms": f"median ms per batch of {int(example.shape[0])} on {device}, teacher and student interleaved",
        "mean_kl": "nats, KL(teacher || student) averaged over the test split",
    }
    if train.epochs > 0:
        tables.append(history_table(run.history))
        headline.append(run.history.summary())
    onnx = deploy_onnx(run.student, shape, example, teacher=loaded.model) if export == "onnx" else None
    if onnx is not None:
        results["onnx"] = onnx.to_dict()
        tables.append(onnx.table("student"))
        headline.append(onnx_headline(onnx))
    return ReduceResult(
        command="reduce", results=results, inputs=inputs if inputs is not None else inputs_of(loaded, dataset),
        params=params, tables=tables, headline=headline, device=str(device),
        student=run.student, run=run, meta=meta, input_shape=shape, probe=probe,
        registered=registered, onnx=onnx,
    )  # fmt: skip


def _region_report(
    run: RonRun, loaded: LoadedModel, settings: RonSettings, train: TrainSettings, dist: Distributed
) -> tuple[dict[str, Any], list[ReportTable], list[str], ModelMeta]:
    """report.json entries, tables, headline and the student's metadata of a region (RON) student."""
    result, compared = run.build, run.comparison
    assert isinstance(result, RonResult)
    span = f"{result.first_layer}-{result.last_layer}"
    step = {"command": "reduce", "layers": span, "rank": settings.rank, "ranks": result.ranks,
            "oversample": settings.oversample, "finetune_epochs": train.epochs,
            "kept_epoch": run.history.best_epoch, "test_accuracy": compared.student.accuracy}  # fmt: skip
    meta = loaded.meta.derived(RON_ARCH, result.args, step, source=loaded.sha256)
    meta.extra = {"test_accuracy": compared.student.accuracy, "teacher_accuracy": compared.teacher.accuracy}
    results: dict[str, Any] = {
        **compared.to_dict("reduce"),
        "ranks": result.ranks,
        "rows": [layer.rows for layer in result.layers],
        "layers": [_layer_json(layer) for layer in result.layers],
        "modified_layers": span,
        "samples": result.n_samples,
        "distributed": _distributed_json(dist, result),
    }
    return results, _tables(run), _headline(run, span), meta


def clipped_states(run: RonRun) -> list[str]:
    """States whose rank the sketch, not the data, bounded (issue 12)."""
    if not isinstance(run.build, RonResult):
        return []
    return [layer.state for layer in run.build.layers if _at_sketch_limit(layer)]


def _headline(run: RonRun, span: str) -> list[str]:
    compared, result = run.comparison, run.build
    assert isinstance(result, RonResult)
    lines = [
        f"RON layers {span}, ranks {result.ranks}: accuracy {100 * compared.student.accuracy:.2f}% (teacher "
        f"{100 * compared.teacher.accuracy:.2f}%, before fine-tuning {100 * (compared.student_before or 0.0):.2f}%), "
        f"agreement {100 * compared.agreement:.2f}%, {compared.flop_reduction:.2f}x fewer FLOPs, "
        f"{speed_text(run.latency.speedup)}"
    ]
    clipped = clipped_states(run)
    if clipped:
        lines.append(f"ranks clipped by `sketch_size`: {', '.join(clipped)}")
    return lines


def _tables(run: RonRun) -> list[ReportTable]:
    """The reduced layers (eq. 5.18-5.20 diagnostics) and teacher vs student."""
    result = run.build
    assert isinstance(result, RonResult)
    layers = ReportTable(
        "Reduced layers (D: layer output size, R: rank, P: sampled rows; eq. 5.20 factor)",
        ["state", "layers", "D_k", "R_k", "P_k", "pool", "s_R/s_1", "eq. 5.20 factor", "1/s_min(S V) (eq. 5.18)", "residual energy"],
        [
            [r.state, ",".join(r.layers) or "-", r.dim, r.rank, r.rows, "yes" if r.pooled else "-", r.decay,
             r.error_factor, r.amplification, r.residual_energy]
            for r in result.layers
        ],
    )  # fmt: skip
    return [layers, summary_table(run)]


def _distributed_json(dist: Distributed, result: RonResult) -> dict[str, Any]:
    """World size, backend, this (main) rank's streaming rate and each layer's sketch merge."""
    return {
        **dist.describe(),
        "stream_rank0": result.throughput.to_dict() if result.throughput else None,
        "sketch_merges": [m.to_dict() for m in result.merges],
    }


def _layer_json(layer: RonLayerReport) -> dict[str, Any]:
    d = layer.to_dict()
    d["singular_values_normalized"] = d.pop("singular_values")
    d["rank_at_sketch_limit"] = _at_sketch_limit(layer)
    return d


def _at_sketch_limit(layer: RonLayerReport) -> bool:
    """The rank uses every direction a full sketch smaller than the layer holds: `sketch_size`, not the
    data, bounded it (a frequent-directions sketch of l rows keeps at most l - 1 nonzero directions)."""
    rows = len(layer.singular_values)
    nonzero = sum(v > 1e-12 for v in layer.singular_values)
    return rows < layer.dim and nonzero >= rows - 1 and layer.rank >= nonzero


def singular_value_figure(layers: list[RonLayerReport], first: int, last: int) -> Any:
    """Thesis fig. 5.1: each reduced state's sketch spectrum, its chosen rank dotted."""
    from odekit.writers.plots import new_figure

    fig, axes = new_figure(1, 1, (6.5, 4.2))
    ax = axes[0][0]
    for layer in layers:
        s = [v for v in layer.singular_values if v > 1e-12]  # drop numerical zeros (dead units)
        if not s:
            continue
        label = f"{','.join(layer.layers) or layer.state} (D={layer.dim}, R={layer.rank})"
        ax.semilogy(range(1, len(s) + 1), s, label=label)
        if layer.rank <= len(s):
            ax.plot([layer.rank], [s[layer.rank - 1]], "o", color=ax.lines[-1].get_color())
    ax.set_xlabel("index i")
    ax.set_ylabel("sigma_i / sigma_1 (layer outputs, sketch)")
    ax.set_title(f"Singular values of layer outputs, layers {first}-{last} (dots: chosen rank)")
    ax.grid(True, which="both", alpha=0.3)
    if layers:
        ax.legend(fontsize=8)
    return fig

