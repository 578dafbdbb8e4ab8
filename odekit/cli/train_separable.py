"""The VarPro side of `odekit train-ode`: --task regress, --optimizer gnvpro|lbfgs|slimtrain, --compare.

train_ode.py parses the options into a `methods.varpro.job.SeparableJobSettings`; this module
runs the job and writes model.safetensors, convergence.png and the report.
"""

from __future__ import annotations

import math
from pathlib import Path

from odekit.cli.runner import CommandContext, CommandOutput, ResultTable
from odekit.errors import UsageError
from odekit.io.checkpoints import LoadedModel, save_model
from odekit.methods.varpro.job import (
    SeparableJobResult,
    SeparableJobSettings,
    run_separable_job,
)
from odekit.methods.varpro.training import VarProResult
from odekit.writers.plots import new_figure, save_figure

CURVE_STYLE = {"gnvpro": "tab:red", "lbfgs": "tab:orange", "slimtrain": "tab:purple", "adam": "tab:blue", "sgd": "tab:green"}


def parse_regularization(text: str) -> tuple[float, float]:
    """--regularization: alpha_theta,alpha_W (one value sets both)."""
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


def run_separable(ctx: CommandContext, settings: SeparableJobSettings, loaded: LoadedModel | None) -> CommandOutput:
    """Train with every optimizer asked for; save the first one's model; plot all curves."""
    model_path, plot_path = ctx.path("model.safetensors"), ctx.path("convergence.png")
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
    headline += [r.diagnosis["line"] + ("" if n == name else f" [{n}]") for n, r in result.runs.items() if r.diagnosis]
    rows = [[n, r.final_metrics.get(metric, float("nan")), r.final_metrics.get("train_loss", float("nan")),
             round(r.work_units, 1), round(r.train_seconds, 2)] for n, r in result.runs.items()]  # fmt: skip
    tables = [ResultTable("Optimizers", ["optimizer", metric, "train_loss", "work_units", "seconds"], rows)]
    columns = ["level", "iteration", "work_units", "seconds", "train_loss", "test_loss", metric]
    if main.diagnosis:  # per outer iteration: is Gauss-Newton a good model of Phi?
        columns += ["phi_before", "predicted_decrease", "actual_decrease", "ratio", "radius"]
    tables.append(ResultTable(f"History ({name})", columns, [[h.get(c, float("nan")) for c in columns] for h in main.history]))
    return CommandOutput(results=out, tables=tables, headline=headline)
