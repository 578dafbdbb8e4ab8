"""RON's classification of fx graph nodes: activations, affine ops, max-pools, compute layers."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from odekit.errors import UnsupportedModelError
from odekit.models.graph import ACTIVATION_TARGETS, AFFINE_TARGETS, run_node

# ----------------------------------------------------------------------------- op classes

_ACTIVATION_MODULES: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu",
    nn.ELU: "elu",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.Hardtanh: "hardtanh",
    nn.Softplus: "softplus",
}
_ACTIVATION_FUNCTIONS: dict[Any, str] = {
    F.relu: "relu",
    torch.relu: "relu",
    F.relu6: "relu6",
    torch.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.leaky_relu: "leaky_relu",
    F.elu: "elu",
}
_ACTIVATION_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}

_AFFINE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.modules.batchnorm._BatchNorm,  # lifted functional batch norms of exported graphs
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
)
_AFFINE_FUNCTIONS: set[Any] = {
    operator.add,
    operator.sub,
    operator.getitem,
    torch.add,
    torch.flatten,
    torch.cat,
    torch.reshape,
    F.pad,
    F.dropout,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
}
_AFFINE_METHODS = {"view", "reshape", "flatten", "contiguous", "add", "squeeze", "unsqueeze", "size"}
_COMPUTE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _modules(gm: fx.GraphModule) -> dict[str, nn.Module]:
    return dict(gm.named_modules())


def _op_label(node: fx.Node, mods: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(mods[str(node.target)]).__name__} '{node.target}'"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', str(node.target))} ('{node.name}')"
    if node.op == "call_method":
        return f"method .{node.target}() ('{node.name}')"
    return f"{node.op} '{node.name}'"


def _activation_kind(node: fx.Node, mods: dict[str, nn.Module]) -> dict[str, Any] | None:
    """JSON config of an element-wise monotone activation node, else None."""
    if node.op == "call_module":
        m = mods[str(node.target)]
        kind = _ACTIVATION_MODULES.get(type(m))
        if kind is None:
            return None
        cfg: dict[str, Any] = {"type": kind}
        if isinstance(m, nn.LeakyReLU):
            if m.negative_slope < 0:
                return None
            cfg["negative_slope"] = float(m.negative_slope)
        if isinstance(m, nn.ELU):
            if m.alpha < 0:
                return None
            cfg["alpha"] = float(m.alpha)
        if isinstance(m, nn.Hardtanh) and not isinstance(m, nn.ReLU6):
            cfg.update(min_val=float(m.min_val), max_val=float(m.max_val))
        if isinstance(m, nn.Softplus):
            cfg.update(beta=float(m.beta), threshold=float(m.threshold))
        return cfg
    if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
        kind = _ACTIVATION_FUNCTIONS[node.target]
        cfg = {"type": kind}
        if kind == "leaky_relu":
            slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
            if not isinstance(slope, float | int) or slope < 0:
                return None
            cfg["negative_slope"] = float(slope)
        if kind == "elu":
            alpha = node.kwargs.get("alpha", node.args[1] if len(node.args) > 1 else 1.0)
            if not isinstance(alpha, float | int) or alpha < 0:
                return None
            cfg["alpha"] = float(alpha)
        return cfg
    if node.op == "call_method" and node.target in _ACTIVATION_METHODS:
        return {"type": _ACTIVATION_METHODS[str(node.target)]}
    if node.op == "call_function" and node.target in ACTIVATION_TARGETS:
        return _aten_activation(node, ACTIVATION_TARGETS[node.target])
    return None


def _aten_activation(node: fx.Node, kind: str) -> dict[str, Any] | None:
    """Config of an aten-level activation node; None when its parameters make it non-monotone."""
    extra: list[Any] = list(node.args[1:])
    cfg: dict[str, Any] = {"type": kind}
    try:
        if kind == "leaky_relu":
            cfg["negative_slope"] = float(extra[0]) if extra else 0.01
            return cfg if cfg["negative_slope"] >= 0 else None
        if kind == "elu":
            alpha, scale, in_scale = ([float(v) for v in extra] + [1.0, 1.0, 1.0][len(extra) :])[:3]
            return {"type": "elu", "alpha": alpha} if alpha >= 0 and scale == 1.0 and in_scale == 1.0 else None
        if kind == "hardtanh":
            lo, hi = ([float(v) for v in extra] + [-1.0, 1.0][len(extra) :])[:2]
            return {"type": "relu6"} if (lo, hi) == (0.0, 6.0) else {"type": "hardtanh", "min_val": lo, "max_val": hi}
        if kind == "softplus":
            beta, threshold = ([float(v) for v in extra] + [1.0, 20.0][len(extra) :])[:2]
            return {"type": "softplus", "beta": beta, "threshold": threshold} if beta > 0 else None
    except (TypeError, ValueError):
        return None  # a parameter computed in the graph
    return cfg


def _is_maxpool(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(mods[str(node.target)], nn.MaxPool2d)


def _pool_params(node: fx.Node, mods: dict[str, nn.Module]) -> tuple[int, int]:
    pool = mods[str(node.target)]
    assert isinstance(pool, nn.MaxPool2d)

    def one(v: Any) -> int:
        if isinstance(v, tuple):
            if len(set(v)) != 1:
                raise ValueError
            return int(v[0])
        return int(v)

    try:
        k, s, p, d = one(pool.kernel_size), one(pool.stride), one(pool.padding), one(pool.dilation)
    except ValueError:
        k = s = p = d = -1
    if k < 1 or p != 0 or d != 1 or pool.ceil_mode:
        raise UnsupportedModelError(
            f"RON supports square max-pools without padding/dilation; {_op_label(node, mods)} is not one",
            "choose a layer range that ends before this pool",
        )
    return k, s


def _is_affine(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(mods[str(node.target)], _AFFINE_MODULES)
    if node.op == "call_function":
        if node.target is F.pad:
            mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
            value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
            return bool(mode == "constant" and value in (None, 0, 0.0))
        if node.target is torch.ops.aten.constant_pad_nd.default:
            return (node.args[2] if len(node.args) > 2 else 0) in (0, 0.0)
        if node.target is torch.ops.aten.dropout.default:
            return not (node.args[2] if len(node.args) > 2 else node.kwargs.get("train", False))
        return node.target in _AFFINE_FUNCTIONS or node.target in AFFINE_TARGETS
    if node.op == "call_method":
        return node.target in _AFFINE_METHODS
    return node.op == "get_attr"


_run_node = run_node
