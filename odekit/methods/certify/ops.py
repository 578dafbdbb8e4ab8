"""Lipschitz constants of the non-linear and pooling nodes of a traced graph (modules, torch
functions, tensor methods and aten ops alike), read from their arguments and input shapes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch.fx as fx
from torch import Tensor, nn

from odekit.errors import UnsupportedModelError
from odekit.linalg.lipschitz import (
    ACTIVATION_LIPSCHITZ,
    adaptive_windows,
    avg_pool_constant,
    leaky_constant,
    max_pool_constant,
    pool_windows,
)


class NotCertifiable(UnsupportedModelError):
    """The network holds an operation without a global l2 Lipschitz constant."""


HINT = "certify bounds conv/linear/BatchNorm/pooling/element-wise activations and residual sums (docs/certify.md)"
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)
RESHAPES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
            nn.AlphaDropout, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
            nn.ConstantPad3d)  # fmt: skip


def op_name(node: fx.Node) -> str:
    """'relu' for torch.relu, F.relu, x.relu(), aten.relu.default and aten.relu_.default alike."""
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function":
        target = node.target
        text = str(target)
        name = text.split(".")[1] if text.startswith("aten.") else getattr(target, "__name__", text)
    else:
        return ""
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    return name.removesuffix("_with_indices")


def _arg(node: fx.Node, index: int, key: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(key, default)


def activation_key(node: fx.Node, values: dict[fx.Node, Any]) -> tuple[str, float] | None:
    """(name, constant) of an element-wise activation call, else None."""
    name = op_name(node)
    if name in ("softmax", "_softmax", "log_softmax", "_log_softmax"):
        if name.endswith("log_softmax"):
            return None  # no global constant inside a network; a final one is left out instead
        return "softmax", ACTIVATION_LIPSCHITZ["softmax"]
    if name in ACTIVATION_LIPSCHITZ:
        return name, ACTIVATION_LIPSCHITZ[name]
    if name == "leaky_relu":
        return name, leaky_constant(float(_arg(node, 1, "negative_slope", 0.01)))
    if name in ("elu", "celu"):
        return name, leaky_constant(float(_arg(node, 1, "alpha", 1.0)))
    if name == "prelu":
        weight = _arg(node, 1, "weight", None)
        w = values.get(weight) if isinstance(weight, fx.Node) else weight
        return name, leaky_constant(float(w.abs().max())) if isinstance(w, Tensor) else 1.0
    return None


def _tuple(value: Any, d: int) -> tuple[int, ...]:
    if value is None or (isinstance(value, Sequence) and len(value) == 0):
        return ()
    return (int(value),) * d if isinstance(value, int) else tuple(int(v) for v in value)


def pooling(kind: str, spatial: Sequence[int], kernel: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
            ceil_mode: bool = False, count_include_pad: bool = True, divisor: Any = None) -> float:  # fmt: skip
    """The constant of a max ('max') or average ('avg') pooling on an input of size ``spatial``."""
    d = len(spatial)
    k = _tuple(kernel, d)
    s = _tuple(stride, d) or k
    p, dil = _tuple(padding, d) or (0,) * d, _tuple(dilation, d) or (1,) * d
    windows = [pool_windows(n, ki, si, pi, di, ceil_mode) for n, ki, si, pi, di in zip(spatial, k, s, p, dil, strict=True)]
    if kind == "max":
        return max_pool_constant(windows)
    if divisor:
        per_dim = [[float(divisor) ** (1.0 / d)] * len(w) for w in windows]
    elif count_include_pad:
        # torch divides by the window clipped to the padded input, whole kernels inside it
        per_dim = [[float(min(ki, n + pi - (i * si - pi))) if ceil_mode else float(ki) for i in range(len(w))]
                   for w, n, ki, si, pi in zip(windows, spatial, k, s, p, strict=True)]  # fmt: skip
    else:
        per_dim = [[float(max(len(ix), 1)) for ix in w] for w in windows]
    return avg_pool_constant(windows, per_dim)


def adaptive(kind: str, spatial: Sequence[int], output_size: Any) -> float:
    """The constant of an adaptive max/average pooling to ``output_size``."""
    d = len(spatial)
    out = [n if o is None else int(o) for n, o in zip(spatial, _tuple_none(output_size, d), strict=True)]
    windows = [adaptive_windows(n, o) for n, o in zip(spatial, out, strict=True)]
    if kind == "max":
        return max_pool_constant(windows)
    return avg_pool_constant(windows, [[float(len(ix)) for ix in w] for w in windows])


def _tuple_none(value: Any, d: int) -> tuple[Any, ...]:
    return (value,) * d if value is None or isinstance(value, int) else tuple(value)


def _spatial(node: fx.Node, values: dict[fx.Node, Any], d: int) -> list[int]:
    src = node.args[0]
    value = values.get(src) if isinstance(src, fx.Node) else None
    if not isinstance(value, Tensor):
        raise NotCertifiable(f"'{node.name}' pools a non-tensor", HINT)
    return list(value.shape[-d:])


def pool_constant(node: fx.Node, values: dict[fx.Node, Any]) -> float | None:
    """The constant of a functional/aten pooling call, else None."""
    name = op_name(node)
    for d in (1, 2, 3):
        if name == f"max_pool{d}d":
            return pooling("max", _spatial(node, values, d), _arg(node, 1, "kernel_size", 1), _arg(node, 2, "stride", None),
                           _arg(node, 3, "padding", 0), _arg(node, 4, "dilation", 1), bool(_arg(node, 5, "ceil_mode", False)))  # fmt: skip
        if name == f"avg_pool{d}d":
            return pooling("avg", _spatial(node, values, d), _arg(node, 1, "kernel_size", 1), _arg(node, 2, "stride", None),
                           _arg(node, 3, "padding", 0), 1, bool(_arg(node, 4, "ceil_mode", False)),
                           bool(_arg(node, 5, "count_include_pad", True)), _arg(node, 6, "divisor_override", None))  # fmt: skip
        if name in (f"adaptive_avg_pool{d}d", f"_adaptive_avg_pool{d}d"):
            return adaptive("avg", _spatial(node, values, d), _arg(node, 1, "output_size", 1))
        if name == f"adaptive_max_pool{d}d":
            return adaptive("max", _spatial(node, values, d), _arg(node, 1, "output_size", 1))
    return None


MAX_REDUCTIONS = ("amax", "amin", "max", "min")


def reduction_constant(node: fx.Node, values: dict[fx.Node, Any]) -> float | None:
    """mean/sum over dims: 1/sqrt(count) and sqrt(count) (Cauchy-Schwarz); max/min over dims: 1
    (|max a - max b| <= max |a - b|, and the reduced groups do not overlap); else None."""
    name = op_name(node)
    if name not in ("mean", "sum", *MAX_REDUCTIONS):
        return None
    src = node.args[0]
    value = values.get(src) if isinstance(src, fx.Node) else None
    if not isinstance(value, Tensor):
        return None
    dims = _arg(node, 1, "dim", None)
    if dims is None:
        return None  # a reduction over the batch too: not a per-sample map
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not all(isinstance(d, int) for d in dims):
        return None
    if any(d % value.dim() == 0 for d in dims):
        return None
    if name in MAX_REDUCTIONS:
        return 1.0
    count = math.prod(value.shape[d] for d in dims)
    return 1.0 / math.sqrt(count) if name == "mean" else math.sqrt(count)


def module_constant(module: nn.Module, in_value: Any, name: str) -> tuple[str, float]:
    """(kind, constant) of a non-compute module: activation, BatchNorm, pooling or reshape."""
    from odekit.methods.certify.network import bn_scale

    if isinstance(module, RESHAPES):
        return "reshape", 1.0
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batchnorm", float(bn_scale(module).abs().max())
    if isinstance(module, NORMS):
        raise NotCertifiable(f"'{name}' ({type(module).__name__}) divides by a per-sample statistic: no global "
                             "Lipschitz constant, so the network is not certifiable", HINT)  # fmt: skip
    if isinstance(module, nn.MultiheadAttention):
        raise NotCertifiable(f"'{name}' (attention) multiplies activations together: no global Lipschitz "
                             "constant, so the network is not certifiable", HINT)  # fmt: skip
    key = type(module).__name__.lower()
    if key in ACTIVATION_LIPSCHITZ:
        return "activation", ACTIVATION_LIPSCHITZ[key]
    if isinstance(module, nn.LeakyReLU):
        return "activation", leaky_constant(module.negative_slope)
    if isinstance(module, nn.ELU | nn.CELU):
        return "activation", leaky_constant(module.alpha)
    if isinstance(module, nn.PReLU):
        return "activation", leaky_constant(float(module.weight.detach().abs().max()))
    spatial = list(in_value.shape[2:]) if isinstance(in_value, Tensor) else []
    if isinstance(module, nn.MaxPool1d | nn.MaxPool2d | nn.MaxPool3d):
        return "pool", pooling("max", spatial, module.kernel_size, module.stride, module.padding, module.dilation,
                               module.ceil_mode)  # fmt: skip
    if isinstance(module, nn.AvgPool1d | nn.AvgPool2d | nn.AvgPool3d):
        return "pool", pooling("avg", spatial, module.kernel_size, module.stride, module.padding, 1, module.ceil_mode,
                               module.count_include_pad, getattr(module, "divisor_override", None))  # fmt: skip
    for cls, kind in ((nn.AdaptiveAvgPool1d, "avg"), (nn.AdaptiveAvgPool2d, "avg"), (nn.AdaptiveAvgPool3d, "avg"),
                      (nn.AdaptiveMaxPool1d, "max"), (nn.AdaptiveMaxPool2d, "max"), (nn.AdaptiveMaxPool3d, "max")):  # fmt: skip
        if isinstance(module, cls):
            return "pool", adaptive(kind, spatial, module.output_size)
    raise NotCertifiable(f"'{name}' ({type(module).__name__}) has no known Lipschitz constant, so the network is "
                         "not certifiable", HINT)  # fmt: skip
