"""Rank selection rules: ``vbmf``, ``energy:F``, ``factor:F`` and a plain integer.

Rules see a ``RankContext`` (singular values of the N x D data matrix, as far as they are known,
plus its shape and total energy ||A||_F^2) and return a rank. ``parse_rank_spec`` turns a user
string into a validated ``RankSpec``; ``select_rank`` applies it and checks that the rank is
possible for the data (R <= min(N, D), R <= number of known singular values, sigma_R > 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from odekit.errors import NumericalError, UsageError
from odekit.registry import Registry

__all__ = [
    "RANK_RULES",
    "RankContext",
    "RankSpec",
    "energy_rank",
    "parse_rank_option",
    "parse_rank_spec",
    "rank_grammar",
    "rule_rank",
    "select_rank",
    "vbmf_rank",
]


@dataclass(frozen=True)
class RankContext:
    """What a rank rule may look at.

    singular_values: descending singular values of the N x D matrix (maybe only the top ones,
    e.g. from a sketch). total_energy: ||A||_F^2 if known (else the sum of squares of the given
    values). n_samples: N. dim: D.
    """

    singular_values: Tensor
    n_samples: int
    dim: int
    total_energy: float | None = None

    def __post_init__(self) -> None:
        if self.singular_values.dim() != 1 or self.singular_values.numel() == 0:
            raise UsageError("rank selection needs a non-empty vector of singular values")
        if self.n_samples < 1 or self.dim < 1:
            raise UsageError(
                f"rank selection needs N, D >= 1, got N={self.n_samples}, D={self.dim}"
            )

    @property
    def energy(self) -> float:
        known = float(self.singular_values.double().pow(2).sum())
        return max(known, float(self.total_energy)) if self.total_energy is not None else known


RankRule = Callable[[RankContext, float | None], int]
MAX_FIXED_RANK = 1 << 31
RANK_RULES: Registry[RankRule] = Registry("rank rule")
VALUED_RULES = ("energy", "factor")  # rules written NAME:F


@dataclass(frozen=True)
class RankSpec:
    """A parsed rank specification: ``name`` is a registered rule or ``"fixed"``."""

    name: str
    value: float | None = None

    def __post_init__(self) -> None:
        if self.name != "fixed" and self.name not in RANK_RULES:
            RANK_RULES.get(self.name)  # raises UsageError listing valid names
        if self.value is not None and not math.isfinite(self.value):
            raise UsageError(
                f"the rank rule value must be a finite number, got {self.value}",
                "use vbmf, energy:0.99, factor:4 or an integer",
            )
        if self.name == "fixed" and (
            self.value is None or not 1 <= self.value <= MAX_FIXED_RANK or self.value != int(self.value)
        ):
            raise UsageError(
                f"a fixed rank must be an integer in [1, {MAX_FIXED_RANK}], got {self.value:g}"
                if self.value is not None
                else "a fixed rank needs a value",
                "use e.g. `rank` 32",
            )
        if self.name == "energy" and (self.value is None or not 0.0 < self.value <= 1.0):
            raise UsageError(
                f"energy threshold must lie in (0, 1], got {self.value}",
                "use e.g. `rank` energy:0.99",
            )
        if self.name == "factor" and (self.value is None or self.value < 1.0):
            raise UsageError(
                f"rank reduction factor must be >= 1, got {self.value}", "use e.g. `rank` factor:4"
            )

    def __str__(self) -> str:
        if self.name == "fixed":
            return str(int(self.value or 0))
        return self.name if self.value is None else f"{self.name}:{self.value:g}"


def parse_rank_spec(spec: str | int | RankSpec) -> RankSpec:
    """``"vbmf"``, ``"energy:0.99"``, ``"factor:4"`` or ``"32"``/``32`` -> ``RankSpec``."""
    if isinstance(spec, RankSpec):
        return spec
    text = str(spec).strip().lower()
    if text.isascii() and text.lstrip("+-").isdigit():
        if len(text) > len(str(MAX_FIXED_RANK)) + 1:  # float() of a huge integer overflows
            raise UsageError(f"rank {text[:20]}... is out of range", f"use an integer in [1, {MAX_FIXED_RANK}]")
        return RankSpec("fixed", float(int(text)))
    name, _, arg = text.partition(":")
    value: float | None = None
    if arg:
        try:
            value = float(arg)
        except ValueError:
            raise UsageError(
                f"cannot parse the rank rule argument in '{spec}'",
                "use vbmf, energy:0.99, factor:4 or an integer",
            ) from None
    if name in VALUED_RULES and value is None:
        raise UsageError(
            f"rank rule '{name}' needs a value",
            f"use e.g. {name}:{'0.99' if name == 'energy' else '4'}",
        )
    if name not in RANK_RULES:
        raise UsageError(
            f"unknown rank rule '{spec}'",
            f"use an integer or one of: {', '.join(n + (':X' if n in VALUED_RULES else '') for n in RANK_RULES.names())}",
        )
    return RankSpec(name, value)


def _numerical_rank(s: Tensor) -> int:
    s = s.double()
    if float(s[0]) <= 0:
        return 0
    tol = float(s[0]) * max(s.numel(), 1) * torch.finfo(torch.float32).eps
    return int((s > tol).sum())


def select_rank(spec: str | int | RankSpec, ctx: RankContext, max_rank: int | None = None) -> int:
    """Apply ``spec`` to ``ctx``; raise ``NumericalError`` for ranks the data cannot support."""
    rank = rule_rank(spec, ctx)
    limit_n = ctx.n_samples
    if rank > limit_n:
        raise NumericalError(
            f"rank {rank} needs at least {rank} samples, only {limit_n} were used",
            "pass more `fit_samples` or choose a smaller rank",
        )
    if rank > ctx.dim:
        raise NumericalError(
            f"rank {rank} exceeds the layer dimension {ctx.dim}", f"choose a rank <= {ctx.dim}"
        )
    if max_rank is not None and rank > max_rank:
        raise NumericalError(
            f"rank {rank} exceeds the largest rank the sketch supports ({max_rank})",
            "lower the rank or raise `sketch_size`",
        )
    numerical = _numerical_rank(ctx.singular_values)
    if rank > numerical:
        raise NumericalError(
            f"rank {rank} is larger than the data allows (numerical rank {numerical})",
            f"choose a rank <= {numerical}, e.g. `rank` energy:0.99",
        )
    return rank


# ---------------------------------------------------------------------------------- rules


def energy_rank(singular_values: Tensor, fraction: float, total_energy: float | None = None) -> int:
    """Smallest R with sum_{i<=R} s_i^2 >= fraction * total energy."""
    sq = singular_values.double().pow(2)
    total = float(sq.sum()) if total_energy is None else max(float(total_energy), float(sq.sum()))
    if total <= 0:
        return 1
    cum = torch.cumsum(sq, 0) / total
    hit = torch.nonzero(cum >= fraction - 1e-12)
    return int(hit[0]) + 1 if hit.numel() else int(sq.numel())


@RANK_RULES.register(
    "vbmf", "analytic empirical VBMF (Nakajima et al. 2013), noise variance estimated"
)
def _vbmf_rule(ctx: RankContext, _value: float | None) -> int:
    return vbmf_rank(ctx.singular_values, ctx.n_samples, ctx.dim, total_energy=ctx.total_energy)


@RANK_RULES.register(
    "energy", "smallest R keeping the given fraction of sum s_i^2, e.g. energy:0.99"
)
def _energy_rule(ctx: RankContext, value: float | None) -> int:
    return energy_rank(
        ctx.singular_values, float(value if value is not None else 0.99), ctx.total_energy
    )


@RANK_RULES.register("factor", "R = ceil(D / F): layer width reduced F times, e.g. factor:4")
def _factor_rule(ctx: RankContext, value: float | None) -> int:
    return max(1, math.ceil(ctx.dim / float(value if value is not None else 1.0)))


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    t = x - (1 + alpha)
    return 0.5 * (t + np.sqrt(np.maximum(t * t - 4 * alpha, 0.0)))


def vbmf_rank(
    singular_values: Tensor,
    n_samples: int,
    dim: int,
    total_energy: float | None = None,
    sigma2: float | None = None,
) -> int:
    """Rank chosen by the global analytic solution of empirical VBMF (Nakajima, Sugiyama,
    Babacan, Tomioka 2013, JMLR 14), with the noise variance estimated by minimising the
    free energy between its analytic lower and upper bounds.

    Works with the top-H singular values only: the remaining energy ``total_energy - sum s^2``
    is treated as noise (the residual term of the free energy).
    """
    from scipy.optimize import minimize_scalar

    s = singular_values.detach().double().cpu().numpy()
    s = np.sort(np.abs(s))[::-1]
    ell, m = sorted((int(n_samples), int(dim)))  # L <= M
    s = s[s > 0][:ell]
    h = int(s.size)
    if h == 0:
        return 1
    alpha = ell / m
    tau_ubar = 2.5129 * math.sqrt(alpha)
    x_ubar = (1 + tau_ubar) * (1 + alpha / tau_ubar)
    known = float(np.sum(s**2))
    residual = 0.0
    if total_energy is not None and h < ell:
        residual = max(float(total_energy) - known, 0.0)
    if sigma2 is None:
        upper = (known + residual) / (ell * m)
        eh_ub = min(math.ceil(ell / (1 + alpha)) - 1, h) - 1
        candidates = []
        if eh_ub + 1 < h:
            candidates.append(float(s[eh_ub + 1] ** 2) / (m * x_ubar))
            candidates.append(float(np.mean(s[eh_ub + 1 :] ** 2)) / m)
        if residual > 0 and h < ell:
            candidates.append(residual / (m * (ell - h)) / x_ubar)
        lower = max(candidates) if candidates else upper * 1e-6
        lower = min(max(lower, upper * 1e-12), upper)

        def free_energy(sig2: float) -> float:
            x = s**2 / (m * sig2)
            z1 = x[x > x_ubar]
            z2 = x[x <= x_ubar]
            tau_z1 = _tau(z1, alpha)
            value = float(np.sum(z2 - np.log(z2)))
            value += float(np.sum(z1 - tau_z1))
            value += float(np.sum(np.log((tau_z1 + 1) / z1)))
            value += alpha * float(np.sum(np.log(tau_z1 / alpha + 1)))
            return value + residual / (m * sig2) + (ell - h) * math.log(sig2)

        if upper <= lower * (1 + 1e-12):
            sigma2 = upper
        else:
            sigma2 = float(minimize_scalar(free_energy, bounds=(lower, upper), method="bounded").x)
    threshold = math.sqrt(m * sigma2 * (1 + tau_ubar) * (1 + alpha / tau_ubar))
    return max(1, int(np.sum(s > threshold)))


# ------------------------------------------------------------- one grammar for every command
# issue 12: `reduce --rank` and `asnet --rank` read the same words; a command may add keywords of
# its own (asnet's `auto`: the --energy-tol rule), which this parser hands back unchanged.


def rank_grammar(keywords: tuple[str, ...] = ()) -> str:
    """'vbmf | energy:F | factor:F | INT' (plus ``keywords``), from the rule registry."""
    rules = [f"{name}:F" if name in VALUED_RULES else name for name in RANK_RULES.names()]
    return " | ".join([*rules, "INT", *keywords])


def parse_rank_option(text: str | int, option: str = "`rank`", keywords: tuple[str, ...] = ()) -> RankSpec | str:
    """A rank option's value: one of ``keywords`` (returned as the lower-case word) or a rank
    rule / integer (``parse_rank_spec``); errors name ``option`` and the whole grammar."""
    word = str(text).strip().lower()
    if word in keywords:
        return word
    try:
        return parse_rank_spec(word)
    except UsageError as err:
        grammar = f"{option} takes {rank_grammar(keywords)}"
        raise UsageError(f"{option} '{text}': {err.message}", f"{err.hint}; {grammar}" if err.hint else grammar) from None


def rule_rank(spec: str | int | RankSpec, ctx: RankContext) -> int:
    """The rank ``spec`` asks for on ``ctx`` (at least 1), without ``select_rank``'s feasibility
    checks: for callers with limits of their own (asnet caps a rank by its sketch and samples)."""
    spec = parse_rank_spec(spec)
    if spec.name == "fixed":
        return max(int(spec.value or 0), 1)
    return max(int(RANK_RULES.get(spec.name)(ctx, spec.value)), 1)
