"""Heavier numerical checks (run with `pytest -m slow`)."""

from __future__ import annotations

import pytest
import torch
from test_ode_gradients import METHODS, MLP, grads_of, rel_err

from odekit.ode import odeint
from odekit.ode.examples import DissipativeConvField

F64 = torch.float64
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("grad", METHODS)
@pytest.mark.parametrize("solver", ["rk4", "dopri5"])
def test_full_gradcheck(grad, solver):
    torch.manual_seed(3)
    f = MLP(d=2, hidden=6).to(F64)
    z0 = torch.randn(3, 2, dtype=F64, requires_grad=True)
    kw = {"steps": 30} if solver == "rk4" else {"rtol": 1e-11, "atol": 1e-11}

    def fn(z0, *ps):
        return odeint(f, z0, torch.tensor([0.0, 0.5, 1.2]), solver=solver, grad=grad,
                      checkpoints=2, params=ps, **kw).z  # irdm: cheb_nodes "auto"

    assert torch.autograd.gradcheck(fn, (z0, *f.parameters()), eps=1e-6, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("gain", [3.0, 5.0])
def test_rdm_instability_grows_with_dissipation(gain):
    torch.manual_seed(0)
    f = DissipativeConvField(channels=8, gain=gain).to(F64)
    z0 = torch.randn(4, 8, 8, 8, dtype=F64)
    t = torch.tensor([0.0, 1.0])
    ref, _ = grads_of(f, z0, t, "backprop", rtol=1e-7, atol=1e-7)
    rdm, _ = grads_of(f, z0, t, "rdm", rtol=1e-7, atol=1e-7)
    irdm, st = grads_of(f, z0, t, "irdm", rtol=1e-7, atol=1e-7)
    assert st.interp_error <= st.interp_tol
    assert rel_err(rdm, ref) > 0.1
    assert rel_err(irdm, ref) < 1e-3
