"""ODENet4/ODENet10/CNF: shapes, save/load with every norm, solver switching, CNF numerics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from odekit.io.checkpoints import ModelMeta, load_model, save_model
from odekit.models import build_model
from odekit.models.ode_models import (
    NORMS,
    CNFDynamics,
    MetaODEBlock,
    nfe_counts,
    ode_blocks,
    set_solver,
)
from odekit.ode import SolverConfig


def _odenet(arch: str, norm: str, solver: dict | None = None) -> torch.nn.Module:
    args = {"num_classes": 10, "in_channels": 1, "width": 4, "norm_first": norm, "norm_ode": norm,
            "solver": solver or {"solver": "euler", "steps": 3}}  # fmt: skip
    return build_model(arch, args)


@pytest.mark.parametrize("arch", ["odenet4", "odenet10"])
@pytest.mark.parametrize("norm", NORMS)
def test_save_load_round_trip_every_norm(tmp_path: Path, arch: str, norm: str) -> None:
    torch.manual_seed(0)
    model = _odenet(arch, norm)
    model.train()
    model(torch.randn(8, 1, 8, 8))  # move BN statistics / spectral-norm vectors off their init
    model.eval()
    x = torch.randn(3, 1, 8, 8)
    meta = ModelMeta(arch=arch, args=_odenet_args(norm), num_classes=10, input_shape=[1, 8, 8])
    save_model(tmp_path / "m.safetensors", model, meta)
    loaded = load_model(tmp_path / "m.safetensors")
    assert torch.allclose(loaded.model(x), model(x), atol=1e-6)
    assert ode_blocks(loaded.model)[0].config == SolverConfig(solver="euler", steps=3)
    assert (tmp_path / "m.safetensors").stat().st_size < 200_000


def _odenet_args(norm: str) -> dict:
    return {"num_classes": 10, "in_channels": 1, "width": 4, "norm_first": norm, "norm_ode": norm,
            "solver": {"solver": "euler", "steps": 3}}  # fmt: skip


def test_nfe_counts_follow_the_solver() -> None:
    model = _odenet("odenet10", "ln").eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        model(x)
        assert nfe_counts(model) == (2 * 3, 0)  # two blocks, Euler n=3
        set_solver(model, SolverConfig(solver="rk4", steps=3))
        model(x)
        assert nfe_counts(model) == (2 * 12, 0)


def test_ensemble_is_the_weighted_mean_of_solves() -> None:
    torch.manual_seed(0)
    model = _odenet("odenet4", "none", {"solver": "rk2", "steps": 2}).eval()
    block = model.ode
    assert isinstance(block, MetaODEBlock)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        block.u_override = 0.25
        a = block(z)
        block.u_override = 1.0
        b = block(z)
        block.u_override = None
        block.ensemble = [(0.25, 0.3), (1.0, 0.7)]
        mixed = block(z)
    assert not torch.allclose(a, b)
    assert torch.allclose(mixed, 0.3 * a + 0.7 * b, atol=1e-6)
    assert len(block.call_stats) == 2 and block.u_override is None


def _cnf(solver: dict, trace: str = "exact") -> torch.nn.Module:
    torch.manual_seed(1)
    return build_model("cnf", {"hidden": [16, 16], "trace": trace, "solver": solver}).double()


def test_cnf_log_density_matches_change_of_variables() -> None:
    """-delta(t1) must equal log|det dz(t1)/dx| of the flow map (eq. 1.20)."""
    model = _cnf({"solver": "rk4", "steps": 8}).eval()
    x = torch.randn(2, 2, dtype=torch.float64)

    def flow(xi: torch.Tensor) -> torch.Tensor:
        state = torch.cat([xi[None], torch.zeros(1, 1, dtype=xi.dtype)], dim=1)
        return model.ode(state)[0, :2]

    for xi in x:
        jac = torch.autograd.functional.jacobian(flow, xi)
        state = torch.cat([xi[None], torch.zeros(1, 1, dtype=xi.dtype)], dim=1)
        delta = model.ode(state)[0, 2]
        assert abs(float((torch.logdet(jac) + delta).detach())) < 1e-6
    z1 = model.ode(torch.cat([x, torch.zeros(2, 1, dtype=x.dtype)], 1))[:, :2]
    log_pz = -0.5 * (z1**2).sum(1) - math.log(2 * math.pi)
    assert torch.allclose(model.log_prob(x), log_pz - model.ode(torch.cat([x, torch.zeros(2, 1, dtype=x.dtype)], 1))[:, 2])


def test_cnf_gradients_agree_across_methods() -> None:
    x = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = {}
    for grad in ("backprop", "rdm", "anode", "irdm"):
        model = _cnf({"solver": "rk4", "steps": 8, "grad": grad})  # irdm: cheb_nodes "auto"
        loss = -model.log_prob(x).mean()
        loss.backward()
        grads[grad] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert nfe_counts(model)[1] > 0 or grad == "backprop"
    ref = grads["backprop"]
    for grad in ("rdm", "anode", "irdm"):
        rel = float((grads[grad] - ref).norm() / ref.norm())
        assert rel < 1e-4, (grad, rel)


def test_hutchinson_trace_is_unbiased() -> None:
    torch.manual_seed(0)
    exact = CNFDynamics(3, [16], "tanh", "exact").double()
    hutch = CNFDynamics(3, [16], "tanh", "hutchinson").double()
    hutch.load_state_dict(exact.state_dict())
    state = torch.randn(1, 4, dtype=torch.float64).repeat(4000, 1)
    t = torch.tensor(0.3, dtype=torch.float64)
    hutch.noise = torch.randint(0, 2, (4000, 3)).double() * 2 - 1
    with torch.no_grad():
        estimates = -hutch(t, state)[:, 3]
        true = -exact(t, state[:1])[0, 3]
    assert torch.allclose(hutch(t, state)[:, :3], exact(t, state)[:, :3])
    stderr = float(estimates.std()) / math.sqrt(len(estimates))
    assert abs(float(estimates.mean() - true)) < 4 * stderr + 1e-9


def test_auto_trace_switches_at_eight_dims() -> None:
    assert build_model("cnf", {"dim": 8}).dynamics.exact
    assert not build_model("cnf", {"dim": 9}).dynamics.exact


def test_bad_builder_arguments_are_checkpoint_errors() -> None:
    from odekit.errors import CheckpointError

    with pytest.raises(CheckpointError):
        build_model("odenet4", {"norm_ode": "group"})
    with pytest.raises(CheckpointError):
        build_model("cnf", {"trace": "skilling"})
