"""ODE core: Butcher tableaux, RK solvers, `odeint` and its gradient methods.

`odeint(f, z0, t, solver=..., grad=...)` returns an `ODESolution` (z at every time in t, and
`SolveStats`). Counting convention: `nfe_forward` counts f calls of the forward solve (dopri5:
one k1, one call for the starting-step heuristic, six per attempted step); `nfe_backward`
counts f calls made while backward runs, each together with its vector-Jacobian product
(rdm: augmented [z, a, dL/dtheta] solves; irdm: [a, dL/dtheta] solves; anode: the recomputed
steps). backprop calls f only in the forward pass, so its `nfe_backward` stays 0.
irdm's interpolant of z(t) reports its estimated error in `SolveStats.interp_error`.
"""

from odekit.ode.block import ODEBlock, SolverConfig
from odekit.ode.gradients import GRADIENT_METHODS
from odekit.ode.interp import InterpolationWarning
from odekit.ode.odeint import ODESolution, odeint
from odekit.ode.solver import SolveStats
from odekit.ode.tableau import SOLVERS, ButcherTableau

__all__ = [
    "GRADIENT_METHODS",
    "SOLVERS",
    "ButcherTableau",
    "InterpolationWarning",
    "ODEBlock",
    "ODESolution",
    "SolveStats",
    "SolverConfig",
    "odeint",
]
