"""`odekit.smoothness_check`: the (S, n)-criterion of thesis 3.3.2 for an ODE classifier."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from odekit.api.defaults import STREAM_BATCH_SIZE
from odekit.api.inputs import ModelLike, as_dataset, as_loaded
from odekit.api.progress import shown
from odekit.api.results import Claim, RunResult
from odekit.device import resolve_device
from odekit.io.datasets import Split
from odekit.methods.smoothness import SmoothnessResult, SmoothnessSettings, training_config
from odekit.methods.smoothness import smoothness_check as check_grid
from odekit.progress import Progress
from odekit.writers.tables import ReportTable


@dataclass(frozen=True)
class SmoothnessRunResult(RunResult):
    """The verdict (``.smooth``), the accuracy grid and grid.png on `save`."""

    check: SmoothnessResult | None = None
    title: str = "model"
    samples: int = 0
    tolerance: float = 0.01

    @property
    def smooth(self) -> bool:
        return bool(self.check is not None and self.check.smooth)

    def write_outputs(self, claim: Claim, force: bool) -> dict[str, Any]:
        assert self.check is not None
        path = claim("grid.png")
        grid_figure(path, self.check, self.title, force, self.tolerance, self.samples)
        return {"plot": str(path)}


def smoothness_check(
    model: ModelLike,
    data: Any = None,
    *,
    solvers: Sequence[str] = ("euler", "rk2", "rk4"),
    steps: Sequence[int] = (2, 4, 8, 16, 32),
    u: float = 0.5,
    tolerance: float = 0.01,
    eval_samples: int | None = None,
    batch_size: int = STREAM_BATCH_SIZE,
    test: Any = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool | Progress | None = None,
) -> SmoothnessRunResult:
    """Does test accuracy hold when an ODE classifier is integrated with stronger solvers than
    the one it was trained with? Returns a `SmoothnessRunResult` (``.smooth``, ``.to_dict()``)."""
    loaded = as_loaded(model)
    settings = SmoothnessSettings(tuple(solvers), tuple(int(n) for n in steps), u, tolerance, batch_size)
    training_config(loaded.model)  # a non-ODE model fails here, before any data is read
    dataset = as_dataset(data, loaded, test=test)
    params = {"solvers": ",".join(solvers), "steps": ",".join(str(n) for n in steps), "u": u, "tolerance": tolerance,
              "samples": eval_samples, "data": data if isinstance(data, str | type(None)) else None,
              "batch_size": batch_size, "seed": seed}  # fmt: skip
    with shown(progress) as bars:
        return run_smoothness(loaded.model, dataset.test.subset(eval_samples, seed), settings, resolve_device(device),
                              title=loaded.path.name, params=params, inputs={"data": dataset.describe()}, progress=bars)  # fmt: skip


def run_smoothness(
    model: torch.nn.Module,
    split: Split,
    settings: SmoothnessSettings,
    device: torch.device,
    *,
    title: str,
    params: dict[str, Any],
    inputs: dict[str, Any],
    progress: Progress | None = None,
) -> SmoothnessRunResult:
    """The accuracy grid and verdict (the CLI and `smoothness_check` share this)."""
    result = check_grid(model, split, settings, device, progress=progress)
    results = {**result.to_dict(), "samples": len(split), "tolerance": settings.tolerance}
    train = result.training_solver
    train_text = f"{train['solver']} n={train['steps']}" if train.get("steps") else f"{train['solver']} rtol={train['rtol']:g}"
    verdict = "SMOOTH" if result.smooth else "NOT SMOOTH"
    headline = [
        f"{title}: {verdict} by the (S, n)-criterion on {len(split)} test images. Training solver {train_text}: accuracy "
        f"{result.training_accuracy:.4f} at {result.training_nfe:g} NFE; worst stronger solver "
        f"{result.worst.solver} n={result.worst.n}: {result.worst.accuracy:.4f}" if result.worst else "",
        f"Rule: {result.rule}",
    ]
    rows = [[g.solver, g.n, g.nfe, g.accuracy, g.change, "yes" if g.stronger else "no"] for g in result.grid]
    table = ReportTable("Accuracy by test solver", ["solver", "n", "NFE", "accuracy", "change vs training", "stronger"], rows)
    return SmoothnessRunResult(command="smoothness-check", results=results, inputs=inputs, params=params, tables=[table],
                               headline=headline, device=str(device), check=result, title=title, samples=len(split),
                               tolerance=settings.tolerance)  # fmt: skip


def grid_figure(path: Any, result: SmoothnessResult, title: str, force: bool, tolerance: float, n: int) -> None:
    """Accuracy against NFE per test solver, with Wilson 95% bars over the n test images and the
    threshold (training accuracy - tolerance) that stronger configurations must stay above."""
    from odekit.stats import wilson_interval
    from odekit.writers.plots import new_figure, save_figure

    fig, axes = new_figure(1, 1, (6.0, 4.2))
    ax = axes[0][0]
    styles = {"euler": "o-", "rk2": "s--", "rk4": "^:"}
    for solver in dict.fromkeys(g.solver for g in result.grid):
        rows = [g for g in result.grid if g.solver == solver]
        accuracies = [g.accuracy for g in rows]
        bounds = [wilson_interval(round(a * n), n) for a in accuracies]
        bars = [[a - low for a, (low, _) in zip(accuracies, bounds, strict=True)],
                [high - a for a, (_, high) in zip(accuracies, bounds, strict=True)]]  # fmt: skip
        ax.errorbar([g.nfe for g in rows], accuracies, yerr=bars, fmt=styles.get(solver, "o-"), capsize=3,
                    label=f"test: {solver}")  # fmt: skip
    train = result.training_solver
    label = f"training: {train['solver']}" + (f" n={train['steps']}" if train.get("steps") else "")
    ax.axhline(result.training_accuracy, color="gray", lw=0.8)
    ax.axhline(result.training_accuracy - tolerance, color="tab:red", lw=0.8, ls="--",
               label=f"threshold: training - {tolerance:g}")  # fmt: skip
    ax.plot([result.training_nfe], [result.training_accuracy], "k*", ms=12, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("f evaluations per forward pass (NFE)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{title}:\n{'smooth' if result.smooth else 'NOT smooth'} by the (S, n)-criterion, "
                 f"n = {n} test images (bars: Wilson 95%)", fontsize=10)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path, force)
