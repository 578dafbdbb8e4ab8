"""RON linear maps: BatchNorm folding and sampled rows of conv/affine maps (VJPs, never dense)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from odekit.errors import UnsupportedModelError, UsageError
from odekit.methods.ron.ops import (
    _COMPUTE,
    _pool_params,
    _run_node,
)
from odekit.methods.ron.regions import _Region, _State

# ----------------------------------------------------------------------------- linear algebra


def fold_batchnorm(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of conv/linear ``layer`` with eval-mode BatchNorm ``bn`` folded into it."""
    if not isinstance(layer, _COMPUTE) or not isinstance(
        bn, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d
    ):
        raise UsageError("fold_batchnorm needs a conv/linear layer and a BatchNorm layer")
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedModelError("BatchNorm without running statistics cannot be folded")
    fused = copy.deepcopy(layer)
    with torch.no_grad():
        scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(
            bn.running_var + bn.eps
        )
        shift = (
            bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        ) - bn.running_mean * scale
        w = fused.weight
        fused.weight.copy_(w * scale.reshape(-1, *([1] * (w.dim() - 1))))
        old_bias = fused.bias if fused.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = old_bias * scale + shift
        if fused.bias is None:
            fused.bias = nn.Parameter(new_bias.to(w.dtype))
        else:
            fused.bias.copy_(new_bias)
    return fused


def conv_rows(
    layer: nn.Module, in_shape: tuple[int, ...], rows: Tensor, chunk: int = 256
) -> Tensor:
    """Rows ``rows`` (flat output indices) of the linear map of ``layer`` (bias excluded), as a
    (len(rows), prod(in_shape)) matrix, by vector-Jacobian products: no dense matrix."""

    def f(x: Tensor) -> Tensor:
        out = layer(x)
        bias = getattr(layer, "bias", None)
        if bias is not None:
            out = out - bias.reshape(1, -1, *([1] * (out.dim() - 2)))
        return out

    return _vjp_rows(f, in_shape, rows, chunk, next(layer.parameters()))


def _vjp_rows(
    f: Callable[[Tensor], Tensor], in_shape: tuple[int, ...], rows: Tensor, chunk: int, like: Tensor
) -> Tensor:
    out = []
    for start in range(0, rows.numel(), chunk):
        r = rows[start : start + chunk]
        x = torch.zeros(
            r.numel(), *in_shape, dtype=like.dtype, device=like.device, requires_grad=True
        )
        with torch.enable_grad():
            y = f(x).reshape(r.numel(), -1)
            cot = torch.zeros_like(y)
            cot[torch.arange(r.numel(), device=y.device), r.to(y.device)] = 1.0
            (g,) = torch.autograd.grad(y, x, cot)
        out.append(g.reshape(r.numel(), -1).detach())
    return (
        torch.cat(out)
        if out
        else torch.zeros(0, math.prod(in_shape), dtype=like.dtype, device=like.device)
    )


def _eval_affine(
    st: _State,
    region: _Region,
    mods: dict[str, nn.Module],
    inputs: dict[fx.Node, Tensor],
    batch: int,
    like: Tensor,
) -> Tensor:
    """Evaluate state ``st``'s pre-activation with the given source values (missing: zero)."""
    env: dict[fx.Node, Any] = {}
    for src in st.sources:
        env[src] = inputs.get(
            src, torch.zeros(batch, *region.shapes[src], dtype=like.dtype, device=like.device)
        )
    for n in st.affine_nodes:
        for inp in n.all_input_nodes:
            if inp.op == "get_attr" and inp not in env:
                env[inp] = _run_node(inp, env, region.gm, mods)
        env[n] = _run_node(n, env, region.gm, mods)
    return env[st.pre]


def _pre_rows(
    st: _State, region: _Region, mods: dict[str, nn.Module], sampled: Tensor
) -> tuple[Tensor, int]:
    """Flat pre-activation positions for sampled state rows (k*k per row for a max-pool)."""
    if st.pool is None:
        return sampled, 1
    k, s = _pool_params(st.pool, mods)
    out_shape = region.shapes[st.out]
    pre_shape = region.shapes[st.pool.args[0]]  # type: ignore[index]
    if len(out_shape) != 3 or len(pre_shape) != 3:
        raise UnsupportedModelError("RON supports max-pools over (C, H, W) feature maps")
    _, ho, wo = out_shape
    _, h, w = pre_shape
    c = sampled // (ho * wo)
    i = (sampled // wo) % ho
    j = sampled % wo
    di = torch.arange(k, device=sampled.device).repeat_interleave(k)
    dj = torch.arange(k, device=sampled.device).repeat(k)
    rows = (
        c[:, None] * (h * w) + (i[:, None] * s + di[None, :]) * w + (j[:, None] * s + dj[None, :])
    )
    return rows.reshape(-1), k * k
