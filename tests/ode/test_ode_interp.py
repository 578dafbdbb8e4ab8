"""irdm's interpolant of z(t): the adaptive piecewise Chebyshev interpolant, its error
estimate, and the warning when a fixed node count misses the adjoint tolerance."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch
from test_ode_gradients import MLP, grads_of, rel_err
from torch import nn

from odekit.errors import UsageError
from odekit.ode import InterpolationWarning, SolverConfig, odeint
from odekit.ode.interp import (
    AdaptiveChebyshevBuilder,
    PiecewiseChebyshev,
    chebyshev_lobatto,
    fixed_estimate,
    fixed_grid,
)
from odekit.ode.solver import StepControl, integrate
from odekit.ode.tableau import step_coefficients

F64 = torch.float64


class PeriodicMLP(nn.Module):
    """tanh MLP driven by sin/cos(2 pi t): one period per unit of time."""

    def __init__(self, d: int = 4, hidden: int = 16, drive: float = 3.0) -> None:
        super().__init__()
        self.l1 = nn.Linear(d + 2, hidden)
        self.l2 = nn.Linear(hidden, d)
        with torch.no_grad():
            self.l1.weight[:, -2:].mul_(drive)

    def forward(self, t, z):
        phase = 2 * math.pi * t
        drive = torch.stack([torch.sin(phase), torch.cos(phase)]).to(z).expand(z.shape[0], 2)
        return self.l2(torch.tanh(self.l1(torch.cat([z, drive], dim=1))))


def _irdm_grads(f, z0, t, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gs, st = grads_of(f, z0, t, "irdm", **kw)
    return gs, st, [w for w in caught if issubclass(w.category, InterpolationWarning)]


def test_auto_irdm_meets_1e4_over_8_periods_where_16_nodes_cannot():
    torch.manual_seed(0)
    f = PeriodicMLP().to(F64)
    z0 = torch.randn(8, 4, dtype=F64)
    t = torch.tensor([0.0, 4.0])
    ref, _ = grads_of(f, z0, t, "backprop", rtol=1e-9, atol=1e-9)
    fixed, st16, warned16 = _irdm_grads(f, z0, t, rtol=1e-6, atol=1e-6, cheb_nodes=16)
    auto, st_auto, warned_auto = _irdm_grads(f, z0, t, rtol=1e-6, atol=1e-6)
    assert rel_err(fixed, ref) > 1e-4  # 17 nodes for 8 periods: an accuracy floor ...
    assert st16.interp_error > 10 * st16.interp_tol  # ... that the estimate sees
    assert len(warned16) == 1 and warned16[0].message.error == st16.interp_error
    assert "cheb_nodes=16" in str(warned16[0].message)
    assert rel_err(auto, ref) < 1e-5  # auto meets 1e-4 with room
    assert st_auto.interp_error <= st_auto.interp_tol == 1e-6 and not warned_auto
    assert st_auto.interp_segments > 1
    # O(steps) states, a few per accepted step: far below backprop's graph of every stage.
    assert st_auto.interp_nodes <= 5 * st_auto.accepted_steps + 1


def _exp_sin(t: np.ndarray) -> np.ndarray:
    return np.exp(np.sin(3 * t))


def _weighted_error(approx: torch.Tensor, exact: torch.Tensor, rtol: float, atol: float) -> float:
    """Largest RMS over time of (approx - exact) / (atol + rtol |exact|), relative (x rtol)."""
    w = atol + rtol * exact.abs()
    return float(((approx - exact) / w).square().mean(dim=1).sqrt().max()) * rtol


@pytest.mark.parametrize("n", [8, 16, 24, 32])
def test_fixed_estimate_bounds_the_measured_error_of_exp_sin(n):
    scales = torch.tensor([1.0, 2.0, 0.5], dtype=F64)
    t0, t1, rtol, atol = 0.0, 2.0, 1e-6, 1e-6
    nodes, probes = fixed_grid(t0, t1, n)
    node_vals = torch.tensor(_exp_sin(nodes))[:, None] * scales
    probe_vals = torch.tensor(_exp_sin(probes))[:, None] * scales
    estimate = fixed_estimate(nodes, node_vals, probes, probe_vals, rtol, atol) * rtol
    fine = np.linspace(t0, t1, 2001)
    interp = PiecewiseChebyshev([t0, t1], [n], node_vals)
    measured = _weighted_error(interp.many(fine), torch.tensor(_exp_sin(fine))[:, None] * scales,
                               rtol, atol)
    assert measured <= estimate <= 20 * measured + 1e-15


@pytest.mark.parametrize("adjoint_tol", [1e-4, 1e-6, 1e-8])
def test_auto_estimate_bounds_the_measured_error_of_exp_sin(adjoint_tol):
    """z' = 3 cos(3t) z has z = z0 exp(sin 3t). The forward solve is far tighter than the
    adjoint tolerance, so what remains is the interpolation error, which the estimate bounds."""
    scales = torch.tensor([1.0, 2.0, 0.5], dtype=F64)
    co = step_coefficients("dopri5")
    builder = AdaptiveChebyshevBuilder(co, adjoint_tol, adjoint_tol)
    res = integrate(lambda t, y: [3 * math.cos(3 * t) * y[0]], [scales.clone()], 0.0, 4.0, co,
                    control=StepControl(rtol=1e-12, atol=1e-12), on_step=builder.add_step)
    interp, ratio = builder.finish()
    fine = np.linspace(0.0, 4.0, 4001)
    exact = torch.tensor(_exp_sin(fine))[:, None] * scales
    measured = _weighted_error(interp.many(fine), exact, adjoint_tol, adjoint_tol)
    estimate = ratio * adjoint_tol
    assert measured <= estimate <= adjoint_tol
    assert interp.breaks[0] == 0.0 and interp.breaks[-1] == 4.0
    assert interp.values.shape[0] == sum(interp.degrees) + 1
    # Far fewer stored states than forward steps when the adjoint tolerance is the looser.
    if adjoint_tol == 1e-4:
        assert interp.values.shape[0] < res.accepted / 3


def test_piecewise_interpolant_is_exact_for_piecewise_polynomials_and_continuous():
    breaks = [1.0, 0.6, 0.1, -0.5]  # decreasing time works too
    degrees = [4, 2, 8]
    c1 = 3 * 0.6**4 - 0.6 - 0.5 * 0.6**2  # constants make the pieces meet at the breaks
    c2 = 0.5 * 0.1**2 + c1 - (0.1**7 - 0.2)
    pieces = [lambda t: 3 * t**4 - t, lambda t: 0.5 * t**2 + c1, lambda t: t**7 - 2 * t + c2]
    rows = [pieces[0](breaks[0])]
    for (a, b), q, p in zip(itertools.pairwise(breaks), degrees, pieces, strict=True):
        nodes, _ = chebyshev_lobatto(a, b, q)
        rows += [p(x) for x in nodes[1:]]
    interp = PiecewiseChebyshev(breaks, degrees, torch.tensor(rows, dtype=F64)[:, None])
    for t in np.linspace(-0.5, 1.0, 301):
        k = 0 if t >= 0.6 else (1 if t >= 0.1 else 2)
        assert abs(float(interp(float(t))) - pieces[k](t)) < 1e-12
    for b in breaks[1:-1]:
        assert abs(float(interp(b + 1e-13)) - float(interp(b - 1e-13))) < 1e-10


@pytest.mark.parametrize("solver", ["dopri5", "rk4"])
def test_gradcheck_auto_interpolant(solver):
    torch.manual_seed(1)
    f = MLP(d=2, hidden=5).to(F64)
    z0 = torch.randn(2, 2, dtype=F64, requires_grad=True)
    kw = {"steps": 24} if solver == "rk4" else {"rtol": 1e-10, "atol": 1e-10}

    def fn(z0, *ps):
        return odeint(f, z0, torch.tensor([0.0, 0.4, 1.5]), solver=solver, grad="irdm",
                      params=ps, **kw).z

    assert torch.autograd.gradcheck(fn, (z0, *f.parameters()), eps=1e-6, atol=1e-6, rtol=1e-4,
                                    fast_mode=True)


@pytest.mark.parametrize("t", [[0.0, 0.7, 2.0], [2.0, 1.2, 0.0]])
def test_auto_irdm_matches_backprop_forward_and_backward_in_time(t):
    torch.manual_seed(0)
    f = MLP().to(F64)
    z0 = torch.randn(4, 3, dtype=F64)
    tt = torch.tensor(t)
    ref, _ = grads_of(f, z0, tt, "backprop", rtol=1e-10, atol=1e-10)
    gs, st, warned = _irdm_grads(f, z0, tt, rtol=1e-8, atol=1e-8)
    assert rel_err(gs, ref) < 1e-6 and not warned
    assert st.interp_error <= st.interp_tol


def test_fixed_step_solvers_interpolate_their_dense_output_tightly():
    torch.manual_seed(0)
    f = MLP().to(F64)
    z0 = torch.randn(4, 3, dtype=F64)
    t = torch.tensor([0.0, 1.0])
    for solver, steps, single in (("euler", 20, 1), ("rk2", 20, 2), ("rk4", 10, 4)):
        ref, _ = grads_of(f, z0, t, "backprop", solver=solver, steps=steps)
        gs, st, warned = _irdm_grads(f, z0, t, solver=solver, steps=steps)
        assert not warned and st.interp_tol == 1e-10 and st.interp_error <= 1e-10
        # At most one step's dense-output polynomial per step, nothing more.
        assert st.interp_nodes <= single * steps + 1
        assert rel_err(gs, ref) < (5e-2 if solver == "euler" else 1e-3)


@pytest.mark.parametrize(("value", "canon"), [("auto", "auto"), (" AUTO ", "auto"), (16, 16),
                                              ("24", 24), (8.0, 8)])
def test_cheb_nodes_values(value, canon):
    cfg = SolverConfig(grad="irdm", cheb_nodes=value)
    assert cfg.cheb_nodes == canon
    assert SolverConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("value", [1, 0, "many", True, 2.5])
def test_cheb_nodes_rejects(value):
    with pytest.raises(UsageError, match="cheb_nodes must be 'auto' or an integer >= 2"):
        SolverConfig(grad="irdm", cheb_nodes=value)
    with pytest.raises(UsageError, match="cheb_nodes"):
        odeint(MLP(), torch.randn(2, 3), torch.tensor([0.0, 1.0]), grad="irdm", cheb_nodes=value)


def test_defaults_are_auto():
    assert SolverConfig().cheb_nodes == "auto"
    sol = odeint(MLP(), torch.randn(2, 3, requires_grad=True), torch.tensor([0.0, 1.0]),
                 grad="irdm")
    assert sol.stats.interp_segments >= 1 and sol.stats.interp_error is not None
