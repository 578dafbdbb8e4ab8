"""train-ode's classify and density jobs: data, a new or resumed model, training, a typed result.

The CLI parses its options into `ODEJobSettings`, calls `run_ode_job`, then saves the model,
draws the plots and renders the `ODEJobResult` (whose `to_dict()` is report.json's results,
less the output paths). The VarPro path (--task regress, gnvpro/slimtrain) is `methods.varpro`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from odekit.distributed import Distributed
from odekit.errors import UsageError
from odekit.io.checkpoints import LoadedModel
from odekit.io.datasets import load_dataset
from odekit.io.preprocessing import Preprocessing
from odekit.io.toy2d import TOY_DATASETS, ToyData, load_toy
from odekit.methods.ode_train.loop import ODETrainResult, ODETrainSettings
from odekit.methods.ode_train.regimes import RegimeSettings
from odekit.methods.ode_train.train import ode_checkpoint_meta, train_cnf, train_ode_classifier
from odekit.methods.trained import TrainedModelResult
from odekit.models import build_model
from odekit.models.ode_models import ACTIVATIONS, CNF, NORMS, TRACE_MODES, ode_blocks, set_solver
from odekit.ode import SOLVERS, SolverConfig
from odekit.progress import Progress

JOB_TASKS = ("classify", "density")
CLASSIFIER_ARCHS = ("odenet4", "odenet10")


def solver_config(
    task: str, solver: str | None = None, *, steps: int | None = None, u: float = 0.5, rtol: float | None = None,
    atol: float | None = None, grad: str = "backprop", cheb_nodes: int | str = "auto", checkpoints: int = 1,
    t1: float = 1.0, adjoint_rtol: float | None = None, adjoint_atol: float | None = None, seminorm: bool = False,
) -> SolverConfig:  # fmt: skip
    """The training solver from train-ode's options; defaults depend on the task (density: dopri5
    at 1e-5, classify: rk2 with 4 steps or dopri5 at 1e-3). Options that cannot apply are refused."""
    spec = SOLVERS.get(solver or ("dopri5" if task == "density" else "rk2"))
    if spec.adaptive and steps is not None:
        raise UsageError(f"`steps` does not apply to the adaptive solver '{spec.name}'", "set `rtol`/`atol` instead")
    if not spec.adaptive and (rtol is not None or atol is not None):
        raise UsageError(f"`rtol`/`atol` do not apply to the fixed-step solver '{spec.name}'", "set `steps` instead")
    if adjoint_rtol is not None or adjoint_atol is not None or seminorm:
        flags = "`adjoint_rtol`/`adjoint_atol`/`seminorm`"
        if not spec.adaptive:
            raise UsageError(f"{flags} apply to the adaptive solver dopri5, not '{spec.name}'", "drop them or use `solver` dopri5")
        if grad.strip().lower() not in ("rdm", "irdm"):
            raise UsageError(f"{flags} apply to the backward solves of `grad` rdm/irdm, not '{grad}'", "use `grad` irdm or drop them")
    default_tol = 1e-5 if task == "density" else 1e-3
    return SolverConfig(
        solver=spec.name,
        steps=None if spec.adaptive else (steps if steps is not None else 4),
        u=u,
        rtol=rtol if rtol is not None else default_tol,
        atol=atol if atol is not None else default_tol,
        grad=grad,
        cheb_nodes=cheb_nodes,
        checkpoints=checkpoints,
        t1=t1,
        adjoint_rtol=adjoint_rtol,
        adjoint_atol=adjoint_atol,
        seminorm=seminorm,
    )


def parse_widths(text: str, what: str) -> tuple[int, ...]:
    """Comma-separated positive layer widths, e.g. '64,64'."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise UsageError(f"cannot read {what} '{text}'", "give comma-separated positive integers, e.g. 64,64")
    return values


