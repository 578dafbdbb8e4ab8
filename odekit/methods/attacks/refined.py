"""Two refinements of the active-subspace vector (thesis Algorithm 4): as+uap runs UAP passes
started from it (and from its negative); as-k searches the top-k active subspace at it for the
best vector. Both can be targeted (``target``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from odekit.errors import NumericalError
from odekit.methods.attacks.base import (
    FixedEpsilonAttack,
    UniversalAttack,
    UniversalResult,
    check_count,
    predict_on,
)
from odekit.methods.attacks.space import apply_perturbation
from odekit.methods.attacks.universal import (
    ActiveSubspaceAttack,
    ActiveSubspaceSettings,
    Fit,
    UAPAttack,
    UAPSettings,
    _input_grads,
    _not_yet,
)
from odekit.progress import Progress, silent_if_none


@dataclass(frozen=True)
class ASUAPSettings(ActiveSubspaceSettings, UAPSettings):
    """Active subspace (its settings) then UAP passes (its settings) started from the AS vector
    and from its sign-flipped twin: one pass each, the better start continues (until two passes
    in a row are rejected)."""


def _active_subspace_start(
    attack: UniversalAttack,
    model: nn.Module,
    x: Tensor,
    clean: Tensor,
    eps: float,
    generator: torch.Generator,
    batch_size: int,
    progress: Progress | None,
) -> tuple[Tensor, int, float]:
    """The plain AS vector the stronger methods start from: (v, its iterations, its fit rate)."""
    v_as, as_iters, _, _ = ActiveSubspaceAttack(attack.settings).run(
        model, x, clean, eps, generator, batch_size, progress
    )
    return v_as, as_iters, attack.success_rate(model, x, v_as, clean, batch_size)


class ASUAPAttack(UAPAttack):
    name = "as+uap"
    summary = "universal: UAP passes started from the active-subspace vector (and its negative)"
    settings_type = ASUAPSettings

    def run(
        self,
        model: nn.Module,
        x: Tensor,
        clean: Tensor,
        eps: float,
        generator: torch.Generator,
        batch_size: int,
        progress: Progress | None,
    ) -> Fit:
        s = self.settings
        v_as, as_iters, rate_as = _active_subspace_start(self, model, x, clean, eps, generator, batch_size, progress)
        starts = []
        for sign in (1.0, -1.0):
            v, n, _, _ = self.passes(model, x, clean, eps, generator, batch_size, None,
                                        sign * v_as, 1)  # fmt: skip
            starts.append((self.success_rate(model, x, v, clean, batch_size), sign, v, n))
        rate, sign, v, first = max(starts, key=lambda t: (t[0], t[1]))
        # passes from a good start are often all rejected: stop after two in a row
        best_v, more, history, _ = self.passes(
            model, x, clean, eps, generator, batch_size, progress, v, s.max_passes - 1, patience=2
        )
        extra = {"active_subspace_iterations": as_iters, "fooling_rate_fit_as": rate_as,
                 "start_sign": sign, "fooling_rate_fit_after_first_pass": rate}  # fmt: skip
        return best_v, first + more, [rate_as, rate, *history], extra


@dataclass(frozen=True)
class ActiveSubspaceKSettings(ActiveSubspaceSettings):
    """Active subspace, then the best vector of the k-dimensional subspace spanned by the AS
    vector and the top k-1 active directions at it, found by ``subspace_steps`` normalised
    gradient steps on the fit set's mean loss (capped cross-entropy, see `_capped_loss`)."""

    k: int = 16
    subspace_steps: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("k", self.k, 1, 1000)
        check_count("subspace-steps", self.subspace_steps, 0)


def _capped_loss(logits: Tensor, clean: Tensor, target: int | None, cap: float = 1.0) -> Tensor:
    """Per-sample loss to maximise: cross-entropy of the clean class, capped so samples already
    fooled stop pulling (the cap sits near the decision boundary); targeted, minus the
    cross-entropy of the target, capped once the target is likely."""
    if target is None:
        return F.cross_entropy(logits, clean, reduction="none").clamp(max=cap)
    goal = torch.full_like(clean, target)
    ce = F.cross_entropy(logits, goal, reduction="none").clamp(min=cap / 2)
    return -ce * (clean != target)


