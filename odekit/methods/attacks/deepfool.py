"""Batched DeepFool (Moosavi-Dezfooli et al. 2016), l2 and linf, used by `deepfool` and `uap`."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _candidate_grads(
    model: nn.Module, x: Tensor, ref: Tensor, classes: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """logits (B, K), f_k = logit_k - logit_ref (B, C-1) and their input gradients (B, C-1, ...)."""
    xr = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(xr)
        rows = torch.arange(len(x), device=x.device)
        ref_logit = logits[rows, ref]
        diffs = [logits[rows, classes[:, k]] - ref_logit for k in range(classes.shape[1])]
        grads = []
        for k, diff in enumerate(diffs):
            (g,) = torch.autograd.grad(diff.sum(), xr, retain_graph=k < len(diffs) - 1)
            grads.append(g)
    return logits.detach(), torch.stack([d.detach() for d in diffs], 1), torch.stack(grads, 1)


def deepfool(
    model: nn.Module,
    x: Tensor,
    ref: Tensor,
    *,
    norm: str = "2",
    steps: int = 50,
    overshoot: float = 0.02,
    candidates: int = 10,
    labels: Tensor | None = None,
    target: Tensor | None = None,
) -> Tensor:
    """Minimal perturbation r (same shape as x, not clipped) with pred(x + r) != ref.

    ``ref`` is the class to move away from (the clean prediction); with ``labels`` a sample
    also counts as done once it is misclassified (robust-accuracy criterion). Candidate
    classes are the top-``candidates`` logits at the start, as in foolbox. With ``target``
    (one class per sample) the only candidate is the target and a sample is done once it is
    predicted as it (targeted DeepFool).
    """
    x = x.detach()
    with torch.no_grad():
        logits0 = model(x)
    k = min(candidates, logits0.shape[1])
    order = logits0.argsort(1, descending=True)
    # every class but ref, ranked by logit (ref first is dropped)
    if target is not None:
        others = target.view(-1, 1).to(x.device)
    else:
        others = torch.stack([row[row != r][: k - 1] for row, r in zip(order, ref, strict=True)])
    total = torch.zeros_like(x)
    x_cur = x
    for _ in range(steps):
        logits, f, g = _candidate_grads(model, x_cur, ref, others)
        pred = logits.argmax(1)
        done = pred != ref if target is None else pred == target.to(pred.device)
        if labels is not None:
            done |= pred != labels
        if bool(done.all()):
            break
        flat = g.reshape(g.shape[0], g.shape[1], -1)
        # l2 distance uses ||w||_2, linf uses the dual norm ||w||_1
        gnorm = (flat.norm(dim=2) if norm == "2" else flat.abs().sum(dim=2)) + 1e-8
        dist = f.abs() / gnorm
        best = dist.argmin(1)
        rows = torch.arange(len(x), device=x.device)
        d_best = dist[rows, best] + 1e-4
        g_best = g[rows, best]
        if norm == "2":
            step = (d_best / gnorm[rows, best]).view(-1, *([1] * (x.dim() - 1))) * g_best
        else:
            step = d_best.view(-1, *([1] * (x.dim() - 1))) * g_best.sign()
        step = torch.where(done.view(-1, *([1] * (x.dim() - 1))), torch.zeros_like(step), step)
        total = total + step
        x_cur = (x + (1.0 + overshoot) * total).clamp(0.0, 1.0)
    return (1.0 + overshoot) * total
