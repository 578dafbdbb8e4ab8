"""train-ode's VarPro job: --task regress, --optimizer gnvpro|lbfgs|slimtrain, --compare, --levels.

`run_separable_job` loads the data, builds (or continues) a separable model, trains it with
every optimizer asked for from the same initial weights and returns a `SeparableJobResult`:
the first optimizer's model in original target units, its checkpoint metadata and every run.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from odekit.errors import UsageError
from odekit.io.cdr import RegressionData, load_regression
from odekit.io.checkpoints import LoadedModel, ModelMeta
from odekit.io.datasets import Dataset, load_dataset
from odekit.methods.trained import TrainedModelResult
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
from odekit.progress import Progress

SEPARABLE_OPTIMIZERS = ("gnvpro", "slimtrain", "lbfgs")
SEPARABLE_TASKS = ("regress", "classify")
WORK_UNIT_CONVENTION = ("forward or backward (vjp/jvp) pass over the training set = 1; gnvpro: 2 + 2r per outer iteration "
                        "(gmres-subspace: 2 + 2m, a rejected step 1); lbfgs: 2 per evaluation")  # fmt: skip


def wants_separable(task: str, model: str | None, optimizer: str, compare: str | None, levels: int) -> bool:
    """Whether train-ode takes the VarPro path (the other path trains ODENets with Adam/SGD)."""
    return (task == "regress" or optimizer.strip().lower() in SEPARABLE_OPTIMIZERS or bool(compare)
            or (model or "").strip().lower() == "odenet_antisym" or levels > 1)  # fmt: skip


def optimizer_names(main: str, compare: str | None) -> tuple[str, ...]:
    """``main`` then the --compare list (comma-separated), registry names, each once."""
    names = [VARPRO_OPTIMIZERS.entry(main).name]
    for name in (compare or "").split(","):
        if name.strip():
            key = VARPRO_OPTIMIZERS.entry(name.strip()).name
            if key not in names:
                names.append(key)
    return tuple(names)


@dataclass(frozen=True)
class SeparableJobSettings:
    """One VarPro job; ``optimizers[0]`` is the one whose model is kept, the rest are compared."""

    task: str
    optimizers: tuple[str, ...]
    data: str | None = None  # None: cdr (regress) / digits (classify)
    data_dir: Path | None = None  # classify: the image data folder; regress: the CDR cache
    model: str | None = None
    width: int | None = None
    depth: int = 8
    activation: str | None = None
    solver: str | None = None
    steps: int | None = None
    t1: float = 1.0
    alpha_theta: float = 1e-3
    alpha_w: float = 1e-3
    levels: int = 1
    krylov_rank: int = 10
    radius: float | None = None  # None: 0.1 (steihaug) / the full Gauss-Newton step (gmres-subspace)
    tr_solver: str = "steihaug"
    work_units: float | None = None
    iters: int | None = None
    epochs: int | None = None
    batch_size: int = 64
    lr: float = 1e-2
    data_size: int | None = None  # --data cdr / cdr-transient: samples generated [2000 / 800]
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in SEPARABLE_TASKS:
            raise UsageError(f"`task` {self.task} has no VarPro training", "use `task` regress or `task` classify")
        if not self.optimizers:
            raise UsageError("no VarPro optimizer given", "use `optimizer` gnvpro or slimtrain")
        object.__setattr__(self, "optimizers", tuple(VARPRO_OPTIMIZERS.entry(n).name for n in self.optimizers))

    @property
    def loss(self) -> str:
        return "ls" if self.task == "regress" else "ce"

    def varpro_settings(self, optimizer: str) -> VarProSettings:
        return VarProSettings(
            optimizer=optimizer, loss=self.loss, iters=self.iters or 30, epochs=self.epochs or 50, batch_size=self.batch_size,
            lr=self.lr, alpha_theta=self.alpha_theta, alpha_w=self.alpha_w, krylov_rank=self.krylov_rank, radius=self.radius,
            tr_solver=self.tr_solver, levels=self.levels, max_work_units=self.work_units, seed=self.seed,
        )  # fmt: skip


@dataclass(frozen=True)
class SeparableJobResult(TrainedModelResult):
    """The kept model (CPU, float32, original target units), its metadata and every optimizer's run."""

    runs: dict[str, VarProResult]  # optimizer -> run, the kept one first

    @property
    def optimizer(self) -> str:
        return next(iter(self.runs))

    @property
    def main(self) -> VarProResult:
        return self.runs[self.optimizer]

    @property
    def metric(self) -> str:
        return "test_rel_error" if self.task == "regress" else "test_accuracy"

    def to_dict(self) -> dict[str, Any]:
        main = self.main
        summary = {name: {"final_metrics": r.final_metrics, "work_units": r.work_units, "train_seconds": r.train_seconds,
                          "levels": r.levels, "diagnosis": r.diagnosis, "history": r.history} for name, r in self.runs.items()}  # fmt: skip
        return {
            "task": self.task, "arch": self.arch, "model_args": self.model_args, "data": self.data_name,
            "optimizer": self.optimizer, "final_metrics": main.final_metrics, "work_units": main.work_units,
            "train_seconds": main.train_seconds, "levels": main.levels, "diagnosis": main.diagnosis, "history": main.history,
            "optimizers": summary,
            "work_unit_convention": WORK_UNIT_CONVENTION,
        }  # fmt: skip