class ActiveSubspaceKAttack(FixedEpsilonAttack[UniversalResult], UniversalAttack):
    name = "as-k"
    summary = "universal: best vector of the top-k active subspace (projected gradient steps)"
    settings_type = ActiveSubspaceKSettings

    def _basis(self, model: nn.Module, x: Tensor, clean: Tensor, v: Tensor,
               batch_size: int) -> Tensor:  # fmt: skip
        """Orthonormal (D, k') basis: v first, then the top active directions at x + v."""
        k = self.settings.k
        columns = [v.flatten() / v.norm()] if float(v.norm()) > 0 else []
        pred = predict_on(model, apply_perturbation(x, v), batch_size)
        keep = _not_yet(pred, clean, self.target)
        if k > len(columns) and bool(keep.any()):
            labels = clean[keep] if self.target is None else torch.full_like(clean[keep], self.target)
            grads = _input_grads(model, apply_perturbation(x[keep], v), labels, batch_size)
            if bool(torch.isfinite(grads).all()) and float(grads.abs().max()) > 0:
                _, _, vh = torch.linalg.svd(grads.double(), full_matrices=False)
                columns += list(vh[: k - len(columns)].to(v.dtype))
        if not columns:
            raise NumericalError("no active direction to search in (all gradients are zero)")
        q, _ = torch.linalg.qr(torch.stack(columns, 1))
        return q

    def _loss_grad(self, model: nn.Module, x: Tensor, clean: Tensor, v: Tensor,
                   batch_size: int) -> Tensor:  # fmt: skip
        vr = v.detach().requires_grad_(True)
        total = torch.zeros((), device=v.device)
        with torch.enable_grad():
            for i in range(0, len(x), batch_size):
                logits = model(apply_perturbation(x[i : i + batch_size], vr))
                total = total + _capped_loss(logits, clean[i : i + batch_size], self.target).sum()
            (g,) = torch.autograd.grad(total / len(x), vr)
        return g

    def run(
        self,
        model: nn.Module,
        x: Tensor,
        clean: Tensor,
        eps: float,
        generator: torch.Generator,
        batch_size: int,
        progress: Progress | None,
    ) -> Fit:
        s = self.settings
        v_as, as_iters, rate_as = _active_subspace_start(self, model, x, clean, eps, generator, batch_size, progress)
        best_v, best_rate = v_as, rate_as
        history = [rate_as]
        try:
            basis = self._basis(model, x, clean, v_as, batch_size)
        except NumericalError:
            return v_as, as_iters, history, {"fooling_rate_fit_as": rate_as, "subspace_dim": 0}
        c = basis.T @ v_as.flatten()
        bar = silent_if_none(progress)
        for t in bar.track(range(s.subspace_steps), s.subspace_steps, "as-k steps"):
            g = basis.T @ self._loss_grad(model, x, clean, (basis @ c).view_as(v_as),
                                          batch_size).flatten()  # fmt: skip
            if float(g.norm()) == 0.0:
                break
            # normalised ascent in coefficient space, step shrinking from eps/4 to eps/40
            step = eps * (0.25 - 0.225 * t / max(s.subspace_steps - 1, 1))
            v = self.project((basis @ (c + step * g / g.norm())).view_as(v_as), eps)
            c = basis.T @ v.flatten()
            rate = self.success_rate(model, x, v, clean, batch_size)
            history.append(rate)
            if rate > best_rate:
                best_v, best_rate = v.clone(), rate
            bar.update(fooling=round(best_rate, 4))
        extra = {"fooling_rate_fit_as": rate_as, "subspace_dim": int(basis.shape[1]),
                 "active_subspace_iterations": as_iters}  # fmt: skip
        return best_v, as_iters + s.subspace_steps, history, extra