@dataclass(frozen=True)
class ODEArchOptions:
    """Architecture options of a new ODENet or CNF (a resumed checkpoint brings its own).

    None means 'not given': the architecture's default applies. ``hidden`` (the CNF's widths,
    comma-separated) is read only when a CNF is built."""

    model: str | None = None
    width: int | None = None
    norm_first: str | None = None
    norm_ode: str | None = None
    activation: str | None = None
    pool: int = 2
    stem_stride: int = 1
    hidden: str = "64,64"
    trace: str = "auto"

    def __post_init__(self) -> None:
        for name in ("norm_first", "norm_ode"):
            value = getattr(self, name)
            if isinstance(value, str) and value.lower() not in NORMS:
                raise UsageError(f"unknown normalization '{value}' for `{name}`", f"choose one of {', '.join(NORMS)}")
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise UsageError(f"unknown activation '{self.activation}'", f"choose one of {', '.join(ACTIVATIONS)}")
        if self.trace not in TRACE_MODES:
            raise UsageError(f"unknown trace mode '{self.trace}'", f"choose one of {', '.join(TRACE_MODES)}")

    def given(self) -> dict[str, Any]:
        """The options a resumed checkpoint must agree with (None: not given)."""
        return {"width": self.width, "norm_first": self.norm_first, "norm_ode": self.norm_ode, "activation": self.activation}

    def classifier_args(self, arch: str, in_channels: int, num_classes: int) -> dict[str, Any]:
        return {
            "num_classes": num_classes,
            "in_channels": in_channels,
            "width": self.width if self.width is not None else (32 if arch == "odenet4" else 16),
            "norm_first": self.norm_first or "bn",
            "norm_ode": self.norm_ode or "ln",
            "activation": self.activation or "relu",
            "stem_stride": self.stem_stride,
            "pool": self.pool,
        }

    def cnf_args(self) -> dict[str, Any]:
        if self.width is not None or self.norm_first or self.norm_ode:
            raise UsageError("`width`/`norm_first`/`norm_ode` are ODENet options", "use `hidden` for the CNF")
        hidden = parse_widths(self.hidden, "`hidden`")
        return {"dim": 2, "hidden": list(hidden), "activation": self.activation or "tanh", "trace": self.trace}


@dataclass(frozen=True)
class ODEJobSettings:
    """One train-ode job: the task, its data, the model options, the solver and the training."""

    task: str
    solver: SolverConfig
    regime: RegimeSettings = field(default_factory=RegimeSettings)
    train: ODETrainSettings = field(default_factory=ODETrainSettings)
    arch: ODEArchOptions = field(default_factory=ODEArchOptions)
    data: str | None = None  # None: digits (classify) / pinwheel (density), or the resumed model's
    data_dir: Path | None = None
    preprocessing: Preprocessing | None = None  # classify: explicit options win over a resumed model's
    train_samples: int = 10_000  # density: toy points generated
    test_samples: int = 2_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in JOB_TASKS:
            raise UsageError(f"train-ode's ODE jobs are {' and '.join(JOB_TASKS)}, not '{self.task}'",
                             "`task` regress trains with VarPro (methods.varpro)")  # fmt: skip
        self.regime.check_solver(self.solver)


@dataclass(frozen=True)
class ODEJobResult(TrainedModelResult):
    """The trained model (on the job's device), its metadata, the solver and the training record."""

    config: SolverConfig
    training: ODETrainResult
    toy: ToyData | None = None  # density: the data, for the density plot

    @property
    def metric(self) -> str:
        return "test_accuracy" if self.task == "classify" else "test_nll"

    def to_dict(self) -> dict[str, Any]:
        r = self.training
        return {
            "task": self.task,
            "arch": self.arch,
            "model_args": self.model_args,
            "data": self.data_name,
            "solver": self.config.solver,
            "steps": self.config.steps,
            "grad_method": self.config.grad,
            "solver_config": self.config.to_dict(),
            "nfe_per_solve": self.config.nfe_per_solve(),
            "ode_blocks": len(ode_blocks(self.model)),
            "regime": r.regime,
            "final_metrics": r.final_metrics,
            "iterations": r.iterations,
            "nfe_forward": r.nfe_forward,
            "nfe_backward": r.nfe_backward,
            "interp_error": r.interp_error,
            "interp_tol": r.interp_tol,
            "seconds_per_iter": r.seconds_per_iter,
            "train_seconds": r.train_seconds,
            "params": sum(p.numel() for p in self.model.parameters()),
            "history": r.history,
        }


def check_resume_compatible(loaded: LoadedModel, task: str, arch: ODEArchOptions) -> None:
    """A resumed checkpoint must be an ODE model of the task that the given options agree with."""
    found = loaded.meta.arch
    expected = ("cnf",) if task == "density" else CLASSIFIER_ARCHS
    if found not in expected:
        raise UsageError(
            f"`resume` checkpoint has architecture '{found}', which `task` {task} cannot continue",
            f"resume a {' or '.join(expected)} checkpoint written by train-ode",
        )
    if arch.model is not None and arch.model != found:
        raise UsageError(f"`model` {arch.model} contradicts the resumed checkpoint ({found})", "drop `model` when resuming")
    for key, value in arch.given().items():
        if value is not None and key in loaded.meta.args and loaded.meta.args[key] != value:
            raise UsageError(
                f"`{key}` {value} contradicts the resumed checkpoint ({loaded.meta.args[key]})",
                "architecture options come from the checkpoint when resuming; drop them",
            )


def run_ode_job(
    settings: ODEJobSettings,
    loaded: LoadedModel | None,
    device: torch.device,
    *,
    progress: Progress | None = None,
    dist: Distributed | None = None,
) -> ODEJobResult:
    """Train a new model, or continue ``loaded``, as ``settings`` say; the model stays on ``device``."""
    if loaded is not None:
        check_resume_compatible(loaded, settings.task, settings.arch)
    if settings.task == "classify":
        return _classify(settings, loaded, device, progress, dist)
    return _density(settings, loaded, device, progress, dist)


