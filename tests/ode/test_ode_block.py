"""SolverConfig validation/serialisation and the ODEBlock layer."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from odekit.errors import UsageError
from odekit.ode import ODEBlock, SolverConfig, SolveStats, odeint


class ConvFunc(nn.Module):
    def __init__(self, c: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.calls = 0

    def forward(self, t, z):
        self.calls += 1
        return torch.tanh(self.conv(z)) * (1 + t)


def test_config_defaults_roundtrip_and_nfe():
    cfg = SolverConfig()
    assert cfg.solver == "dopri5" and cfg.grad == "backprop" and cfg.nfe_per_solve() is None
    for solver, stages in (("euler", 1), ("rk2", 2), ("rk4", 4)):
        c = SolverConfig(solver=solver, steps=5, u=0.25, grad="irdm", cheb_nodes=8)
        assert c.nfe_per_solve() == 5 * stages
        data = json.loads(json.dumps(c.to_dict()))
        assert SolverConfig.from_dict(data) == c
    assert SolverConfig(solver="RK4", steps=2, grad="ANODE").solver == "rk4"
    assert cfg.replace(rtol=1e-5).rtol == 1e-5


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"solver": "rk45"}, "choose one of"),
        ({"grad": "adjoint"}, "choose one of"),
        ({"solver": "rk4"}, "needs steps"),
        ({"solver": "rk4", "steps": 0}, "needs steps"),
        ({"solver": "dopri5", "steps": 4}, "adaptive"),
        ({"solver": "rk2", "steps": 4, "u": 0.0}, r"\(0, 1\]"),
        ({"solver": "rk2", "steps": 4, "u": 1.01}, r"\(0, 1\]"),
        ({"rtol": 0.0}, "positive"),
        ({"cheb_nodes": 1}, "cheb_nodes"),
        ({"checkpoints": 0}, "checkpoints"),
        ({"t1": -1.0}, "t1"),
        ({"adjoint_rtol": 0.0}, "adjoint_rtol must be positive"),
        ({"adjoint_atol": "1e-3"}, "must be a number"),
    ],
)
def test_config_rejects_impossible_values(kw, match):
    with pytest.raises(UsageError, match=match):
        SolverConfig(**kw)


def test_config_adjoint_tolerances_roundtrip_and_reach_the_solve():
    cfg = SolverConfig(grad="irdm", rtol=1e-6, atol=1e-6, adjoint_rtol=1e-3, adjoint_atol=1e-3,
                       seminorm=True)
    assert SolverConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # Metadata written before these fields existed still reads back.
    old = {k: v for k, v in SolverConfig(grad="irdm").to_dict().items()
           if not k.startswith("adjoint_")}
    assert SolverConfig.from_dict(old).adjoint_rtol is None
    torch.manual_seed(0)
    nfe_b = []
    for c in (cfg.replace(adjoint_rtol=None, adjoint_atol=None), cfg):
        block = ODEBlock(ConvFunc(), c)
        block(torch.randn(2, 3, 4, 4)).square().sum().backward()
        nfe_b.append(block.last_stats.nfe_backward)
    assert nfe_b[1] < nfe_b[0]
    assert "adjoint_rtol=0.001" in repr(ODEBlock(ConvFunc(), cfg))


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(UsageError, match="unknown"):
        SolverConfig.from_dict({"solver": "rk4", "steps": 2, "order": 4})


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        SolverConfig().rtol = 1.0  # type: ignore[misc]


def test_block_forward_config_switch_and_stats():
    torch.manual_seed(0)
    func = ConvFunc()
    block = ODEBlock(func, SolverConfig(solver="rk4", steps=3, t1=0.5))
    x = torch.randn(2, 3, 5, 5)
    y = block(x)
    assert y.shape == x.shape and func.calls == 12
    assert block.last_stats == SolveStats(12, 0, 3, 0)
    want = odeint(func, x, torch.tensor([0.0, 0.5]), solver="rk4", steps=3).z[-1]
    assert torch.equal(y, want)
    # A trained block can be evaluated with another solver.
    block.config = SolverConfig(solver="dopri5", rtol=1e-6, atol=1e-7, grad="irdm", t1=0.5)
    y2 = block(x.requires_grad_())
    assert (y2 - y).abs().max().item() < 1e-3
    y2.square().sum().backward()
    assert block.last_stats.nfe_backward > 0 and x.grad is not None
    assert all(p.grad is not None for p in func.parameters())
    assert "solver=dopri5" in repr(block)


def test_block_u_override_float_and_tensor():
    torch.manual_seed(0)
    func = ConvFunc()
    block = ODEBlock(func, SolverConfig(solver="rk2", steps=2, u=0.5))
    x = torch.randn(1, 3, 4, 4)
    y_mid = block(x)
    block.u_override = 1.0
    y_heun = block(x)
    block.u_override = torch.tensor(1.0)
    y_heun_t = block(x)
    assert not torch.allclose(y_mid, y_heun)
    assert torch.allclose(y_heun, y_heun_t, atol=1e-6)
    block.u_override = torch.tensor(0.0)
    with pytest.raises(UsageError):
        block(x)


def test_config_canonical_types_and_non_numbers():
    c = SolverConfig.from_dict({"solver": "rk4", "steps": 10.0, "u": 1, "t1": 2})
    assert c == SolverConfig(solver="rk4", steps=10, u=1.0, t1=2.0)
    assert isinstance(c.steps, int) and isinstance(c.u, float)
    with pytest.raises(UsageError, match="must be a number"):
        SolverConfig(rtol="1e-3")  # type: ignore[arg-type]
