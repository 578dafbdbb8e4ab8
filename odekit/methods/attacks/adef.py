"""ADef (Alaifari et al. 2018; seed 001): adversarial deformations x^tau(u) = x(u + tau(u)).

tau is a smooth vector field (Gaussian-smoothed), measured by the T-norm
||tau||_T = max_{i,j} ||tau(i, j)||_2 in pixels. Each step linearises the logit gap f_k = l_k - l_ref
in tau: f_k(x^{tau + t}) ~ f_k + <g_k, t> with g_k(u) = sum_c d f_k/d x_c(u) * grad_u x^tau_c(u);
the smoothed step t_k = -f_k S g_k / <g_k, S g_k> closes the gap, the class with the smallest
T-norm step wins. Images are resampled with grid_sample(align_corners=True).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from odekit.errors import UnsupportedModelError
from odekit.methods.attacks.base import (
    MinimizationAttack,
    PerSampleAttack,
    PerSampleResult,
    PerSampleSettings,
    check_count,
    check_nonnegative,
    check_positive,
)
from odekit.methods.attacks.distance import TNORM


def deform(x: Tensor, tau: Tensor) -> Tensor:
    """x (B, C, H, W) sampled at u + tau(u); tau (B, 2, H, W) in pixels, channel 0 = width axis."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    # align_corners=True: pixel centres sit at -1 and 1, so one pixel is 2/(size-1)
    sx = 2.0 / max(w - 1, 1)
    sy = 2.0 / max(h - 1, 1)
    grid = torch.stack((gx + tau[:, 0] * sx, gy + tau[:, 1] * sy), dim=-1)
    return F.grid_sample(
        x, grid.expand(b, h, w, 2), mode="bilinear", padding_mode="border", align_corners=True
    )


def t_norm(tau: Tensor) -> Tensor:
    """||tau||_T per sample: the largest displacement length, in pixels."""
    return tau.pow(2).sum(1).sqrt().flatten(1).amax(1)


def gaussian_smooth(field: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian filter on (B, K, H, W), reflect-padded; identity for sigma = 0."""
    if sigma <= 0:
        return field
    h, w = field.shape[-2:]
    # taps beyond the image are cut below anyway: never build a longer kernel (a huge sigma
    # would allocate 6 sigma floats)
    radius = min(max(1, math.ceil(3 * sigma)), max(h, w))
    t = torch.arange(-radius, radius + 1, device=field.device, dtype=field.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    k = field.shape[1]
    pad_w, pad_h = min(radius, w - 1), min(radius, h - 1)
    kw = kernel[radius - pad_w : radius + pad_w + 1]
    kh = kernel[radius - pad_h : radius + pad_h + 1]
    out = F.pad(field, (pad_w, pad_w, 0, 0), mode="reflect") if pad_w else field
    out = F.conv2d(out, (kw / kw.sum()).view(1, 1, 1, -1).expand(k, 1, 1, -1), groups=k)
    out = F.pad(out, (0, 0, pad_h, pad_h), mode="reflect") if pad_h else out
    return F.conv2d(out, (kh / kh.sum()).view(1, 1, -1, 1).expand(k, 1, -1, 1), groups=k)


@dataclass(frozen=True)
class ADefSettings(PerSampleSettings):
    """``steps`` linearised steps, smoothing ``sigma`` (pixels), ``overshoot``, top
    ``candidates`` classes. The budget eps is the T-norm in pixels of displacement."""

    norm: str = "2"
    steps: int = 50
    sigma: float = 1.0
    overshoot: float = 0.1
    candidates: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("steps", self.steps, 1)
        check_nonnegative("smoothing sigma", self.sigma, "sigma is the Gaussian width in pixels")
        check_nonnegative("overshoot", self.overshoot)
        check_count("candidates", self.candidates, 2)


class ADefAttack(MinimizationAttack[PerSampleResult], PerSampleAttack):
    """Runs once per call; a deformation beyond a budget's T-norm does not count there."""

    name = "adef"
    summary = "per-sample: ADef adversarial deformation (smooth vector field), T-norm budget"
    settings_type = ADefSettings
    fixed_distance = TNORM

    @classmethod
    def default_budgets(cls, norm: str) -> list[float]:
        return [1.0]  # pixels of displacement

    def run(
        self, model: nn.Module, x: Tensor, y: Tensor, eps: float, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        if x.dim() != 4:
            raise UnsupportedModelError(
                "adef deforms images (batch, channels, height, width)", "use an image model"
            )
        s = self.settings
        check_positive("eps", eps, "for adef eps is the largest displacement (T-norm) in pixels")
        b = len(x)
        rows = torch.arange(b, device=x.device)
        with torch.no_grad():
            logits0 = model(x)
        ref = logits0.argmax(1)
        k = min(s.candidates, logits0.shape[1])
        order = logits0.argsort(1, descending=True)
        others = torch.stack([row[row != r][: k - 1] for row, r in zip(order, ref, strict=True)])
        tau = torch.zeros(b, 2, *x.shape[-2:], device=x.device, dtype=x.dtype)
        active = (ref == y).clone()  # misclassified samples need no deformation
        for _ in range(s.steps):
            if not bool(active.any()):
                break
            xd = deform(x, (1.0 + s.overshoot) * tau).detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(xd)
                pred = logits.argmax(1).detach()
                active &= pred == ref
                if not bool(active.any()):
                    break
                ref_logit = logits[rows, ref]
                f = torch.stack([logits[rows, others[:, j]] - ref_logit for j in range(k - 1)], 1)
                grads = [
                    torch.autograd.grad(f[:, j].sum(), xd, retain_graph=j < k - 2)[0]
                    for j in range(k - 1)
                ]
            gw, gh = torch.gradient(xd.detach(), dim=(3, 2))  # image gradient along width, height
            best_step, best_size = (
                torch.zeros_like(tau),
                torch.full((b,), float("inf"), device=x.device),
            )
            for j, g in enumerate(grads):
                field = torch.stack(((g * gw).sum(1), (g * gh).sum(1)), 1)  # (B, 2, H, W)
                smooth = gaussian_smooth(field, s.sigma)
                denom = (field * smooth).flatten(1).sum(1).clamp_min(1e-12)
                step = (-f[:, j].detach() / denom).view(-1, 1, 1, 1) * smooth
                size = t_norm(step)
                better = size < best_size
                best_step = torch.where(better.view(-1, 1, 1, 1), step, best_step)
                best_size = torch.where(better, size, best_size)
            tau = tau + torch.where(
                active.view(-1, 1, 1, 1), best_step, torch.zeros_like(best_step)
            )
            # stop growing a field once it is far beyond the budget: it cannot count anyway
            active &= t_norm((1.0 + s.overshoot) * tau) <= 4 * eps
        tau = (1.0 + s.overshoot) * tau
        return deform(x, tau).detach(), t_norm(tau)

    def restrict(
        self, x: Tensor, x_adv: Tensor, eps: float, size: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """A deformation beyond the T-norm budget does not count: keep the clean sample there."""
        assert size is not None
        ok = size <= eps * (1 + 1e-6)
        x_adv = torch.where(ok.view(-1, *([1] * (x.dim() - 1))), x_adv.clamp(0.0, 1.0), x)
        return x_adv, torch.where(ok, size, torch.zeros_like(size))
