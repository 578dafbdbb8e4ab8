"""ODE jobs for scripts/train_zoo.py: ODENet4 on digits, trained with Euler and with RK2 smoothing.

    python scripts/train_zoo.py --only odenet4_digits_euler --only odenet4_digits_rk2smooth

Each job is the library path of `odekit train-ode` (same settings object, same metadata), so
the checkpoints record their training solver and regime; smoothness-check and attack read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from odekit.io.checkpoints import save_model
from odekit.io.datasets import load_dataset
from odekit.methods.evaluation import model_cost
from odekit.methods.ode_train import (
    ODETrainSettings,
    RegimeSettings,
    ode_checkpoint_meta,
    train_ode_classifier,
)
from odekit.models import build_model
from odekit.ode import SolverConfig


@dataclass(frozen=True)
class ODEJob:
    config: SolverConfig
    regime: RegimeSettings
    settings: ODETrainSettings
    description: str
    arch: str = "odenet4"
    args: tuple[tuple[str, Any], ...] = (("width", 32), ("norm_first", "bn"), ("norm_ode", "ln"), ("pool", 2))


JOBS: dict[str, ODEJob] = {
    "odenet4_digits_euler": ODEJob(
        SolverConfig(solver="euler", steps=2),
        RegimeSettings(kind="standalone"),
        ODETrainSettings(epochs=15, batch_size=64, lr=1e-2, schedule="cosine", seed=0),
        "ODENet4 (BN-LN, width 32) on 8x8 digits, Euler n=2, backprop",
    ),
    "odenet4_digits_rk2smooth": ODEJob(
        SolverConfig(solver="rk2", steps=2, u=0.5),
        RegimeSettings(kind="smoothing", u=0.5, u_mean=0.5, u_std=0.0125, seed=0),
        ODETrainSettings(epochs=12, batch_size=64, lr=1e-2, schedule="cosine", seed=0),
        "ODENet4 (BN-LN, width 32) on 8x8 digits, RK2 n=2 with solver smoothing u ~ N(0.5, 0.0125)",
    ),
}


def run_job(name: str, job: ODEJob, out: Path) -> dict[str, Any]:
    torch.manual_seed(job.settings.seed)
    data = load_dataset("digits")
    args = {"num_classes": data.num_classes, "in_channels": data.input_shape[0], **dict(job.args),
            "solver": job.config.to_dict()}  # fmt: skip
    model = build_model(job.arch, args)
    result = train_ode_classifier(model, data, job.settings, job.regime, torch.device("cpu"))
    meta = ode_checkpoint_meta(
        job.arch, args, num_classes=data.num_classes, input_shape=list(data.input_shape),
        normalization=data.normalization(), dataset=data.describe(), config=job.config, regime=job.regime,
        result=result, task="classify",
    )  # fmt: skip
    meta.history[-1]["command"] = "scripts/train_zoo.py"
    meta.history[-1]["job"] = name
    meta.extra["description"] = job.description
    save_model(out / f"{name}.safetensors", model, meta, force=True)
    cost = model_cost(model, data.input_shape)
    return {
        "name": name,
        "arch": job.arch,
        "test_accuracy": result.final_metrics["test_accuracy"],
        "solver": job.config.solver,
        "steps": job.config.steps,
        "regime": result.regime,
        "nfe_forward": result.nfe_forward,
        **cost.to_dict(),
        "description": job.description,
    }


def _job(name: str) -> Callable[[Path], dict[str, Any]]:
    return lambda out: run_job(name, JOBS[name], out)


ODE_JOBS: dict[str, Callable[[Path], dict[str, Any]]] = {name: _job(name) for name in JOBS}