def _load_task(s: SeparableJobSettings, loaded: LoadedModel | None) -> tuple[SeparableTask, Dataset | RegressionData]:
    norm = loaded.meta.normalization if loaded else None
    if s.task == "regress":
        reg = load_regression(s.data or "cdr", cache_dir=s.data_dir, samples=s.data_size, seed=0, normalization=norm)
        tm, ts = torch.tensor(reg.target_mean), torch.tensor(reg.target_std)
        task = SeparableTask("ls", reg.x_train, (reg.c_train - tm) / ts, reg.x_test, (reg.c_test - tm) / ts, reg.num_outputs)
        return task, reg
    ds = load_dataset(s.data or "digits", data_dir=s.data_dir, input_shape=loaded.meta.input_shape if loaded else None,
                      normalization=norm)  # fmt: skip
    return SeparableTask("ce", ds.train.x, ds.train.y, ds.test.x, ds.test.y, ds.num_classes), ds


def _build(s: SeparableJobSettings, input_shape: tuple[int, ...], num_outputs: int) -> tuple[str, dict[str, Any], nn.Module]:
    arch = (s.model or "odenet_antisym").strip().lower()
    if arch != "odenet_antisym":
        raise UsageError(f"the VarPro path builds odenet_antisym, not '{s.model}'",
                         "use `model` odenet_antisym, or `resume` any odekit checkpoint whose last layer is nn.Linear")  # fmt: skip
    solver = SolverConfig(solver=s.solver or "rk4", steps=s.steps if s.steps is not None else s.depth, t1=s.t1)
    args = {"in_features": int(math.prod(input_shape)), "out_features": num_outputs, "width": s.width or 16,
            "depth": s.depth, "t1": s.t1, "activation": s.activation or "tanh", "solver": solver.to_dict()}  # fmt: skip
    return arch, args, build_model(arch, args)


def run_separable_job(
    s: SeparableJobSettings, loaded: LoadedModel | None, device: torch.device, *, progress: Progress | None = None
) -> SeparableJobResult:
    """Train with every optimizer of ``s`` from the same initial weights; keep the first one's model."""
    task, data = _load_task(s, loaded)
    reg = data if isinstance(data, RegressionData) else None
    if loaded is not None:
        arch, args, net = loaded.meta.arch, dict(loaded.meta.args), loaded.model
        if reg is not None:  # the checkpoint outputs original units; train on standardised targets
            fold_target_scaling(net, [-m / sd for m, sd in zip(reg.target_mean, reg.target_std, strict=True)], [1 / sd for sd in reg.target_std])
    else:
        arch, args, net = _build(s, tuple(data.input_shape), task.num_outputs)
    runs: dict[str, VarProResult] = {}
    kept: nn.Module | None = None
    for name in s.optimizers:
        settings = s.varpro_settings(name)
        torch.manual_seed(s.seed)
        model, runs[name] = train_separable(copy.deepcopy(net), task, settings, device, progress=progress)
        if kept is None:
            kept = model
    assert kept is not None
    kept = kept.cpu().float()
    if arch == "odenet_antisym":
        args = antisym_args(kept)  # type: ignore[arg-type]
    if reg is not None:
        fold_target_scaling(kept, reg.target_mean, reg.target_std)
    main = runs[s.optimizers[0]]
    step = {"command": "train-ode", "task": s.task, "optimizer": s.optimizers[0], "work_units": main.work_units,
            "final_metrics": main.final_metrics, "regularization": [s.alpha_theta, s.alpha_w], "levels": main.levels}  # fmt: skip
    meta = ModelMeta(
        arch=arch, args=args, num_classes=task.num_outputs if s.loss == "ce" else None, input_shape=list(data.input_shape),
        normalization=data.normalization(), dataset=data.describe(),
        history=[*(loaded.meta.history if loaded else []), step], source_sha256=loaded.sha256 if loaded else None,
        extra={"task": s.task, "optimizer": s.optimizers[0], "num_outputs": task.num_outputs, **main.final_metrics},
    )  # fmt: skip
    info = data.describe()
    return SeparableJobResult(task=s.task, arch=arch, model_args=args, data_name=info["name"], data_info=info, runs=runs,
                              model=kept, meta=meta)  # fmt: skip
