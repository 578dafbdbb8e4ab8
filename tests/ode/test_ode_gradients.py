"""Gradient methods: agreement with backprop, gradcheck, exact NFE-B, IRDM interpolation,
and the RDM instability of thesis fig. 2.1."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from odekit.ode import GRADIENT_METHODS, InterpolationWarning, odeint
from odekit.ode.examples import DissipativeConvField
from odekit.ode.interp import (
    BarycentricInterpolant,
    barycentric_coefficients,
    chebyshev_lobatto,
)

F64 = torch.float64
METHODS = ["backprop", "rdm", "anode", "irdm"]


class MLP(nn.Module):
    def __init__(self, d: int = 3, hidden: int = 16) -> None:
        super().__init__()
        self.l1 = nn.Linear(d, hidden)
        self.l2 = nn.Linear(hidden, d)
        self.calls = 0

    def forward(self, t, z):
        self.calls += 1
        return self.l2(torch.tanh(self.l1(z))) * (1 + 0.5 * torch.sin(2 * t))


def rel_err(gs, ref) -> float:
    return max(((a - b).norm() / b.norm()).item() for a, b in zip(gs, ref, strict=True))


def grads_of(f, z0, t, grad, **kw):
    z0 = z0.detach().requires_grad_(True)
    sol = odeint(f, z0, t, grad=grad, **kw)
    # Weight every output time so the jumps of a at interior times are exercised.
    w = torch.arange(1, len(t) + 1, dtype=z0.dtype).view(-1, *([1] * z0.ndim))
    loss = (w * sol.z**2).sum() + sol.z[-1].sum()
    return torch.autograd.grad(loss, [z0, *f.parameters()]), sol.stats


def test_registry_names():
    assert GRADIENT_METHODS.names() == METHODS


@pytest.mark.parametrize("grad", METHODS[1:])
@pytest.mark.parametrize(
    ("solver", "kw", "tol"),
    [
        ("dopri5", {"rtol": 1e-9, "atol": 1e-9}, 1e-6),  # irdm: cheb_nodes "auto"
        ("rk4", {"steps": 40}, 1e-6),
        ("rk2", {"steps": 100, "u": 0.7}, 1e-4),
        ("euler", {"steps": 100}, 5e-2),  # continuous adjoint vs discrete gradient: O(h)
    ],
)
def test_gradients_match_backprop(grad, solver, kw, tol):
    torch.manual_seed(0)
    f = MLP().to(F64)
    z0 = torch.randn(4, 3, dtype=F64)
    t = torch.tensor([0.0, 0.3, 1.0])
    ref, _ = grads_of(f, z0, t, "backprop", solver=solver, **kw)
    gs, st = grads_of(f, z0, t, grad, solver=solver, checkpoints=3, **kw)
    assert [g.shape for g in gs] == [g.shape for g in ref]  # each parameter's own shape
    assert rel_err(gs, ref) < (1e-12 if grad == "anode" else tol)
    assert st.nfe_backward > 0


@pytest.mark.parametrize("grad", METHODS)
@pytest.mark.filterwarnings("ignore::odekit.ode.InterpolationWarning")  # fixed N on purpose
def test_gradcheck_float64(grad):
    torch.manual_seed(1)
    f = MLP(d=2, hidden=5).to(F64)
    z0 = torch.randn(2, 2, dtype=F64, requires_grad=True)
    params = tuple(f.parameters())

    def fn(z0, *ps):
        return odeint(f, z0, torch.tensor([0.0, 0.4, 1.0]), solver="rk4", steps=24, grad=grad,
                      cheb_nodes=20, params=ps).z

    assert torch.autograd.gradcheck(fn, (z0, *params), eps=1e-6, atol=1e-6, rtol=1e-4,
                                    fast_mode=True)


@pytest.mark.parametrize("grad", ["backprop", "anode", "irdm"])
@pytest.mark.filterwarnings("ignore::odekit.ode.InterpolationWarning")  # fixed N on purpose
def test_gradcheck_float64_dopri5(grad):
    torch.manual_seed(2)
    f = MLP(d=2, hidden=4).to(F64)
    z0 = torch.randn(1, 2, dtype=F64, requires_grad=True)

    def fn(z0, *ps):
        return odeint(f, z0, torch.tensor([0.0, 1.0]), rtol=1e-11, atol=1e-11, grad=grad,
                      cheb_nodes=24, params=ps).z[-1]

    assert torch.autograd.gradcheck(fn, (z0, *f.parameters()), eps=1e-6, atol=1e-5, rtol=1e-3,
                                    fast_mode=True)


@pytest.mark.parametrize("grad", METHODS)
@pytest.mark.parametrize("solver", ["dopri5", "rk4"])
def test_nfe_counts_are_exact(grad, solver):
    torch.manual_seed(0)
    f = MLP().to(F64)
    z0 = torch.randn(4, 3, dtype=F64, requires_grad=True)
    kw = {"steps": 6} if solver == "rk4" else {"rtol": 1e-6, "atol": 1e-6}
    sol = odeint(f, z0, torch.tensor([0.0, 0.5, 1.0]), solver=solver, grad=grad,
                 checkpoints=2, **kw)
    assert f.calls == sol.stats.nfe_forward
    f.calls = 0
    sol.z.sum().backward()
    assert f.calls == sol.stats.nfe_backward
    if grad == "backprop":
        assert sol.stats.nfe_backward == 0
    if grad == "anode" and solver == "rk4":
        assert sol.stats.nfe_backward == sol.stats.nfe_forward  # exact replay, no rejections
    if grad == "anode" and solver == "dopri5":
        # Replay of the accepted steps: 6 new stages each, plus one k1 per segment (K=2).
        assert sol.stats.nfe_backward == 6 * sol.stats.accepted_steps + 2


def test_irdm_forward_costs_no_extra_evaluations():
    torch.manual_seed(0)
    f = MLP().to(F64)
    z0 = torch.randn(4, 3, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0])
    a = odeint(f, z0, t, grad="backprop", rtol=1e-6, atol=1e-6)
    for cheb in (32, "auto"):
        b = odeint(f, z0, t, grad="irdm", cheb_nodes=cheb, rtol=1e-6, atol=1e-6)
        # irdm adds only its interpolation statistics.
        assert a.stats == dataclasses.replace(b.stats, interp_error=None, interp_tol=None,
                                              interp_nodes=0, interp_segments=0)
        assert b.stats.interp_nodes > 0 and b.stats.interp_tol == 1e-6
        assert torch.equal(a.z.detach(), b.z.detach())


def test_anode_checkpoints_give_the_same_gradient():
    torch.manual_seed(0)
    f = MLP().to(F64)
    z0 = torch.randn(4, 3, dtype=F64)
    t = torch.tensor([0.0, 0.25, 0.6, 1.0])
    ref, _ = grads_of(f, z0, t, "backprop", rtol=1e-6, atol=1e-6)
    nfes = []
    for k in (1, 2, 5):
        gs, st = grads_of(f, z0, t, "anode", checkpoints=k, rtol=1e-6, atol=1e-6)
        assert rel_err(gs, ref) < 1e-12
        nfes.append(st.nfe_backward)
    assert nfes[0] < nfes[1] < nfes[2]


def test_seminorm_saves_backward_work():
    torch.manual_seed(0)
    f = MLP(hidden=32).to(F64)
    z0 = torch.randn(16, 3, dtype=F64)
    t = torch.tensor([0.0, 2.0])
    ref, _ = grads_of(f, z0, t, "backprop", rtol=1e-8, atol=1e-8)
    for grad in ("rdm", "irdm"):
        full, st_full = grads_of(f, z0, t, grad, rtol=1e-5, atol=1e-5)
        semi, st_semi = grads_of(f, z0, t, grad, rtol=1e-5, atol=1e-5, seminorm=True)
        assert st_semi.nfe_backward <= st_full.nfe_backward
        assert rel_err(semi, ref) < 1e-3 and rel_err(full, ref) < 1e-3


@pytest.mark.parametrize("grad", ["rdm", "irdm"])
def test_adjoint_tolerance_trades_backward_work_for_accuracy(grad):
    """adjoint_rtol/atol drive only the backward solves: the forward solve is untouched, a
    looser adjoint tolerance takes fewer backward evaluations, and the gradient error
    follows the adjoint tolerance down to the forward solve's own error."""
    torch.manual_seed(0)
    f = MLP(hidden=32).to(F64)
    z0 = torch.randn(16, 3, dtype=F64)
    t = torch.tensor([0.0, 2.0])
    ref, _ = grads_of(f, z0, t, "backprop", rtol=1e-10, atol=1e-10)
    runs = {}
    for bt in (1e-2, 1e-4, 1e-6, 1e-8):
        gs, st = grads_of(f, z0, t, grad, rtol=1e-8, atol=1e-8, adjoint_rtol=bt, adjoint_atol=bt)
        runs[bt] = (rel_err(gs, ref), st)
    assert len({st.nfe_forward for _, st in runs.values()}) == 1
    nfe_b = [st.nfe_backward for _, st in runs.values()]
    errs = [e for e, _ in runs.values()]
    assert nfe_b == sorted(nfe_b) and nfe_b[0] < nfe_b[-1]
    assert errs[0] > errs[1] > errs[2] and errs[-1] < 1e-6
    assert errs[1] < 1e-2  # a 1e-4 tolerance on the normalised adjoint is a relative one
    same, st_same = grads_of(f, z0, t, grad, rtol=1e-6, atol=1e-6)
    expl, st_expl = grads_of(f, z0, t, grad, rtol=1e-6, atol=1e-6, adjoint_rtol=1e-6,
                             adjoint_atol=1e-6)
    assert st_same.nfe_backward == st_expl.nfe_backward
    assert rel_err(same, expl) == 0.0


