"""Tableaux, solver orders, dopri5 step control and dense output, statistics, torchdiffeq."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from odekit.errors import NumericalError, UsageError
from odekit.ode import SOLVERS, ButcherTableau, odeint
from odekit.ode.solver import integrate
from odekit.ode.tableau import (
    dopri5_tableau,
    rk2_tableau,
    rk4_tableau,
    step_coefficients,
)

F64 = torch.float64
# Damped rotation: z' = A z, z(t) = expm(A t) z0, with a time-dependent variant below.
A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=F64)
Z0 = torch.tensor([[1.0, 0.0], [0.3, -0.5]], dtype=F64)


def linear(t, z):
    return z @ A.T


def exact(t: float) -> torch.Tensor:
    return Z0 @ torch.linalg.matrix_exp(A * t).T


def nonauto(t, z):
    # z' = cos(t) z (per component), z(t) = z0 exp(sin t): exercises the stage times.
    return torch.cos(t) * z


def slope(ns, errs) -> float:
    return float(np.polyfit(np.log(ns), np.log(errs), 1)[0])


# ------------------------------------------------------------------ tableaux


def test_tableau_validation_rejects_inconsistent_coefficients():
    with pytest.raises(UsageError, match="row 1"):
        ButcherTableau("bad", (0.0, 0.5), ((), (0.4,)), (0.5, 0.5), order=2)
    with pytest.raises(UsageError, match="sum to"):
        ButcherTableau("bad", (0.0, 0.5), ((), (0.5,)), (0.5, 0.6), order=2)
    with pytest.raises(UsageError, match="error weights"):
        ButcherTableau("bad", (0.0,), ((),), (1.0,), order=1, b_err=(0.1,), err_order=0)
    with pytest.raises(UsageError, match="theta=1"):
        ButcherTableau("bad", (0.0,), ((),), (1.0,), order=1, dense=((0.5,),))


def test_builtin_tableaux_properties():
    d = dopri5_tableau()
    assert d.stages == 7 and d.fsal and d.adaptive and d.step_order == 4
    assert abs(sum(d.b_err)) < 1e-15
    assert not rk4_tableau().fsal
    # Dense output reproduces b at theta = 1 and is zero at theta = 0 by construction.
    for tab in (d, rk4_tableau(), rk2_tableau(0.3)):
        assert np.allclose([sum(r) for r in tab.dense], tab.b, atol=1e-14)
    assert SOLVERS.names() == ["euler", "rk2", "rk4", "dopri5"]


@pytest.mark.parametrize("u", [0.0, -0.5, 1.5, float("nan")])
def test_rk2_invalid_u_is_a_clear_error(u):
    with pytest.raises(UsageError, match=r"\(0, 1\]"):
        rk2_tableau(u)
    with pytest.raises(UsageError, match=r"\(0, 1\]"):
        odeint(linear, Z0, torch.tensor([0.0, 1.0]), solver="rk2", steps=4, u=torch.tensor(u))


def test_rk2_u_half_is_midpoint_and_one_is_heun():
    mid, heun = rk2_tableau(0.5), rk2_tableau(1.0)
    assert mid.c == (0.0, 0.5) and mid.b == (0.0, 1.0)
    assert heun.c == (0.0, 1.0) and heun.b == (0.5, 0.5)


def test_unknown_names_come_from_the_registry():
    with pytest.raises(UsageError) as e:
        odeint(linear, Z0, torch.tensor([0.0, 1.0]), solver="rk45")
    assert "euler, rk2, rk4, dopri5" in e.value.one_line()
    with pytest.raises(UsageError) as e:
        odeint(linear, Z0, torch.tensor([0.0, 1.0]), grad="adjoint")
    assert "backprop, rdm, anode, irdm" in e.value.one_line()


def test_bad_settings_raise_usage_errors():
    t = torch.tensor([0.0, 1.0])
    with pytest.raises(UsageError, match="needs 'steps'"):
        odeint(linear, Z0, t, solver="rk4")
    with pytest.raises(UsageError, match="adaptive"):
        odeint(linear, Z0, t, solver="dopri5", steps=3)
    with pytest.raises(UsageError, match="positive integer"):
        odeint(linear, Z0, t, solver="euler", steps=0)
    with pytest.raises(UsageError, match="strictly"):
        odeint(linear, Z0, torch.tensor([0.0, 1.0, 0.5]), solver="euler", steps=2)
    with pytest.raises(UsageError, match="1-D"):
        odeint(linear, Z0, torch.tensor([0.0]), solver="euler", steps=2)
    with pytest.raises(UsageError, match="rtol"):
        odeint(linear, Z0, t, rtol=0.0)


# ------------------------------------------------------------------ convergence orders


@pytest.mark.parametrize(
    ("solver", "u", "order"),
    [("euler", 0.5, 1), ("rk2", 0.25, 2), ("rk2", 0.5, 2), ("rk2", 1.0, 2), ("rk4", 0.5, 4)],
)
def test_fixed_step_convergence_order(solver, u, order):
    ns = [32, 64, 128, 256] if order < 4 else [8, 16, 32, 64]
    t = torch.tensor([0.0, 2.0])
    ref = Z0 * math.exp(math.sin(2.0))
    errs = [
        (odeint(nonauto, Z0, t, solver=solver, steps=n, u=u).z[-1] - ref).abs().max().item()
        for n in ns
    ]
    assert abs(-slope(ns, errs) - order) < 0.15


def test_dopri5_tableau_is_fifth_order_with_fixed_steps():
    co = step_coefficients("dopri5")
    ns = [4, 8, 16, 32]
    errs = []
    for n in ns:

        def dyn(t, y):
            return [linear(t, y[0])]

        res = integrate(dyn, [Z0], 0.0, 2.0, co, fixed_steps=n)
        errs.append((res.y[0] - exact(2.0)).abs().max().item())
    assert abs(-slope(ns, errs) - 5.0) < 0.3


def test_rk2_tensor_u_matches_float_u():
    t = torch.tensor([0.0, 1.0])
    for u in (0.3, 0.5, 1.0):
        a = odeint(nonauto, Z0, t, solver="rk2", steps=7, u=u).z
        b = odeint(nonauto, Z0, t, solver="rk2", steps=7, u=torch.tensor(u, dtype=F64)).z
        assert torch.allclose(a, b, rtol=0, atol=1e-14)


def test_dopri5_error_scales_with_tolerance():
    tols = [1e-4, 1e-6, 1e-8, 1e-10]
    errs, nfes = [], []
    for tol in tols:
        sol = odeint(linear, Z0, torch.tensor([0.0, 2.0]), rtol=tol, atol=tol)
        errs.append((sol.z[-1] - exact(2.0)).abs().max().item())
        nfes.append(sol.stats.nfe_forward)
    for tol, err in zip(tols, errs, strict=True):
        assert err < 20 * tol
    assert all(a > b for a, b in itertools.pairwise(errs))
    assert 0.7 < slope(tols, errs) < 1.3
    assert nfes == sorted(nfes)


def test_dense_output_order_inside_a_step():
    """Local error of the continuous extension at theta=0.37 scales like h^(q+1)."""
    for solver, q in (("dopri5", 4), ("rk4", 3)):
        co = step_coefficients(solver)
        hs = [0.4, 0.2, 0.1, 0.05]
        errs = []
        for h in hs:

            def dyn(t, y):
                return [linear(t, y[0])]

            res = integrate(dyn, [Z0], 0.0, h, co, fixed_steps=1, out_times=[0.37 * h])
            errs.append((res.outputs[0] - exact(0.37 * h)).abs().max().item())
        assert abs(slope(hs, errs) - (q + 1)) < 0.35, (solver, errs)


def test_dense_output_at_many_times_is_accurate():
    t = torch.linspace(0.0, 3.0, 31, dtype=F64)
    sol = odeint(linear, Z0, t, rtol=1e-8, atol=1e-8)
    want = torch.stack([exact(float(x)) for x in t])
    assert (sol.z - want).abs().max().item() < 1e-7
    # Outputs are interpolated, not stepped to: same steps as a plain [0, 3] solve.
    plain = odeint(linear, Z0, t[[0, -1]], rtol=1e-8, atol=1e-8)
    assert sol.stats == plain.stats


def test_backward_in_time_and_feature_maps_float32():
    z0 = torch.randn(3, 2, 5, 5)
    sol = odeint(lambda t, z: -z, z0, torch.tensor([1.0, 0.0]), rtol=1e-6, atol=1e-7)
    assert sol.z.shape == (2, 3, 2, 5, 5) and sol.z.dtype == torch.float32
    assert torch.allclose(sol.z[-1], z0 * math.e, rtol=1e-5)
    sol = odeint(lambda t, z: -z, z0, torch.tensor([0.0, 1.0]), solver="rk4", steps=10)
    assert torch.allclose(sol.z[-1], z0 * math.exp(-1), rtol=1e-5)


class Counting(torch.nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn
        self.calls = 0

    def forward(self, t, z):
        self.calls += 1
        return self.fn(t, z)


def test_statistics_are_exact_counts():
    for solver, kw, per_step in (("euler", {"steps": 5}, 1), ("rk2", {"steps": 5}, 2),
                                 ("rk4", {"steps": 5}, 4)):
        f = Counting(linear)
        sol = odeint(f, Z0, torch.tensor([0.0, 0.5, 1.0]), solver=solver, **kw)
        assert sol.stats.nfe_forward == f.calls == 5 * per_step
        assert sol.stats.accepted_steps == 5 and sol.stats.rejected_steps == 0
    f = Counting(linear)
    sol = odeint(f, Z0, torch.tensor([0.0, 4.0]), rtol=1e-7, atol=1e-7, first_step=1.0)
    st = sol.stats
    assert st.rejected_steps > 0
    # FSAL: one initial k1, then 6 new evaluations per attempted step.
    assert f.calls == st.nfe_forward == 1 + 6 * (st.accepted_steps + st.rejected_steps)
    f = Counting(linear)
    sol = odeint(f, Z0, torch.tensor([0.0, 4.0]), rtol=1e-7, atol=1e-7)
    st = sol.stats
    assert f.calls == st.nfe_forward == 2 + 6 * (st.accepted_steps + st.rejected_steps)


def test_max_steps_and_blow_up_raise_numerical_errors():
    with pytest.raises(NumericalError, match="more than 5 steps"):
        odeint(linear, Z0, torch.tensor([0.0, 10.0]), rtol=1e-9, atol=1e-9, max_steps=5)
    with pytest.raises(NumericalError):
        odeint(lambda t, z: z**2, torch.ones(1), torch.tensor([0.0, 2.0]))
    with pytest.raises(NumericalError, match="not finite"):
        odeint(lambda t, z: z**3, torch.ones(1) * 10, torch.tensor([0.0, 5.0]),
               solver="euler", steps=20)


def test_min_and_max_step():
    sol = odeint(linear, Z0, torch.tensor([0.0, 1.0]), max_step=0.05)
    assert sol.stats.accepted_steps >= 20
    with pytest.raises(NumericalError, match="underflow"):
        odeint(linear, Z0, torch.tensor([0.0, 1.0]), rtol=1e-12, atol=1e-12, min_step=0.1)


def test_matches_torchdiffeq_dopri5():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    net = net.to(F64)

    def f(t, z):
        return net(z) * (1 + torch.sin(3 * t))

    z0 = torch.randn(16, 3, dtype=F64)
    t = torch.linspace(0, 2, 5, dtype=F64)
    tight = torchdiffeq.odeint(f, z0, t, rtol=1e-12, atol=1e-12, method="dopri5")
    assert (odeint(f, z0, t, rtol=1e-12, atol=1e-12).z - tight).abs().max().item() < 1e-10
    for tol in (1e-3, 1e-5, 1e-7):
        ours = odeint(f, z0, t, rtol=tol, atol=tol)
        calls = Counting(f)
        theirs = torchdiffeq.odeint(calls, z0, t, rtol=tol, atol=tol, method="dopri5")
        # Same accuracy class (global error a small multiple of tol) at similar cost.
        e_ours = (ours.z - tight).abs().max().item()
        e_theirs = (theirs - tight).abs().max().item()
        assert (ours.z - theirs).abs().max().item() < 50 * tol
        assert e_ours < 50 * tol and e_ours < 2 * e_theirs
        assert abs(ours.stats.nfe_forward - calls.calls) <= 0.25 * calls.calls
