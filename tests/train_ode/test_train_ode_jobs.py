"""train-ode's jobs as library calls: settings validate, results are typed and frozen."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from odekit.errors import UsageError
from odekit.methods.ode_train import ODETrainSettings
from odekit.methods.ode_train.jobs import ODEArchOptions, ODEJobSettings, run_ode_job, solver_config
from odekit.methods.varpro.job import (
    SeparableJobSettings,
    optimizer_names,
    run_separable_job,
    wants_separable,
)

CPU = torch.device("cpu")


def test_solver_defaults_follow_the_task() -> None:
    classify, density = solver_config("classify"), solver_config("density")
    assert (classify.solver, classify.steps, classify.rtol) == ("rk2", 4, 1e-3)
    assert (density.solver, density.steps, density.rtol, density.atol) == ("dopri5", None, 1e-5, 1e-5)
    assert solver_config("classify", "dopri5").rtol == 1e-3
    with pytest.raises(UsageError, match="`steps` does not apply"):
        solver_config("density", steps=4)
    with pytest.raises(UsageError, match="`rtol`/`atol` do not apply"):
        solver_config("classify", "euler", rtol=1e-4)
    with pytest.raises(UsageError, match="`grad` rdm/irdm"):
        solver_config("classify", "dopri5", seminorm=True)


def test_arch_options_validate_and_name_their_flags() -> None:
    with pytest.raises(UsageError, match="`norm_ode`"):
        ODEArchOptions(norm_ode="group")
    with pytest.raises(UsageError, match="unknown trace mode"):
        ODEArchOptions(trace="magic")
    with pytest.raises(UsageError, match="`hidden`"):
        ODEArchOptions(hidden="64,x").cnf_args()
    with pytest.raises(UsageError, match="ODENet options"):
        ODEArchOptions(width=8).cnf_args()
    assert ODEArchOptions(hidden="16, 8").cnf_args()["hidden"] == [16, 8]
    assert ODEArchOptions().classifier_args("odenet10", 3, 10)["width"] == 16
    with pytest.raises(UsageError, match="regress"):
        ODEJobSettings(task="regress", solver=solver_config("classify"))


def test_density_job_returns_a_frozen_typed_result() -> None:
    torch.manual_seed(0)
    settings = ODEJobSettings(
        task="density", solver=solver_config("density", "rk4", steps=2), arch=ODEArchOptions(hidden="8,8"),
        train=ODETrainSettings(iters=4, batch_size=50, lr=1e-2, eval_every=2), train_samples=200, test_samples=100,
    )  # fmt: skip
    result = run_ode_job(settings, None, CPU)
    out = result.to_dict()
    assert list(out)[:4] == ["task", "arch", "model_args", "data"] and list(out)[-2:] == ["params", "history"]
    assert (out["task"], out["arch"], out["data"], out["ode_blocks"]) == ("density", "cnf", "pinwheel", 1)
    assert [h["iteration"] for h in out["history"]] == [0, 2, 4]
    fm = out["final_metrics"]
    assert fm["bits_per_dim"] == pytest.approx(fm["test_nll"] / (2 * math.log(2)))
    assert out["params"] == sum(p.numel() for p in result.model.parameters())
    assert result.metric == "test_nll" and result.toy is not None and result.meta.extra["task"] == "density"
    assert result.model_args["solver"]["solver"] == "rk4"
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.arch = "x"  # type: ignore[misc]


def test_separable_job_keeps_the_first_optimizer(tmp_path: Path) -> None:
    assert wants_separable("classify", None, "adam", "slimtrain", 1) and not wants_separable("classify", None, "adam", None, 1)
    assert optimizer_names("GNVpro", "adam, gnvpro,adam") == ("gnvpro", "adam")
    with pytest.raises(UsageError, match="no VarPro training"):
        SeparableJobSettings(task="density", optimizers=("gnvpro",))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    np.savez(tmp_path / "toy.npz", x=x, y=np.stack([np.sin(x[:, 0]), 10 + x[:, 1]], axis=1))
    settings = SeparableJobSettings(task="regress", optimizers=("slimtrain", "adam"), data=str(tmp_path / "toy.npz"),
                                    width=4, depth=2, epochs=2, batch_size=20)  # fmt: skip
    result = run_separable_job(settings, None, CPU)
    assert result.optimizer == "slimtrain" and list(result.runs) == ["slimtrain", "adam"]
    out = result.to_dict()
    assert out["optimizer"] == "slimtrain" and set(out["optimizers"]) == {"slimtrain", "adam"}
    assert out["work_units"] == 5.0 and result.meta.extra["optimizer"] == "slimtrain"  # 2 epochs x 2 + W(theta0)
    with torch.no_grad():  # the kept model answers in original units: the second target sits near 10
        assert abs(float(result.model(torch.tensor(x, dtype=torch.float32))[:, 1].mean()) - 10) < 1.0