def _classify(s: ODEJobSettings, loaded: LoadedModel | None, device: torch.device, progress: Progress | None,
              dist: Distributed | None) -> ODEJobResult:  # fmt: skip
    # issue 11: explicit preprocessing wins over what a resumed checkpoint recorded
    prep = s.preprocessing or Preprocessing()
    given_norm = prep.normalize.as_dict() if prep.normalize else None
    if loaded is not None:
        dataset = load_dataset(s.data or (loaded.meta.dataset or {}).get("name", "digits"), data_dir=s.data_dir,
                               input_shape=prep.input_shape or loaded.meta.input_shape,
                               normalization=given_norm if prep.normalize else loaded.meta.normalization,
                               **prep.npz_options())  # fmt: skip
        arch, args, net = loaded.meta.arch, dict(loaded.meta.args), loaded.model
    else:
        name = s.data or "digits"
        if name.strip().lower() in TOY_DATASETS:
            raise UsageError(f"'{name}' is a 2-D toy density, not an image data set", "use `task` density for toys")
        dataset = load_dataset(name, data_dir=s.data_dir, input_shape=prep.input_shape, normalization=given_norm, **prep.npz_options())
        if len(dataset.input_shape) != 3:
            raise UsageError(f"ODENets need images (C,H,W); '{dataset.name}' has shape {list(dataset.input_shape)}",
                             "choose an image data set")  # fmt: skip
        arch = (s.arch.model or "odenet4").lower()
        if arch not in CLASSIFIER_ARCHS:
            raise UsageError(f"unknown classifier model '{s.arch.model}'", f"choose one of {', '.join(CLASSIFIER_ARCHS)}")
        args = s.arch.classifier_args(arch, dataset.input_shape[0], dataset.num_classes)
        net = build_model(arch, {**args, "solver": s.solver.to_dict()})
    set_solver(net, s.solver)
    args["solver"] = s.solver.to_dict()
    result = train_ode_classifier(net, dataset, s.train, s.regime, device, progress=progress, dist=dist)
    meta = ode_checkpoint_meta(
        arch, args, num_classes=dataset.num_classes, input_shape=list(dataset.input_shape),
        normalization=dataset.normalization(), dataset=dataset.describe(), config=s.solver, regime=s.regime,
        result=result, task="classify", previous=loaded.meta if loaded else None,
        source_sha256=loaded.sha256 if loaded else None,
    )  # fmt: skip
    return ODEJobResult(
        task="classify", arch=arch, model_args=args, data_name=dataset.name,
        data_info={**dataset.describe(), "normalization": dataset.normalization()},
        config=s.solver, training=result, model=net, meta=meta,
    )  # fmt: skip


def _density(s: ODEJobSettings, loaded: LoadedModel | None, device: torch.device, progress: Progress | None,
             dist: Distributed | None) -> ODEJobResult:  # fmt: skip
    if loaded is not None:
        name = s.data or (loaded.meta.dataset or {}).get("name", "pinwheel")
        arch, args, net = "cnf", dict(loaded.meta.args), loaded.model
    else:
        name = s.data or "pinwheel"
        if (s.arch.model or "cnf").lower() != "cnf":
            raise UsageError(f"`task` density trains a cnf, not '{s.arch.model}'", "drop `model` for density tasks")
        arch = "cnf"
        args = s.arch.cnf_args()
        net = build_model(arch, {**args, "solver": s.solver.to_dict()})
    if name.strip().lower() not in TOY_DATASETS:
        raise UsageError(f"'{name}' is not a 2-D toy data set", f"choose one of {', '.join(TOY_DATASETS.names())}")
    if dist is not None and dist.world_size > 1:
        raise UsageError(
            f"`task` density trains on one process ({dist.world_size} ranks were launched)",
            "run density tasks without torchrun; `task` classify runs data-parallel",
        )
    toy = load_toy(name, s.train_samples, s.test_samples, s.seed)
    assert isinstance(net, CNF)  # arch 'cnf' builds one
    set_solver(net, s.solver)
    args["solver"] = s.solver.to_dict()
    result = train_cnf(net, toy, s.train, s.regime, device, progress=progress)
    meta = ode_checkpoint_meta(
        arch, args, num_classes=None, input_shape=[2], normalization=None, dataset=toy.describe(),
        config=s.solver, regime=s.regime, result=result, task="density",
        previous=loaded.meta if loaded else None, source_sha256=loaded.sha256 if loaded else None,
    )  # fmt: skip
    return ODEJobResult(
        task="density", arch=arch, model_args=args, data_name=toy.name, data_info=toy.describe(),
        config=s.solver, training=result, model=net, meta=meta, toy=toy,
    )  # fmt: skip
