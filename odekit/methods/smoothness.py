"""The (S, n)-criterion of dynamics smoothness (thesis ch. 3.3.2, fig. 3.1).

A trained ODE classifier is evaluated with test solvers S (Euler, RK2(u), RK4) and step counts
n. A test solver is *stronger* than the training one when it spends more f-evaluations per
forward pass. The learned dynamics count as smooth when no stronger solver loses accuracy
against the training solver (up to a tolerance for test-set noise); a model whose accuracy
drops only works with the solver it was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from odekit.errors import UnsupportedModelError, UsageError
from odekit.io.datasets import Split
from odekit.methods.ode_train import evaluate_classifier
from odekit.models.ode_models import CNF, ode_blocks, set_solver
from odekit.ode import SOLVERS, SolverConfig
from odekit.progress import Progress, silent_if_none


@dataclass(frozen=True)
class SmoothnessSettings:
    """Test solvers and step counts of the grid; ``tolerance`` is an accuracy fraction."""

    solvers: tuple[str, ...] = ("euler", "rk2", "rk4")
    steps: tuple[int, ...] = (2, 4, 8, 16, 32)
    u: float = 0.5
    tolerance: float = 0.01
    batch_size: int = 256

    def __post_init__(self) -> None:
        if not self.solvers:
            raise UsageError("`solvers` names no test solver", "pass e.g. `solvers` euler,rk2,rk4")
        names = []
        for name in self.solvers:
            spec = SOLVERS.get(name)
            if spec.adaptive:
                raise UsageError(
                    f"solver '{spec.name}' is adaptive; the (S, n)-criterion compares fixed-step solvers",
                    "choose from euler, rk2, rk4",
                )
            if spec.name not in names:
                names.append(spec.name)
        object.__setattr__(self, "solvers", tuple(names))
        if not self.steps or any(isinstance(n, bool) or int(n) != n or n < 1 for n in self.steps):
            raise UsageError(f"`steps` must be positive integers, got {list(self.steps)}", "pass e.g. `steps` 2,4,8,16,32")
        object.__setattr__(self, "steps", tuple(sorted({int(n) for n in self.steps})))
        if not 0.0 < float(self.u) <= 1.0:
            raise UsageError(f"`u` (the rk2 parameter) must lie in (0, 1], got {self.u}", "0.5 is the midpoint rule, 1 Heun's")
        if not 0.0 <= self.tolerance < 1.0:
            raise UsageError(f"`tolerance` must lie in [0, 1), got {self.tolerance}", "it is an accuracy fraction, e.g. 0.01")
        if self.batch_size < 1:
            raise UsageError(f"`batch_size` must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class GridPoint:
    """Test accuracy with one (solver, n) of the grid; ``stronger`` when it spends more
    f-evaluations per forward pass than the training solver, ``change`` against its accuracy."""

    solver: str
    n: int
    nfe: int
    accuracy: float
    stronger: bool
    change: float

    def to_dict(self) -> dict[str, Any]:
        return {"solver": self.solver, "n": self.n, "nfe": self.nfe, "accuracy": self.accuracy,
                "stronger": self.stronger, "change": self.change}  # fmt: skip


@dataclass
class SmoothnessResult:
    grid: list[GridPoint]
    training_solver: dict[str, Any]
    training_accuracy: float
    training_nfe: float
    smooth: bool
    rule: str
    max_drop: float
    worst: GridPoint | None = None
    stronger_configs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "grid": [g.to_dict() for g in self.grid],
            "training_solver": self.training_solver,
            "training_accuracy": self.training_accuracy,
            "training_nfe": self.training_nfe,
            "smooth": self.smooth,
            "rule": self.rule,
            "max_drop": self.max_drop,
            "worst": self.worst.to_dict() if self.worst else None,
            "stronger_configs": self.stronger_configs,
        }


def training_config(model: nn.Module) -> SolverConfig:
    """The solver the model's ODE blocks carry (the training solver for odekit checkpoints)."""
    blocks = ode_blocks(model)
    if not blocks:
        raise UnsupportedModelError(
            f"the model ({type(model).__name__}) has no ODE block, so it has no solver to vary",
            "smoothness-check needs a neural ODE checkpoint, e.g. one written by 'odekit train-ode'",
        )
    if isinstance(model, CNF):
        raise UnsupportedModelError(
            "the model is a density model (CNF); the (S, n)-criterion compares classification accuracy",
            "check an ODENet classifier trained with 'odekit train-ode `task` classify'",
        )
    return blocks[0].config


def smoothness_check(
    model: nn.Module,
    split: Split,
    settings: SmoothnessSettings,
    device: torch.device,
    *,
    progress: Progress | None = None,
) -> SmoothnessResult:
    """Accuracy for every (solver, n) of the grid and the (S, n)-criterion verdict."""
    progress = silent_if_none(progress)
    train_cfg = training_config(model)
    originals = [block.config for block in ode_blocks(model)]
    model.to(device).eval()
    try:
        base = evaluate_classifier(model, split, device, settings.batch_size)
        a0, nfe0 = base["test_accuracy"], base["nfe_per_forward"]
        configs = [(s, n) for s in settings.solvers for n in settings.steps]
        grid: list[GridPoint] = []
        for solver, n in progress.track(configs, len(configs), "smoothness"):
            set_solver(model, train_cfg.replace(solver=solver, steps=n, u=settings.u, grad="backprop"))
            metrics = evaluate_classifier(model, split, device, settings.batch_size)
            nfe = metrics["nfe_per_forward"]
            accuracy = metrics["test_accuracy"]
            grid.append(GridPoint(solver, n, round(nfe), accuracy, nfe > nfe0, accuracy - a0))
            progress.update(solver=solver, n=n, acc=metrics["test_accuracy"])
    finally:
        for block, cfg in zip(ode_blocks(model), originals, strict=True):
            block.config = cfg
    stronger = [g for g in grid if g.stronger]
    if not stronger:
        raise UsageError(
            f"no tested (solver, n) spends more f-evaluations than the training solver ({nfe0:g} per forward pass)",
            "add larger `steps` so that stronger solvers are tested",
        )
    worst = min(stronger, key=lambda g: (g.accuracy, g.nfe))
    tol = settings.tolerance
    smooth = all(g.accuracy >= a0 - tol for g in stronger)
    rule = (
        f"smooth = every tested (solver, n) with more f-evaluations per forward pass than the training solver "
        f"({nfe0:g}) keeps test accuracy >= training-solver accuracy ({a0:.4f}) - tolerance ({tol:g}) "
        "(thesis 3.3.2, (S, n)-criterion)"
    )
    train_info = {**train_cfg.to_dict(), "nfe_per_forward": nfe0}
    return SmoothnessResult(
        grid=grid, training_solver=train_info, training_accuracy=a0, training_nfe=nfe0, smooth=smooth, rule=rule,
        max_drop=max(0.0, a0 - worst.accuracy), worst=worst, stronger_configs=len(stronger),
    )  # fmt: skip