@pytest.mark.parametrize("kw", [{"adjoint_rtol": 0.0}, {"adjoint_atol": -1e-3}])
def test_adjoint_tolerances_must_be_positive(kw):
    from odekit.errors import UsageError

    with pytest.raises(UsageError, match="must be positive"):
        odeint(MLP(), torch.randn(2, 3), torch.tensor([0.0, 1.0]), grad="irdm", **kw)


def test_functional_rhs_with_explicit_params_and_z0_only():
    torch.manual_seed(0)
    w = torch.randn(3, 3, dtype=F64, requires_grad=True)

    def f(t, z):
        return torch.tanh(z @ w)

    z0 = torch.randn(5, 3, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0])
    out = {}
    for grad in METHODS:
        sol = odeint(f, z0, t, grad=grad, params=[w], rtol=1e-9, atol=1e-9)
        out[grad] = torch.autograd.grad(sol.z[-1].sum(), [z0, w])
    for grad in METHODS[1:]:
        assert rel_err(out[grad], out["backprop"]) < 1e-6
    # Only z0 requires grad: params=() works too.
    sol = odeint(lambda t, z: -z, z0, t, grad="irdm", rtol=1e-9, atol=1e-9)
    (g,) = torch.autograd.grad(sol.z[-1].sum(), [z0])
    assert torch.allclose(g, torch.full_like(g, math.exp(-1)), atol=1e-8)


