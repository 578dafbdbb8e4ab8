"""Certified radii from the network bound, empirical radii from the attacks, accuracy per budget.

With logit margin m(x) (top logit minus the runner-up) and an l2 Lipschitz bound L of the logit
map, f_y - f_j is sqrt(2) L-Lipschitz for every pair, so no perturbation of l2 norm below
r = m / (sqrt(2) L) changes the prediction (Tsuzuku et al. 2018). Budgets are in [0, 1]-pixel
units like the attacks': the model sees (pixel - mean) / std, so in pixel units the bound is
L * max(1 / std). The empirical side is an upper bound on every sample's true radius: the
DeepFool perturbation (clipped to the pixel box) when it flips the prediction, and the smallest
budget at which l2 PGD breaks the sample. Hence per budget, on the same samples,
certified accuracy <= robust accuracy under attack <= clean accuracy; a certified sample that
an attack breaks would be a bug, counted as a violation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from odekit.errors import UsageError
from odekit.methods.attacks.deepfool import deepfool
from odekit.methods.attacks.per_sample import PGDAttack, PGDSettings
from odekit.progress import Progress
from odekit.stats import Proportion

SQRT2 = math.sqrt(2.0)


@dataclass(frozen=True)
class CertifySettings:
    """What `certify` measures: l2 budgets (pixel units), samples, iterations."""

    budgets: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5)
    norm: str = "2"
    iters: int = 6
    power_iters: int = 30
    pgd_steps: int = 20
    deepfool_steps: int = 50
    attack: bool = True
    batch_size: int = 256
    layers: str | None = None

    def __post_init__(self) -> None:
        if self.norm != "2":
            raise UsageError(f"`norm` {self.norm} is not supported by certify",
                             "certify bounds the l2 norm (`norm` 2); linf radii follow as r / sqrt(d)")  # fmt: skip
        if not self.budgets or any(not (b > 0 and math.isfinite(b)) for b in self.budgets):
            raise UsageError("budgets must be positive numbers", "e.g. `eps` 0.1,0.25,0.5")
        object.__setattr__(self, "budgets", tuple(sorted(set(self.budgets))))
        for name in ("iters", "power_iters", "pgd_steps", "deepfool_steps", "batch_size"):
            value = getattr(self, name)
            if not 1 <= value <= 100_000:
                raise UsageError(f"`{name}` must lie in [1, 100000], got {value}")
        if self.iters > 30:
            raise UsageError(f"`iters` {self.iters} is more than Gram iteration needs",
                             "6 to 10 Gram iterations reach the bound's limit (the default is 6)")  # fmt: skip


@dataclass(frozen=True)
class BudgetRow:
    """Accuracies at one budget on the same samples."""

    eps: float
    certified: Proportion
    robust: Proportion | None  # None without attacks
    clean: Proportion
    violations: int  # certified yet broken by an attack: must be 0

    def to_dict(self) -> dict[str, Any]:
        def prop(p: Proportion | None) -> dict[str, Any] | None:
            return None if p is None else {"value": p.rate, "n": p.n, "ci95": list(p.ci95)}

        return {"eps": self.eps, "certified_accuracy": prop(self.certified), "robust_accuracy": prop(self.robust),
                "clean_accuracy": prop(self.clean), "violations": self.violations,
                "order_holds": self.certified.rate <= (self.robust or self.clean).rate <= self.clean.rate}  # fmt: skip


@dataclass(frozen=True)
class Radii:
    """Per-sample quantities in pixel units (inf: the attacks found no adversarial example)."""

    correct: Tensor
    margin: Tensor
    certified: Tensor
    empirical: Tensor | None
    local_lower: float  # max over samples of ||grad (f_top - f_2nd)|| / sqrt(2): a lower bound of L

    def ratio(self) -> dict[str, float] | None:
        """How loose the certificate is: empirical / certified radius over correct samples."""
        if self.empirical is None:
            return None
        keep = self.correct & torch.isfinite(self.empirical) & (self.certified > 0)
        if not bool(keep.any()):
            return None
        r = (self.empirical[keep] / self.certified[keep]).double()
        return {"median": float(r.median()), "min": float(r.min()), "max": float(r.max()), "n": int(keep.sum())}


@dataclass
class Certificate:
    """One model's certificate on the evaluated samples."""

    lipschitz_upper: float  # model-input units
    lipschitz_pixel: float  # pixel units (what the radii use)
    radii: Radii
    rows: list[BudgetRow]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def clean(self) -> Proportion:
        c = self.radii.correct
        return Proportion(int(c.sum()), len(c))

    def to_dict(self) -> dict[str, Any]:
        r = self.radii
        correct = r.correct
        med = (lambda t: float(t[correct].median()) if bool(correct.any()) else float("nan"))  # noqa: E731
        return {
            "lipschitz_upper": self.lipschitz_upper,
            "lipschitz_upper_pixel_units": self.lipschitz_pixel,
            "lipschitz_lower_local": r.local_lower,
            "clean_accuracy": self.clean.rate,
            "samples": len(correct),
            "certified_accuracy": {f"{row.eps:g}": row.certified.rate for row in self.rows},
            "robust_accuracy": {f"{row.eps:g}": row.robust.rate for row in self.rows if row.robust is not None},
            "budgets": [row.to_dict() for row in self.rows],
            "median_certified_radius": med(r.certified),
            "median_empirical_radius": med(r.empirical) if r.empirical is not None else None,
            "radius_ratio_empirical_over_certified": r.ratio(),
            **self.extra,
        }


