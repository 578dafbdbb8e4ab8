"""Per-sample gradients of c(x) = loss(post-model(x)) with respect to a layer's activation or to
the input, batched.

The model runs in eval mode (BatchNorm statistics frozen, dropout off), so samples in a batch
do not interact and the gradient of the *summed* loss with respect to the (B, ...) activation
is exactly the stack of per-sample gradients. Losses act on logits through log-softmax
(``F.cross_entropy``), never on raw logits as if they were log-probabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from odekit.errors import UsageError
from odekit.progress import Progress, silent_if_none
from odekit.registry import Registry
from odekit.streaming.hooks import batch_inputs, model_device

__all__ = ["LOSSES", "per_sample_activation_grads", "per_sample_input_grads", "per_sample_loss"]

LossFn = Callable[[Tensor, Tensor], Tensor]  # (logits (B, K), target (B,)) -> per-sample loss (B,)
LOSSES: Registry[LossFn] = Registry("loss")


@LOSSES.register("cross_entropy", "-log softmax(logits)[target], per sample")
def _cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits, target, reduction="none")


@LOSSES.register("margin", "max_{j != target} logit_j - logit_target (Carlini-Wagner style)")
def _margin(logits: Tensor, target: Tensor) -> Tensor:
    true = logits.gather(1, target.unsqueeze(1)).squeeze(1)
    other = logits.scatter(1, target.unsqueeze(1), float("-inf")).amax(1)
    return other - true


def per_sample_loss(loss: str | LossFn, logits: Tensor, target: Tensor) -> Tensor:
    fn = LOSSES.get(loss) if isinstance(loss, str) else loss
    if logits.dim() != 2:
        logits = logits.reshape(logits.shape[0], -1)
    out = fn(logits, target)
    if out.shape != (logits.shape[0],):
        raise UsageError("a loss must return one value per sample")
    return out


def _targets(target: str | Tensor, y: Tensor | None, logits: Tensor) -> Tensor:
    if isinstance(target, Tensor):
        return target.to(logits.device).long()
    if target == "pred":
        return logits.detach().argmax(1)
    if target == "label":
        if y is None:
            raise UsageError(
                "the batches carry no labels", "use target='pred' or pass (x, y) batches"
            )
        return y.to(logits.device).long()
    raise UsageError(f"target must be 'label', 'pred' or a tensor, got '{target}'")


def per_sample_activation_grads(
    model: nn.Module,
    layer_module: nn.Module,
    batches: Iterable[Any],
    loss: str | LossFn = "cross_entropy",
    device: torch.device | str | None = None,
    target: str = "label",
    return_activations: bool = False,
    progress: Progress | None = None,
    total: int | None = None,
) -> Iterator[Tensor] | Iterator[tuple[Tensor, Tensor]]:
    """Yield, per batch, the (B, D) matrix of per-sample gradients dc/dz_l (flattened), where
    z_l is ``layer_module``'s output and c(x) = loss(model(x), target). ``target`` is
    ``"label"`` (batches are (x, y)) or ``"pred"`` (the model's own prediction). With
    ``return_activations`` yields ``(grads, activations)``. Results are delivered on ``device``
    (default: the model's device)."""
    if not any(m is layer_module for m in model.modules()):
        raise UsageError("layer_module is not part of the model")
    mdev = model_device(model)
    out_dev = torch.device(device) if device is not None else mdev
    was_training = model.training
    model.eval()
    holder: dict[str, Tensor] = {}

    def hook(_m: nn.Module, _inp: tuple[Any, ...], output: Any) -> Tensor:
        if not isinstance(output, Tensor):
            raise UsageError("the chosen layer does not output a single tensor")
        z = output.detach().requires_grad_(True)
        holder["z"] = z
        return z.clone()  # a non-leaf, so later in-place ops (ReLU(inplace=True)) are legal

    handle = layer_module.register_forward_hook(hook)
    try:
        for batch in silent_if_none(progress).track(batches, total, "per-sample gradients"):
            x, y = batch_inputs(batch)
            holder.clear()
            with torch.enable_grad():
                logits = model(x.to(mdev))
                if "z" not in holder:
                    raise UsageError("the chosen layer never ran in the forward pass")
                tgt = _targets(target, y, logits)
                c = per_sample_loss(loss, logits, tgt).sum()
                (g,) = torch.autograd.grad(c, holder["z"])
            z = holder.pop("z").detach()
            g = g.reshape(g.shape[0], -1).to(out_dev)
            if return_activations:
                yield g, z.reshape(z.shape[0], -1).to(out_dev)
            else:
                yield g
    finally:
        handle.remove()
        model.train(was_training)


def per_sample_input_grads(
    model: nn.Module,
    x: Tensor,
    y_or_pred: Tensor | str = "pred",
    loss: str | LossFn = "cross_entropy",
) -> Tensor:
    """Per-sample gradients dc/dx (same shape as ``x``) of c(x) = loss(model(x), y), with y the
    given labels or, for ``"pred"``, the model's predictions at x. Model in eval mode."""
    mdev = model_device(model)
    was_training = model.training
    model.eval()
    try:
        xr = x.detach().to(mdev).requires_grad_(True)
        with torch.enable_grad():
            logits = model(xr)
            if isinstance(y_or_pred, str):
                tgt = _targets(y_or_pred if y_or_pred == "pred" else "label", None, logits)
            else:
                tgt = _targets(y_or_pred, None, logits)
            c = per_sample_loss(loss, logits, tgt).sum()
            (g,) = torch.autograd.grad(c, xr)
    finally:
        model.train(was_training)
    return g.to(x.device)