def test_float32_feature_maps():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, padding=1)

    def f(t, z):
        return torch.tanh(conv(z))

    z0 = torch.randn(2, 3, 6, 6)
    t = torch.tensor([0.0, 1.0])
    ref = None
    for grad in METHODS:
        sol = odeint(f, z0.requires_grad_(), t, grad=grad, params=list(conv.parameters()),
                     rtol=1e-5, atol=1e-6)
        assert sol.z.dtype == torch.float32 and sol.z.shape == (2, 2, 3, 6, 6)
        gs = torch.autograd.grad(sol.z[-1].square().sum(), [z0, *conv.parameters()])
        ref = gs if ref is None else ref
        assert rel_err(gs, ref) < 1e-3


# ------------------------------------------------------------------ IRDM interpolation


def test_chebyshev_nodes_and_weights_are_a_matching_pair():
    nodes, w = chebyshev_lobatto(0.0, 1.0, 8)
    assert nodes.dtype == np.float64 and nodes[0] == 0.0 and nodes[-1] == 1.0
    assert np.all(np.diff(nodes) > 0)
    assert np.allclose(np.abs(w), [0.5] + [1.0] * 7 + [0.5])
    # Interpolates polynomials of degree <= N exactly.
    x = np.linspace(0, 1, 101)
    vals = torch.tensor(nodes**8 - 3 * nodes**5 + nodes)
    interp = BarycentricInterpolant(nodes, w, vals.view(-1, 1))
    got = interp.many(list(x)).squeeze(1).numpy()
    assert np.abs(got - (x**8 - 3 * x**5 + x)).max() < 1e-12
    # Exact node hits return the stored value (no 0/0).
    lam = barycentric_coefficients(float(nodes[3]), nodes, w)
    assert lam[3] == 1.0 and lam.sum() == 1.0


