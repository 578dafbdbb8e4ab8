"""From option values to an attack: which class (`ATTACKS`), which settings (built from the
options by field name), which budgets. `odekit attack` and scripts share this."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from fractions import Fraction
from typing import Any

from odekit.errors import UsageError
from odekit.methods.attacks.base import ATTACKS, Attack, UniversalAttack
from odekit.methods.attacks.space import parse_norm


def parse_budgets(text: str, what: str = "`eps`") -> list[float]:
    """'0.01,2/255,0.5' -> floats; every value must be positive and finite."""
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(Fraction(part)) if "/" in part else float(part)
        except (ValueError, ZeroDivisionError, OverflowError) as exc:
            raise UsageError(
                f"cannot read {what} value '{part}'",
                "give numbers like 0.5 or 8/255, comma-separated",
            ) from exc
        if not (value > 0 and math.isfinite(value)):
            raise UsageError(
                f"{what} values must be positive and finite, got {part}",
                "budgets are norms in [0, 1] pixel units",
            )
        values.append(value)
    if not values:
        raise UsageError(f"{what} is empty", "give numbers like 0.5 or 8/255, comma-separated")
    return sorted(set(values))


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]: distinct integers in [0, 2**63)."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or int(part) >= 2**63:
            raise UsageError(f"cannot read `seeds` value '{part}'",
                             "give integers in [0, 2^63), comma-separated, e.g. 0,1,2")
        if int(part) not in seeds:
            seeds.append(int(part))
    if not seeds:
        raise UsageError("`seeds` is empty", "give integers, comma-separated, e.g. 0,1,2")
    return seeds


def settings_from_options(settings_type: type, options: Mapping[str, Any]) -> Any:
    """``settings_type(**options)`` restricted to its fields; None means "use the default"."""
    names = {f.name for f in fields(settings_type)}
    return settings_type(**{k: v for k, v in options.items() if k in names and v is not None})


@dataclass(frozen=True)
class AttackPlan:
    """Which attack, at which budgets (pixel units; pixels of displacement for the T-norm)."""

    method: str
    attack: Attack[Any]
    budgets: list[float]

    @property
    def universal(self) -> bool:
        return isinstance(self.attack, UniversalAttack)

    @property
    def norm(self) -> str:
        return self.attack.distance.key


def build_plan(method: str, options: Mapping[str, Any], scale: float = 1.0) -> AttackPlan:
    """The attack named ``method`` with settings from ``options`` (keys are settings field
    names; ``delta``/``eps`` are budget lists or None for the defaults). ``scale`` converts
    given budgets to pixel units (model-unit budgets times the std)."""
    cls = ATTACKS.get(method)
    name = ATTACKS.entry(method).name
    norm = parse_norm(options.get("norm") or "2")
    delta, eps = options.get("delta"), options.get("eps")
    universal = issubclass(cls, UniversalAttack)
    given, wrong = (delta, eps) if universal else (eps, delta)
    if wrong is not None:
        right, other = ("`delta`", "`eps`") if universal else ("`eps`", "`delta`")
        kind = "universal" if universal else "per-sample"
        raise UsageError(f"{other} is for {'per-sample' if universal else 'universal'} attacks; "
                         f"{name} is {kind}", f"give its budget(s) with {right}")  # fmt: skip
    if not universal and options.get("target") is not None:
        raise UsageError(f"`target` is for universal attacks; {name} is per-sample",
                         "targeted attacks: active-subspace, as+uap, as-k, uap, random")
    if cls.fixed_distance is not None and scale != 1.0:
        raise UsageError(
            f"{name} budgets are {cls.fixed_distance.unit}; `units` model does not apply to them",
            "drop `units` model",
        )
    budgets = cls.default_budgets(norm) if given is None else sorted({b * scale for b in given})
    values = dict(options)
    values.pop("eps", None)
    if universal:
        values["delta"] = max(budgets)
    if cls.fixed_distance is not None:
        values.pop("norm", None)  # the attack's own distance, whatever --norm says
    else:
        values["norm"] = norm
    return AttackPlan(name, cls(settings_from_options(cls.settings_type, values)), budgets)