def margins(model: nn.Module, x: Tensor, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Predictions, logit margins (top minus runner-up) and the logits (float64, CPU) on ``x``."""
    with torch.no_grad():
        logits = torch.cat([model(x[i : i + batch_size]).double().cpu() for i in range(0, len(x), batch_size)])
    top2 = logits.topk(2, dim=1)
    return top2.indices[:, 0], top2.values[:, 0] - top2.values[:, 1], logits


def certified_radii(logits: Tensor, pred: Tensor, upper: float, head: Tensor | None = None,
                    head_input_bound: float = 0.0) -> Tensor:  # fmt: skip
    """Per-sample radii (units of the bounds): margin / (sqrt(2) L), or with a final linear layer
    W on an input of bound L_h, min_j (f_y - f_j) / (||W_y - W_j|| L_h), never smaller."""
    top2 = logits.topk(2, dim=1).values
    plain = (top2[:, 0] - top2[:, 1]) / (SQRT2 * upper)
    if head is None or head_input_bound <= 0:
        return plain
    w = head.double().cpu()
    dist = torch.cdist(w, w) * head_input_bound * (1 + 1e-9)  # (K, K) Lipschitz of f_a - f_b
    gaps = logits.gather(1, pred[:, None]) - logits  # f_y - f_j, (n, K)
    per_pair = torch.where(dist[pred] > 0, gaps / dist[pred].clamp_min(1e-300), torch.full_like(gaps, math.inf))
    per_pair[torch.arange(len(pred)), pred] = math.inf
    return torch.maximum(per_pair.min(1).values, plain)


def local_lower(model: nn.Module, x: Tensor, batch_size: int) -> float:
    """max_i ||grad_x (f_top - f_2nd)(x_i)|| / sqrt(2): the logit map's Jacobian has at least this
    norm at x_i, so its Lipschitz constant does too (units of ``x``)."""
    best = 0.0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(xb)
            top2 = logits.topk(2, dim=1).indices
            rows = torch.arange(len(xb), device=xb.device)
            diff = logits[rows, top2[:, 0]] - logits[rows, top2[:, 1]]
            (g,) = torch.autograd.grad(diff.sum(), xb)
        best = max(best, float(g.reshape(len(xb), -1).norm(dim=1).max()) / SQRT2)
    return best


def empirical_radii(pixel_model: nn.Module, x: Tensor, y: Tensor, settings: CertifySettings, seed: int,
                    progress: Progress | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Per-sample upper bounds of the l2 radius (pixel units; 0 when misclassified, inf when
    nothing broke the sample) and a (samples, budgets) mask of samples an attack broke."""
    n = len(x)
    dist = torch.full((n,), math.inf, dtype=torch.float64)
    with torch.no_grad():
        pred = torch.cat([pixel_model(x[i : i + settings.batch_size]).argmax(1) for i in range(0, n, settings.batch_size)])
    wrong = (pred != y).cpu()
    dist[wrong] = 0.0
    for i in range(0, n, settings.batch_size):
        xb, yb = x[i : i + settings.batch_size], y[i : i + settings.batch_size]
        r = deepfool(pixel_model, xb, pred[i : i + settings.batch_size], norm="2", steps=settings.deepfool_steps,
                     labels=yb)  # fmt: skip
        adv = (xb + r).clamp(0.0, 1.0)
        with torch.no_grad():
            flipped = (pixel_model(adv).argmax(1) != yb).cpu()
        size = (adv - xb).reshape(len(xb), -1).norm(dim=1).double().cpu()
        part = dist[i : i + len(xb)]
        part[flipped] = torch.minimum(part[flipped], size[flipped])
    broken = torch.zeros(n, len(settings.budgets), dtype=torch.bool)
    attack = PGDAttack(PGDSettings(norm="2", backend="torch", steps=settings.pgd_steps))
    results = attack(pixel_model, x, y, list(settings.budgets), seed=seed, batch_size=settings.batch_size, progress=progress)
    for eps, res in zip(settings.budgets, results, strict=True):
        with torch.no_grad():
            fooled = torch.cat([pixel_model(res.x_adv[k : k + settings.batch_size]).argmax(1)
                                for k in range(0, n, settings.batch_size)]).cpu() != y.cpu()  # fmt: skip
        dist[fooled] = torch.minimum(dist[fooled], torch.full_like(dist[fooled], eps))
    for j, eps in enumerate(settings.budgets):
        broken[:, j] = dist <= eps
    return dist, broken


def budget_rows(radii: Radii, budgets: tuple[float, ...], broken: Tensor | None) -> list[BudgetRow]:
    """Certified, robust and clean accuracy with n and Wilson intervals, per budget."""
    n = len(radii.correct)
    clean = Proportion(int(radii.correct.sum()), n)
    rows = []
    for j, eps in enumerate(budgets):
        cert = radii.correct & (radii.certified > eps)
        robust = None
        violations = 0
        if broken is not None:
            ok = radii.correct & ~broken[:, j]
            robust = Proportion(int(ok.sum()), n)
            violations = int((cert & broken[:, j]).sum())
        rows.append(BudgetRow(eps, Proportion(int(cert.sum()), n), robust, clean, violations))
    return rows
