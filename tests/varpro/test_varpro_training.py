"""The training driver: any model ending in nn.Linear, multilevel bookkeeping, budgets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from odekit.errors import UnsupportedModelError, UsageError
from odekit.io.datasets import load_dataset
from odekit.methods.varpro.task import SeparableTask
from odekit.methods.varpro.training import VarProSettings, train_separable
from odekit.models.antisym import ODENetAntisym
from odekit.models.ode_models import ODENet4

CPU = torch.device("cpu")


def _digits(n: int = 150) -> SeparableTask:
    ds = load_dataset("digits")
    return SeparableTask("ce", ds.train.x[:n], ds.train.y[:n], ds.test.x[:100], ds.test.y[:100], 10)


def test_gnvpro_trains_an_odenet4_classifier() -> None:
    torch.manual_seed(0)
    net = ODENet4(num_classes=10, in_channels=1, width=4, norm_first="none", norm_ode="none",
                  pool=1, solver={"solver": "rk4", "steps": 1})  # fmt: skip
    settings = VarProSettings(optimizer="gnvpro", loss="ce", iters=2, krylov_rank=3)
    model, res = train_separable(net, _digits(40), settings, CPU)
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < losses[0]
    assert res.work_units == res.history[-1]["work_units"] > 0
    assert next(model.parameters()).dtype == torch.float32  # handed back in the caller's precision


def test_models_not_ending_in_linear_are_refused() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Softmax(dim=1))
    with pytest.raises(UnsupportedModelError):
        train_separable(net, _digits(20), VarProSettings(optimizer="gnvpro", loss="ce", iters=1), CPU)


def test_multilevel_doubles_depth_and_counts_coarse_passes_cheaper() -> None:
    torch.manual_seed(0)
    task = _digits(100)
    task = SeparableTask("ce", task.x_train.flatten(1), task.c_train, task.x_test.flatten(1), task.c_test, 10)
    net = ODENetAntisym(64, 10, width=4, depth=2)
    settings = VarProSettings(optimizer="adam", loss="ce", epochs=1, batch_size=50, levels=3)
    model, res = train_separable(net, task, settings, CPU)
    assert isinstance(model, ODENetAntisym) and model.depth == 8 and model.ode.config.steps == 8
    assert [lv["depth"] for lv in res.levels] == [4, 8]
    assert all(lv["output_change"] < 0.1 for lv in res.levels)  # RK4 refinement only
    # 1 epoch x 2 units at each level, scaled by steps / final steps: (2 + 4 + 8) / 8 x 2
    assert res.work_units == pytest.approx(2 * (2 + 4 + 8) / 8)


def test_work_unit_budget_stops_training() -> None:
    torch.manual_seed(0)
    task = _digits(100)
    net = ODENetAntisym(64, 10, width=4, depth=2)
    _, res = train_separable(net, task, VarProSettings(optimizer="sgd", loss="ce", epochs=50, lr=1e-2, max_work_units=6), CPU)
    assert res.work_units == pytest.approx(6.0)


def test_settings_validate() -> None:
    with pytest.raises(UsageError):
        VarProSettings(optimizer="newton")
    with pytest.raises(UsageError):
        VarProSettings(optimizer="gnvpro", loss="ce", alpha_w=0.0)
    with pytest.raises(UsageError):
        VarProSettings(levels=0)
    with pytest.raises(UsageError):
        VarProSettings(tr_solver="dogleg")
    with pytest.raises(UsageError):
        VarProSettings(level_units=0)