def test_irdm_interpolation_error_decays_spectrally():
    """On a smooth trajectory the BLI error falls geometrically with N; first-kind weights on
    the end-point grid (the public reference code's pairing) do much worse."""

    def exact(t: float) -> torch.Tensor:  # z' = [[-0.2, 3], [-3, -0.2]] z, z(0) = (1, 0.5)
        c, s, d = math.cos(3 * t), math.sin(3 * t), math.exp(-0.2 * t)
        return torch.tensor([[d * (c + 0.5 * s), d * (0.5 * c - s)]], dtype=F64)

    fine = list(np.linspace(0.0, 2.0, 201))
    truth = torch.stack([exact(t) for t in fine])
    errs, bad = [], []
    for n in (4, 8, 12, 16, 24):
        nodes, w = chebyshev_lobatto(0.0, 2.0, n)
        vals = torch.stack([exact(float(t)) for t in nodes])
        errs.append((BarycentricInterpolant(nodes, w, vals).many(fine) - truth).abs().max().item())
        k = np.arange(n + 1)
        w_first = (-1.0) ** k * np.sin((2 * k + 1) * np.pi / (2 * n + 2))
        bad.append((BarycentricInterpolant(nodes, w_first, vals).many(fine) - truth)
                   .abs().max().item())
    assert errs[-1] < 1e-13
    assert all(x > 100 * y for x, y in itertools.pairwise(errs[:4]))  # geometric decay
    assert bad[3] > 1e4 * errs[3]


def test_irdm_gradient_error_decreases_with_nodes():
    torch.manual_seed(0)
    f = MLP().to(F64)
    z0 = torch.randn(8, 3, dtype=F64)
    t = torch.tensor([0.0, 1.5])
    ref, _ = grads_of(f, z0, t, "backprop", rtol=1e-10, atol=1e-10)
    with pytest.warns(InterpolationWarning) as caught:
        runs = [grads_of(f, z0, t, "irdm", cheb_nodes=n, rtol=1e-10, atol=1e-10)
                for n in (3, 6, 12)]
    errs = [rel_err(gs, ref) for gs, _ in runs]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-7
    # The estimate follows the same decay, and each fixed N says it misses 1e-10.
    estimates = [st.interp_error for _, st in runs]
    assert estimates[0] > estimates[1] > estimates[2] > 1e-10
    assert [w.message.error for w in caught] == estimates


# ------------------------------------------------------------------ thesis fig. 2.1


def test_rdm_instability_fig_2_1_and_irdm_stays_accurate():
    torch.manual_seed(0)
    f = DissipativeConvField().to(F64)
    z0 = torch.randn(2, 4, 8, 8, dtype=F64)
    tol = 1e-6
    with torch.no_grad():
        z1 = odeint(f, z0, torch.tensor([0.0, 1.0]), rtol=tol, atol=tol).z[-1]
        z0_hat = odeint(f, z1, torch.tensor([1.0, 0.0]), rtol=tol, atol=tol).z[-1]
    # Backward reconstruction of z0 fails completely (fig. 2.1, right image).
    assert ((z0_hat - z0).norm() / z0.norm()).item() > 0.5
    t = torch.tensor([0.0, 1.0])
    ref, _ = grads_of(f, z0, t, "backprop", rtol=tol, atol=tol)
    rdm, _ = grads_of(f, z0, t, "rdm", rtol=tol, atol=tol)
    irdm, _ = grads_of(f, z0, t, "irdm", rtol=tol, atol=tol)
    assert rel_err(rdm, ref) > 0.1
    assert rel_err(irdm, ref) < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_all_methods():
    torch.manual_seed(0)
    f = MLP().cuda()
    z0 = torch.randn(4, 3, device="cuda")
    t = torch.tensor([0.0, 1.0])
    ref, _ = grads_of(f, z0, t, "backprop", rtol=1e-6, atol=1e-6)
    for grad in METHODS[1:]:
        gs, _ = grads_of(f, z0, t, grad, rtol=1e-6, atol=1e-6)
        assert rel_err(gs, ref) < 1e-3
    sol = odeint(f, z0, t, solver="rk2", steps=4, u=torch.tensor(0.7, device="cuda"))
    assert sol.z.device.type == "cuda"


@pytest.mark.parametrize("grad", ["rdm", "irdm"])
def test_adjoint_accuracy_does_not_depend_on_loss_scale(grad):
    """The backward solves are run for the normalised cotangent, so scaling the loss (e.g. a
    mean over a large batch) scales the gradient exactly and costs the same steps."""
    torch.manual_seed(0)
    f = MLP().to(F64)
    z0 = torch.randn(8, 3, dtype=F64, requires_grad=True)
    out = []
    for scale in (1.0, 1e-7):
        sol = odeint(f, z0, torch.tensor([0.0, 1.0]), grad=grad, rtol=1e-5, atol=1e-5)
        gs = torch.autograd.grad(scale * sol.z[-1].square().sum(), [z0, *f.parameters()])
        out.append(([g / scale for g in gs], sol.stats.nfe_backward))
    assert rel_err(out[1][0], out[0][0]) < 1e-12
    assert out[0][1] == out[1][1]
