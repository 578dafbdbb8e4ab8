"""The VarPro side of `odekit train-ode`: --task regress, --optimizer gnvpro|slimtrain, --compare.

train_ode.py parses the options and hands them here as a `SeparableOptions`; this module reads
them into `methods.varpro.job.SeparableJobSettings`, runs the job, and writes model.safetensors,
convergence.png and the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from odekit.cli.runner import DEFAULT_RUNS_DIR, CommandContext, CommandOutput, ResultTable
from odekit.errors import UsageError
from odekit.io.checkpoints import LoadedModel, save_model
from odekit.methods.varpro.job import (
    SeparableJobResult,
    SeparableJobSettings,
    optimizer_names,
    run_separable_job,
)
from odekit.methods.varpro.training import VarProResult
from odekit.writers.plots import new_figure, save_figure

CURVE_STYLE = {"gnvpro": "tab:red", "slimtrain": "tab:purple", "adam": "tab:blue", "sgd": "tab:green"}


@dataclass(frozen=True)
class SeparableOptions:
    task: str
    data: str | None
    data_dir: str | None
    model: str | None
    width: int | None
    depth: int
    activation: str | None
    solver: str | None
    steps: int | None
    t1: float
    optimizer: str
    compare: str | None
    regularization: str
    levels: int
    krylov_rank: int
    radius: float
    work_units: float | None
    iters: int | None
    epochs: int | None
    batch_size: int
    lr: float
    samples: int
    seed: int


def _alphas(text: str) -> tuple[float, float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or any(not math.isfinite(v) or v < 0 for v in values):
        raise UsageError(f"cannot read --regularization '{text}'", "give alpha_theta,alpha_W >= 0, e.g. 1e-3,1e-3")
    return values[0], values[1]


def _plot(path: Path, results: dict[str, VarProResult], metric: str, force: bool) -> None:
    fig, axes = new_figure(2, 1, (5.0, 3.6))
    for name, res in results.items():
        units = [h["work_units"] for h in res.history]
        color = CURVE_STYLE.get(name)
        axes[0][0].semilogy(units, [max(h["train_loss"], 1e-300) for h in res.history], "o-", ms=3, color=color, label=name)
        axes[0][1].plot(units, [h[metric] for h in res.history], "o-", ms=3, color=color, label=name)
    axes[0][0].set_ylabel("training loss")
    axes[0][1].set_ylabel(metric.replace("_", " "))
    if metric == "test_rel_error":
        axes[0][1].set_yscale("log")
    for ax in axes[0]:
        ax.set_xlabel("work units (forward + backward over the training set = 2)")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path, force)


def run_separable(ctx: CommandContext, o: SeparableOptions, loaded: LoadedModel | None) -> CommandOutput:
    """Train with every optimizer asked for; save the first one's model; plot all curves."""
    model_path, plot_path = ctx.path("model.safetensors"), ctx.path("convergence.png")
    alpha_theta, alpha_w = _alphas(o.regularization)
    data_dir = Path(o.data_dir) if o.data_dir else (DEFAULT_RUNS_DIR / "cache" if o.task == "regress" else None)
    settings = SeparableJobSettings(
        task=o.task, optimizers=optimizer_names(o.optimizer, o.compare), data=o.data, data_dir=data_dir, model=o.model,
        width=o.width, depth=o.depth, activation=o.activation, solver=o.solver, steps=o.steps, t1=o.t1,
        alpha_theta=alpha_theta, alpha_w=alpha_w, levels=o.levels, krylov_rank=o.krylov_rank, radius=o.radius,
        work_units=o.work_units, iters=o.iters, epochs=o.epochs, batch_size=o.batch_size, lr=o.lr, data_size=o.samples,
        seed=o.seed,
    )  # fmt: skip
    result = run_separable_job(settings, loaded, ctx.device, progress=ctx.progress)
    ctx.inputs["data"] = result.data_info
    save_model(model_path, result.model, result.meta, force=ctx.force)
    _plot(plot_path, result.runs, result.metric, ctx.force)
    return _output(result, model_path, plot_path)


def _output(result: SeparableJobResult, model_path: Path, plot_path: Path) -> CommandOutput:
    main, metric, name = result.main, result.metric, result.optimizer
    out = {**result.to_dict(), "model": str(model_path), "plots": [str(plot_path)]}
    value = main.final_metrics.get(metric, float("nan"))
    headline = [f"{result.arch} on {result.data_name} with {name}: {metric} {value:.4g} after {main.work_units:.0f} work units, "
                f"{main.train_seconds:.1f} s", f"Model: {model_path}", f"Convergence: {plot_path}"]  # fmt: skip
    rows = [[n, r.final_metrics.get(metric, float("nan")), r.final_metrics.get("train_loss", float("nan")),
             round(r.work_units, 1), round(r.train_seconds, 2)] for n, r in result.runs.items()]  # fmt: skip
    tables = [ResultTable("Optimizers", ["optimizer", metric, "train_loss", "work_units", "seconds"], rows)]
    columns = ["level", "iteration", "work_units", "seconds", "train_loss", "test_loss", metric]
    tables.append(ResultTable(f"History ({name})", columns, [[h.get(c, float("nan")) for c in columns] for h in main.history]))
    return CommandOutput(results=out, tables=tables, headline=headline)
