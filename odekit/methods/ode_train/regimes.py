"""Meta-solver regimes (thesis ch. 4.2): how RK2's parameter u changes during training.

standalone (fixed u), switching (u drawn each iteration from a finite set), smoothing
(u ~ Normal(u_mean, u_std), redrawn until it lies in (0, 1]) and ensembling (the ODE block
returns the weighted average of the solves with every u of the set). All draws are seeded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from odekit.errors import UsageError
from odekit.ode import SolverConfig
from odekit.registry import Registry

REGIMES: Registry[str] = Registry("solver regime")
REGIMES.add("standalone", "standalone", "one fixed solver (the `solver`/`u` given)")
REGIMES.add("switching", "switching", "RK2(u), u drawn uniformly from `u_set` every iteration")
REGIMES.add("smoothing", "smoothing", "RK2(u), u ~ Normal(`u_mean`, `u_std`) redrawn into (0, 1] every iteration")
REGIMES.add("ensembling", "ensembling", "RK2: the block returns the weighted mean of the solves with every u in `u_set`")

DEFAULT_U_SET = (0.5, 1.0)
MAX_REDRAWS = 1000


def check_u(u: float, what: str) -> None:
    if not (math.isfinite(u) and 0.0 < u <= 1.0):
        raise UsageError(f"{what} must lie in (0, 1], got {u}", "RK2(u) needs 0 < u <= 1 (0.5 midpoint, 1 Heun)")


@dataclass(frozen=True)
class RegimeSettings:
    """How u changes during training (thesis ch. 4.2); validated on construction."""

    kind: str = "standalone"
    u: float = 0.5
    u_set: tuple[float, ...] = ()
    u_mean: float | None = None
    u_std: float = 0.0125
    weights: tuple[float, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        kind = REGIMES.entry(self.kind).name
        object.__setattr__(self, "kind", kind)
        check_u(self.u, "`u`")
        u_set = tuple(float(v) for v in self.u_set) or (DEFAULT_U_SET if kind in ("switching", "ensembling") else ())
        for value in u_set:
            check_u(value, "every value of `u_set`")
        object.__setattr__(self, "u_set", u_set)
        mean = self.u if self.u_mean is None else float(self.u_mean)
        check_u(mean, "`u_mean`")
        object.__setattr__(self, "u_mean", mean)
        if not (math.isfinite(self.u_std) and self.u_std >= 0):
            raise UsageError(f"`u_std` must be a finite number >= 0, got {self.u_std}", "the thesis uses 0.0125")
        weights = tuple(float(w) for w in self.weights)
        if kind == "ensembling":
            weights = weights or tuple(1.0 for _ in u_set)
            if len(weights) != len(u_set):
                raise UsageError(
                    f"`ensemble_weights` has {len(weights)} values but `u_set` has {len(u_set)}",
                    "give one weight per u",
                )
            if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
                raise UsageError(f"`ensemble_weights` must be >= 0 with a positive sum, got {list(weights)}")
            weights = tuple(w / sum(weights) for w in weights)
        elif weights:
            raise UsageError("`ensemble_weights` only applies to `solver_regime` ensembling")
        object.__setattr__(self, "weights", weights)

    def check_solver(self, config: SolverConfig) -> None:
        """Only RK2 has a u to change: the non-standalone regimes need --solver rk2."""
        if self.kind != "standalone" and config.solver != "rk2":
            raise UsageError(
                f"solver regime '{self.kind}' changes RK2's parameter u, but the solver is '{config.solver}'",
                "use `solver` rk2 with `steps` N",
            )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["u_set"], out["weights"] = list(self.u_set), list(self.weights)
        return out


class USampler:
    """Seeded draws of u per training iteration; ``trace`` keeps every u drawn."""

    def __init__(self, settings: RegimeSettings) -> None:
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)
        self.trace: list[float] = []

    def draw(self) -> tuple[float | None, list[tuple[float, float]] | None]:
        """(u for the next iteration or None = the config's u, ensemble [(u, w)] or None)."""
        s = self.settings
        if s.kind == "standalone":
            return None, None
        if s.kind == "ensembling":
            return None, list(zip(s.u_set, s.weights, strict=True))
        if s.kind == "switching":
            u = float(s.u_set[int(self.rng.integers(len(s.u_set)))])
        else:
            u = self._smooth()
        self.trace.append(u)
        return u, None

    def _smooth(self) -> float:
        s = self.settings
        assert s.u_mean is not None
        for _ in range(MAX_REDRAWS):
            u = float(self.rng.normal(s.u_mean, s.u_std))
            if 0.0 < u <= 1.0:
                return u
        raise UsageError(
            f"Normal({s.u_mean}, {s.u_std}) almost never falls in (0, 1]", "lower `u_std` or move `u_mean` inside (0, 1]"
        )

    def summary(self) -> dict[str, Any]:
        s = self.settings
        out: dict[str, Any] = {"regime": s.kind}
        if s.kind == "ensembling":
            out["ensemble"] = [{"u": u, "weight": w} for u, w in zip(s.u_set, s.weights, strict=True)]
        if self.trace:
            values = np.asarray(self.trace)
            out.update(
                draws=len(values), u_mean=float(values.mean()), u_std=float(values.std()),
                u_min=float(values.min()), u_max=float(values.max()), first_draws=[round(v, 6) for v in self.trace[:8]],
            )  # fmt: skip
            if s.kind == "switching":
                out["counts"] = {str(u): int((values == u).sum()) for u in s.u_set}
        return out
