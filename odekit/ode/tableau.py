"""Butcher tableaux of the explicit Runge-Kutta solvers and the `SOLVERS` registry.

A tableau holds c, A, b, the embedded error weights e = b - b_hat (adaptive pairs) and the
dense-output polynomials b_i(theta) = sum_p D[i][p] theta^(p+1) of eq. 1.6, so that
z(t0 + theta h) = z0 + h sum_i b_i(theta) k_i needs no extra f evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction as Fr

import numpy as np
import torch

from odekit.errors import UsageError
from odekit.registry import Registry

_TOL = 1e-12


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit RK method; validates its own consistency conditions."""

    name: str
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]  # row i holds a_i0 .. a_i,i-1 (strictly lower part)
    b: tuple[float, ...]
    order: int
    b_err: tuple[float, ...] | None = None  # b - b_hat, sums to 0
    err_order: int | None = None  # order of the embedded method
    dense: tuple[tuple[float, ...], ...] | None = None  # D[i][p]: coefficient of theta^(p+1)
    dense_order: int | None = None
    fsal: bool = field(init=False)

    def __post_init__(self) -> None:
        s = len(self.c)
        if s == 0 or len(self.a) != s or len(self.b) != s:
            raise UsageError(f"tableau '{self.name}': c, A and b must all have {s} stages")
        for i, row in enumerate(self.a):
            if len(row) != i:
                raise UsageError(f"tableau '{self.name}': row {i} of A must have {i} entries")
            if abs(sum(row) - self.c[i]) > _TOL:
                raise UsageError(
                    f"tableau '{self.name}': row {i} of A sums to {sum(row)}, c_{i} = {self.c[i]}"
                )
        if abs(sum(self.b) - 1.0) > _TOL:
            raise UsageError(f"tableau '{self.name}': weights b sum to {sum(self.b)}, not 1")
        if self.b_err is not None:
            if len(self.b_err) != s or abs(sum(self.b_err)) > _TOL:
                raise UsageError(f"tableau '{self.name}': error weights must sum to 0")
            if self.err_order is None:
                raise UsageError(f"tableau '{self.name}': error weights need err_order")
        if self.dense is not None:
            if len(self.dense) != s:
                raise UsageError(f"tableau '{self.name}': dense output needs one row per stage")
            at_one = [sum(row) for row in self.dense]
            if any(abs(x - y) > _TOL for x, y in zip(at_one, self.b, strict=True)):
                raise UsageError(f"tableau '{self.name}': dense output at theta=1 must equal b")
        # First-same-as-last: the last stage is f(t+h, z_new), reusable as the next k1.
        fsal = s > 1 and self.c[-1] == 1.0 and all(
            abs(x - y) <= _TOL for x, y in zip(self.a[-1], self.b[:-1], strict=True)
        ) and self.b[-1] == 0.0
        object.__setattr__(self, "fsal", fsal)

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        return self.b_err is not None

    @property
    def step_order(self) -> int:
        """q = min(p, p_hat) of eq. 1.5 (the exponent there is 1/(q+1))."""
        return min(self.order, self.err_order or self.order)


def _f(rows):
    return tuple(tuple(float(x) for x in r) for r in rows)


def euler_tableau() -> ButcherTableau:
    return ButcherTableau("euler", (0.0,), ((),), (1.0,), order=1, dense=((1.0,),), dense_order=1)


def _check_u(u: float) -> float:
    u = float(u)
    if not 0.0 < u <= 1.0:
        raise UsageError(
            f"rk2 parameter u must lie in (0, 1], got {u}", "u=0.5 is the midpoint rule, u=1 Heun"
        )
    return u


def rk2_tableau(u: float = 0.5) -> ButcherTableau:
    """RK2(u): c2 = a21 = u, b2 = 1/(2u), b1 = 1 - b2; dense b2(theta) = theta^2/(2u)."""
    u = _check_u(u)
    b2 = 1.0 / (2.0 * u)
    return ButcherTableau(
        f"rk2(u={u:g})",
        (0.0, u),
        ((), (u,)),
        (1.0 - b2, b2),
        order=2,
        dense=((1.0, -b2), (0.0, b2)),
        dense_order=2,
    )


def rk4_tableau() -> ButcherTableau:
    """Classical RK4 with its third-order continuous extension."""
    return ButcherTableau(
        "rk4",
        (0.0, 0.5, 0.5, 1.0),
        ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
        (1 / 6, 1 / 3, 1 / 3, 1 / 6),
        order=4,
        dense=(
            (1.0, -1.5, 2 / 3),
            (0.0, 1.0, -2 / 3),
            (0.0, 1.0, -2 / 3),
            (0.0, -0.5, 2 / 3),
        ),
        dense_order=3,
    )


