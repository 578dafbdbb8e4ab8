"""ODE core: Butcher tableaux, RK solvers, `odeint` and its gradient methods."""

from odekit.ode.block import ODEBlock, SolverConfig
from odekit.ode.gradients import GRADIENT_METHODS
from odekit.ode.odeint import ODESolution, odeint
from odekit.ode.solver import SolveStats
from odekit.ode.tableau import SOLVERS, ButcherTableau

__all__ = [
    "GRADIENT_METHODS",
    "SOLVERS",
    "ButcherTableau",
    "ODEBlock",
    "ODESolution",
    "SolveStats",
    "SolverConfig",
    "odeint",
]
