"""The VarPro side of `odekit train-ode`: --task regress, --optimizer gnvpro|slimtrain, --compare.

train_ode.py parses the options and hands them here as a `SeparableOptions`; this module
loads the data, builds (or resumes) a separable model, runs every optimizer asked for from
the same initial weights, and writes model.safetensors, convergence.png and the report.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from odekit.cli.runner import DEFAULT_RUNS_DIR, CommandContext, CommandOutput, ResultTable
from odekit.errors import UsageError
from odekit.io.cdr import RegressionData, load_regression
from odekit.io.checkpoints import LoadedModel, ModelMeta, save_model
from odekit.io.datasets import load_dataset
from odekit.methods.varpro.task import SeparableTask
from odekit.methods.varpro.training import (
    VARPRO_OPTIMIZERS,
    VarProResult,
    VarProSettings,
    fold_target_scaling,
    train_separable,
)
from odekit.models import build_model
from odekit.models.antisym import antisym_args
from odekit.ode import SolverConfig
from odekit.writers.plots import new_figure, save_figure

SEPARABLE_OPTIMIZERS = ("gnvpro", "slimtrain")
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


def wants_separable(task: str, model: str | None, optimizer: str, compare: str | None, levels: int) -> bool:
    """Whether train-ode takes the VarPro path (the other path trains ODENets with Adam/SGD)."""
    return (task == "regress" or optimizer.strip().lower() in SEPARABLE_OPTIMIZERS or bool(compare)
            or (model or "").strip().lower() == "odenet_antisym" or levels > 1)  # fmt: skip


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


def _optimizers(main: str, compare: str | None) -> list[str]:
    names = [VARPRO_OPTIMIZERS.entry(main).name]
    for name in (compare or "").split(","):
        if name.strip():
            key = VARPRO_OPTIMIZERS.entry(name.strip()).name
            if key not in names:
                names.append(key)
    return names


def _task(o: SeparableOptions, loaded: LoadedModel | None) -> tuple[SeparableTask, Any, RegressionData | None]:
    norm = loaded.meta.normalization if loaded else None
    if o.task == "regress":
        cache = Path(o.data_dir) if o.data_dir else DEFAULT_RUNS_DIR / "cache"
        reg = load_regression(o.data or "cdr", cache_dir=cache, samples=o.samples, seed=0, normalization=norm)
        tm, ts = torch.tensor(reg.target_mean), torch.tensor(reg.target_std)
        task = SeparableTask("ls", reg.x_train, (reg.c_train - tm) / ts, reg.x_test, (reg.c_test - tm) / ts, reg.num_outputs)
        return task, reg, reg
    ds = load_dataset(o.data or "digits", data_dir=o.data_dir, input_shape=loaded.meta.input_shape if loaded else None, normalization=norm)
    return SeparableTask("ce", ds.train.x, ds.train.y, ds.test.x, ds.test.y, ds.num_classes), ds, None


def _build(o: SeparableOptions, data: Any, num_outputs: int) -> tuple[str, dict[str, Any], nn.Module]:
    arch = (o.model or "odenet_antisym").strip().lower()
    if arch != "odenet_antisym":
        raise UsageError(f"the VarPro path builds odenet_antisym, not '{o.model}'",
                         "use --model odenet_antisym, or --resume any odekit checkpoint whose last layer is nn.Linear")  # fmt: skip
    depth = o.depth
    solver = SolverConfig(solver=o.solver or "rk4", steps=o.steps if o.steps is not None else depth, t1=o.t1)
    args = {"in_features": int(math.prod(data.input_shape)), "out_features": num_outputs, "width": o.width or 16,
            "depth": depth, "t1": o.t1, "activation": o.activation or "tanh", "solver": solver.to_dict()}  # fmt: skip
    return arch, args, build_model(arch, args)


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
    if o.task not in ("regress", "classify"):
        raise UsageError(f"--task {o.task} has no VarPro training", "use --task regress or --task classify")
    model_path, plot_path = ctx.path("model.safetensors"), ctx.path("convergence.png")
    alpha_theta, alpha_w = _alphas(o.regularization)
    names = _optimizers(o.optimizer, o.compare)
    task, data, reg = _task(o, loaded)
    if loaded is not None:
        arch, args, net = loaded.meta.arch, dict(loaded.meta.args), loaded.model
        if reg is not None:  # the checkpoint outputs original units; train on standardised targets
            fold_target_scaling(net, [-m / s for m, s in zip(reg.target_mean, reg.target_std, strict=True)], [1 / s for s in reg.target_std])
    else:
        arch, args, net = _build(o, data, task.num_outputs)
    ctx.inputs["data"] = data.describe()
    loss = "ls" if o.task == "regress" else "ce"
    results: dict[str, VarProResult] = {}
    trained: nn.Module | None = None
    for name in names:
        settings = VarProSettings(
            optimizer=name, loss=loss, iters=o.iters or 30, epochs=o.epochs or 50, batch_size=o.batch_size, lr=o.lr,
            alpha_theta=alpha_theta, alpha_w=alpha_w, krylov_rank=o.krylov_rank, radius=o.radius, levels=o.levels,
            max_work_units=o.work_units, seed=o.seed,
        )  # fmt: skip
        torch.manual_seed(o.seed)
        model, res = train_separable(copy.deepcopy(net), task, settings, ctx.device, progress=ctx.progress)
        results[name] = res
        if trained is None:
            trained = model
    assert trained is not None
    trained = trained.cpu().float()
    if arch == "odenet_antisym":
        args = antisym_args(trained)  # type: ignore[arg-type]
    if reg is not None:
        fold_target_scaling(trained, reg.target_mean, reg.target_std)
    metric = "test_rel_error" if loss == "ls" else "test_accuracy"
    main = results[names[0]]
    step = {"command": "train-ode", "task": o.task, "optimizer": names[0], "work_units": main.work_units,
            "final_metrics": main.final_metrics, "regularization": [alpha_theta, alpha_w], "levels": main.levels}  # fmt: skip
    meta = ModelMeta(
        arch=arch, args=args, num_classes=task.num_outputs if loss == "ce" else None, input_shape=list(data.input_shape),
        normalization=data.normalization(), dataset=data.describe(),
        history=[*(loaded.meta.history if loaded else []), step], source_sha256=loaded.sha256 if loaded else None,
        extra={"task": o.task, "optimizer": names[0], "num_outputs": task.num_outputs, **main.final_metrics},
    )  # fmt: skip
    save_model(model_path, trained, meta, force=ctx.force)
    _plot(plot_path, results, metric, ctx.force)
    return _output(o, arch, args, names, results, metric, data.describe()["name"], model_path, plot_path)


def _output(o: SeparableOptions, arch: str, args: dict[str, Any], names: list[str], results: dict[str, VarProResult],
            metric: str, data_name: str, model_path: Path, plot_path: Path) -> CommandOutput:  # fmt: skip
    main = results[names[0]]
    summary = {name: {"final_metrics": r.final_metrics, "work_units": r.work_units, "train_seconds": r.train_seconds,
                      "levels": r.levels, "history": r.history} for name, r in results.items()}  # fmt: skip
    out = {
        "task": o.task, "arch": arch, "model_args": args, "data": data_name, "optimizer": names[0],
        "final_metrics": main.final_metrics, "work_units": main.work_units, "train_seconds": main.train_seconds,
        "levels": main.levels, "history": main.history, "optimizers": summary,
        "work_unit_convention": "forward or backward (vjp/jvp) pass over the training set = 1; gnvpro: 2 + 2r per outer iteration",
        "model": str(model_path), "plots": [str(plot_path)],
    }  # fmt: skip
    value = main.final_metrics.get(metric, float("nan"))
    headline = [f"{arch} on {data_name} with {names[0]}: {metric} {value:.4g} after {main.work_units:.0f} work units, "
                f"{main.train_seconds:.1f} s", f"Model: {model_path}", f"Convergence: {plot_path}"]  # fmt: skip
    rows = [[n, r.final_metrics.get(metric, float("nan")), r.final_metrics.get("train_loss", float("nan")),
             round(r.work_units, 1), round(r.train_seconds, 2)] for n, r in results.items()]  # fmt: skip
    tables = [ResultTable("Optimizers", ["optimizer", metric, "train_loss", "work_units", "seconds"], rows)]
    columns = ["level", "iteration", "work_units", "seconds", "train_loss", "test_loss", metric]
    tables.append(ResultTable(f"History ({names[0]})", columns, [[h.get(c, float("nan")) for c in columns] for h in main.history]))
    return CommandOutput(results=out, tables=tables, headline=headline)