def _dopri5_rational():
    c = [Fr(0), Fr(1, 5), Fr(3, 10), Fr(4, 5), Fr(8, 9), Fr(1), Fr(1)]
    a = [
        [],
        [Fr(1, 5)],
        [Fr(3, 40), Fr(9, 40)],
        [Fr(44, 45), Fr(-56, 15), Fr(32, 9)],
        [Fr(19372, 6561), Fr(-25360, 2187), Fr(64448, 6561), Fr(-212, 729)],
        [Fr(9017, 3168), Fr(-355, 33), Fr(46732, 5247), Fr(49, 176), Fr(-5103, 18656)],
        [Fr(35, 384), Fr(0), Fr(500, 1113), Fr(125, 192), Fr(-2187, 6784), Fr(11, 84)],
    ]
    b = [Fr(35, 384), Fr(0), Fr(500, 1113), Fr(125, 192), Fr(-2187, 6784), Fr(11, 84), Fr(0)]
    b_hat = [
        Fr(5179, 57600), Fr(0), Fr(7571, 16695), Fr(393, 640),
        Fr(-92097, 339200), Fr(187, 2100), Fr(1, 40),
    ]
    # Hairer & Wanner's DOPRI5 continuous extension (contd5), coefficients d_i.
    d = [
        Fr(-12715105075, 11282082432), Fr(0), Fr(87487479700, 32700410799),
        Fr(-10690763975, 1880347072), Fr(701980252875, 199316789632),
        Fr(-1453857185, 822651844), Fr(69997945, 29380423),
    ]
    # contd5: y0 + th*(ydiff + (1-th)*(bspl + th*(ydiff - h k7 - bspl + (1-th)*h sum d k)))
    # with ydiff = h sum b k, bspl = h k1 - ydiff; expanded into powers of theta.
    e1 = [Fr(1)] + [Fr(0)] * 6
    e7 = [Fr(0)] * 6 + [Fr(1)]
    dense = [
        [e1[i], 3 * b[i] - 2 * e1[i] - e7[i] + d[i], -2 * b[i] + e1[i] + e7[i] - 2 * d[i], d[i]]
        for i in range(7)
    ]
    return c, a, b, [x - y for x, y in zip(b, b_hat, strict=True)], dense


def dopri5_tableau() -> ButcherTableau:
    """Dormand-Prince 5(4) with FSAL and the order-4 dense output of Hairer & Wanner."""
    c, a, b, e, dense = _dopri5_rational()
    return ButcherTableau(
        "dopri5",
        tuple(float(x) for x in c),
        _f(a),
        tuple(float(x) for x in b),
        order=5,
        b_err=tuple(float(x) for x in e),
        err_order=4,
        dense=_f(dense),
        dense_order=4,
    )


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver: how to build its tableau and whether it adapts its step."""

    name: str
    adaptive: bool
    stages: int
    order: int
    takes_u: bool = False

    def tableau(self, u: float = 0.5) -> ButcherTableau:
        return _FACTORIES[self.name](u)


_FACTORIES = {
    "euler": lambda u: euler_tableau(),
    "rk2": rk2_tableau,
    "rk4": lambda u: rk4_tableau(),
    "dopri5": lambda u: dopri5_tableau(),
}

SOLVERS: Registry[SolverSpec] = Registry("solver")
SOLVERS.add("euler", SolverSpec("euler", False, 1, 1), "explicit Euler, fixed step, order 1")
SOLVERS.add(
    "rk2", SolverSpec("rk2", False, 2, 2, takes_u=True),
    "RK2(u), fixed step, order 2 (u=0.5 midpoint, u=1 Heun)",
)
SOLVERS.add("rk4", SolverSpec("rk4", False, 4, 4), "classical Runge-Kutta, fixed step, order 4")
SOLVERS.add(
    "dopri5", SolverSpec("dopri5", True, 7, 5),
    "Dormand-Prince 5(4), adaptive (rtol/atol), FSAL, order-4 dense output",
)


class StepCoefficients:
    """Tableau coefficients in the form the stepping loop uses (floats, or 0-d tensors for RK2
    with a tensor u so the meta-solver can change u without rebuilding anything)."""

    def __init__(self, tab: ButcherTableau | None, u: torch.Tensor | None = None) -> None:
        if tab is not None:
            self.c: list = list(tab.c)
            self.a: list = [list(r) for r in tab.a]
            self.b: list = list(tab.b)
            self.e: list | None = list(tab.b_err) if tab.b_err is not None else None
            self.dense: list | torch.Tensor = [list(r) for r in tab.dense or ()]
            self.fsal = tab.fsal
            self.q = tab.step_order
            self.stages = tab.stages
        else:
            assert u is not None
            b2 = 0.5 / u
            self.c = [0.0, u]
            self.a = [[], [u]]
            self.b = [1.0 - b2, b2]
            self.e = None
            zero = torch.zeros_like(b2)
            one = torch.ones_like(b2)
            self.dense = torch.stack([torch.stack([one, -b2]), torch.stack([zero, b2])])
            self.fsal = False
            self.q = 2
            self.stages = 2

    def dense_weights(self, thetas: Sequence[float] | np.ndarray, like: torch.Tensor) -> torch.Tensor:
        """(m, stages) matrix of b_i(theta_j), in the dtype/device of `like`."""
        if isinstance(self.dense, torch.Tensor):
            d = self.dense.to(like)
            powers = torch.tensor(
                [[th ** (p + 1) for p in range(d.shape[1])] for th in thetas], dtype=like.dtype
            ).to(like.device, non_blocking=True)
            return powers @ d.T
        if not hasattr(self, "_dense_np"):  # (stages, powers), rows padded with zeros
            width = max((len(r) for r in self.dense), default=0)
            self._dense_np = np.array([list(r) + [0.0] * (width - len(r)) for r in self.dense],
                                      dtype=np.float64).reshape(len(self.dense), width)
        th = np.asarray(thetas, dtype=np.float64)[:, None]
        theta_powers = th ** np.arange(1, self._dense_np.shape[1] + 1)
        return torch.from_numpy(theta_powers @ self._dense_np.T).to(dtype=like.dtype, device=like.device,
                                                              non_blocking=True)


def step_coefficients(solver: str, u: float | torch.Tensor = 0.5) -> StepCoefficients:
    """Coefficients for `solver`; validates u (one host read for a tensor u, outside any loop)."""
    spec = SOLVERS.get(solver)
    if spec.takes_u and isinstance(u, torch.Tensor):
        if u.numel() != 1:
            raise UsageError(f"rk2 parameter u must be a scalar, got shape {tuple(u.shape)}")
        _check_u(float(u.detach()))
        return StepCoefficients(None, u.detach().reshape(()))
    return StepCoefficients(spec.tableau(float(u) if spec.takes_u else 0.5))
