"""Graph normalisation passes of ``odekit.models.graph``: the aten/functional op tables and the
lifting of functional conv/linear/BatchNorm/max-pool calls to submodules (the clean-ups of
exported programs live in ``odekit.models.graph_cleanup``)."""

from __future__ import annotations

import operator
from typing import Any, cast

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

aten = torch.ops.aten

# Parameter names of the functional ops we lift, in positional order.
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_LINEAR_ARGS = ("input", "weight", "bias")
_ATEN_BN_ARGS = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
_F_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")

_CONV_TARGETS: dict[Any, int] = {
    aten.conv1d.default: 1,
    aten.conv2d.default: 2,
    aten.conv3d.default: 3,
    aten.conv1d.padding: 1,
    aten.conv2d.padding: 2,
    aten.conv3d.padding: 3,
    F.conv1d: 1,
    F.conv2d: 2,
    F.conv3d: 3,
}
_LINEAR_TARGETS: set[Any] = {aten.linear.default, F.linear}
_BN_TARGETS: dict[Any, tuple[str, ...]] = {aten.batch_norm.default: _ATEN_BN_ARGS, F.batch_norm: _F_BN_ARGS}
_POOL_TARGETS: dict[Any, int] = {
    aten.max_pool1d.default: 1,
    aten.max_pool2d.default: 2,
    aten.max_pool3d.default: 3,
    F.max_pool1d: 1,
    F.max_pool2d: 2,
    F.max_pool3d: 3,
    torch.max_pool1d: 1,
    torch.max_pool2d: 2,
    torch.max_pool3d: 3,
}
_SYM_SIZE = aten.sym_size.int

# Aten-level element-wise monotone activations (name -> odekit activation type).
ACTIVATION_TARGETS: dict[Any, str] = {
    aten.relu.default: "relu",
    aten.sigmoid.default: "sigmoid",
    aten.tanh.default: "tanh",
    aten.leaky_relu.default: "leaky_relu",
    aten.elu.default: "elu",
    aten.relu6.default: "relu6",
    aten.hardtanh.default: "hardtanh",
    aten.softplus.default: "softplus",
}
# Aten-level ops that are affine in their tensor inputs (shape queries included: they carry no values).
AFFINE_TARGETS: set[Any] = {
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.flatten.using_ints,
    aten.cat.default,
    aten.contiguous.default,
    aten.clone.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.unsqueeze.default,
    aten.permute.default,
    aten.transpose.int,
    aten.dropout.default,
    aten.avg_pool1d.default,
    aten.avg_pool2d.default,
    aten.adaptive_avg_pool1d.default,
    aten.adaptive_avg_pool2d.default,
    aten.mean.dim,
    aten.constant_pad_nd.default,
    aten.alias.default,
    _SYM_SIZE,
}


class LiftedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Eval-mode batch norm over dim 1 of any input rank (a lifted functional batch_norm whose
    input rank the graph does not record)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")


_BN_CLASSES: dict[int, type[nn.modules.batchnorm._BatchNorm]] = {
    2: nn.BatchNorm1d,
    3: nn.BatchNorm1d,
    4: nn.BatchNorm2d,
    5: nn.BatchNorm3d,
}
_CONV_CLASSES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_POOL_CLASSES: dict[int, type[nn.Module]] = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}


def probe_batch(model: nn.Module, input_shape: tuple[int, ...] | list[int], batch: int = 2) -> Tensor:
    """Zeros of shape (batch, *input_shape) on the model's device, in its floating dtype."""
    ref = next((t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()), None)
    if ref is None:
        return torch.zeros(batch, *input_shape)
    return torch.zeros(batch, *input_shape, device=ref.device, dtype=ref.dtype)


def _bind(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    bound = dict(zip(names, node.args, strict=False))
    for key, value in node.kwargs.items():
        bound["input" if key == "self" else key] = value
    return bound


def _attr(gm: fx.GraphModule, node: Any) -> Tensor | None:
    """The tensor behind a ``get_attr`` node (None for anything else)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value: Any = gm
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    return value if isinstance(value, Tensor) else None


def _owner(target: str) -> tuple[str, str]:
    """'features.0.weight' -> ('features.0', 'weight')."""
    head, _, leaf = target.rpartition(".")
    return head, leaf


def _as_param(t: Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=t.is_floating_point())


def _int_tuple(value: Any, n: int, default: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * n
    if isinstance(value, int):
        return (value,) * n
    seq = [int(v) for v in value]
    return tuple(seq) if len(seq) == n else (seq[0],) * n


def _tensor_rank(node: Any) -> int | None:
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, Tensor):
        return val.dim()
    tm = node.meta.get("tensor_meta")
    shape = getattr(tm, "shape", None)
    return len(shape) if shape is not None else None


class _Lifter:
    """Creates and names the submodules that replace functional calls."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.by_weight: dict[tuple[str, ...], str] = {}

    def _free(self, name: str) -> bool:
        try:
            self.gm.get_submodule(name)
        except AttributeError:
            return True
        return False

    def _replaceable(self, name: str, owned: set[str]) -> bool:
        """An exported program keeps every weight owner as a plain container module; it may be
        swapped for the real layer when it holds nothing but the lifted tensors."""
        try:
            current = self.gm.get_submodule(name)
        except AttributeError:
            return False
        if type(current) is not nn.Module or any(True for _ in current.children()):
            return False
        mine = {k for k, _ in current.named_parameters(recurse=False)} | {
            k for k, _ in current.named_buffers(recurse=False)
        }
        return mine <= owned

    def place(
        self, key: tuple[str, ...], owner: str, owned: set[str], module: nn.Module, fallback: str, leaf: str = "weight"
    ) -> str:
        """Install ``module`` under the weights' owner (which it replaces when that holds nothing
        else), under ``owner.in_proj`` for a weight named ``in_proj_weight``, else a fresh name."""
        if key in self.by_weight:
            return self.by_weight[key]
        named = f"{owner}.{leaf[: -len('_weight')]}" if owner and leaf.endswith("_weight") else ""
        if owner and self._replaceable(owner, owned):
            name = owner
            parent_name, _, child = owner.rpartition(".")
            parent = self.gm.get_submodule(parent_name) if parent_name else self.gm
            parent._modules[child] = module
        elif named and self._free(named) and self._parent_exists(named):
            name = named
            self.gm.add_submodule(name, module)
        else:
            base = (f"{owner}_{fallback}" if owner else fallback).replace(".", "_")
            name, k = base, 1
            while not self._free(name):
                k += 1
                name = f"{base}_{k}"
            self.gm.add_submodule(name, module)
        self.by_weight[key] = name
        return name

    def fresh(self, hint: str, module: nn.Module) -> str:
        name = hint if hint and self._free(hint) and self._parent_exists(hint) else ""
        if not name:
            base, name, k = "pool", "pool", 1
            while not self._free(name):
                k += 1
                name = f"{base}_{k}"
        self.gm.add_submodule(name, module)
        return name

    def _parent_exists(self, name: str) -> bool:
        parent = name.rpartition(".")[0]
        return not parent or not self._free(parent)


def _install_weights(
    node: fx.Node, a: dict[str, Any], layer: nn.Module, w: Tensor, b: Tensor | None, lifter: _Lifter, kind: str
) -> None:
    """Give ``layer`` the graph's weight (and bias) and make ``node`` call it."""
    weight, bias_node = a["weight"], a.get("bias")
    assert isinstance(weight, fx.Node)
    owner, leaf = _owner(str(weight.target))
    layer.weight = _as_param(w)
    owned = {leaf}
    if b is not None:
        assert isinstance(bias_node, fx.Node)
        layer.bias = _as_param(b)
        bias_owner, bias_leaf = _owner(str(bias_node.target))
        owned.add(bias_leaf)
        if bias_owner != owner:
            owner = ""
    key = (str(weight.target), str(getattr(bias_node, "target", "")), kind)
    _to_module(node, lifter.place(key, owner, owned, layer, kind, leaf), a["input"])


_CONV_BY_DIMS = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}
_POOL_WITH_INDICES = {
    aten.max_pool1d_with_indices.default: aten.max_pool1d.default,
    aten.max_pool2d_with_indices.default: aten.max_pool2d.default,
    aten.max_pool3d_with_indices.default: aten.max_pool3d.default,
}
_TRANSPOSES = {aten.permute.default, aten.t.default, aten.transpose.int}


def _first_output_only(node: fx.Node) -> bool:
    """True when every reader takes element 0 of the node's tuple output."""
    return bool(node.users) and all(
        u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0 for u in node.users
    )


def _take_first_output(node: fx.Node) -> None:
    for user in list(node.users):
        if "val" in user.meta:
            node.meta["val"] = user.meta["val"]
        user.replace_all_uses_with(node)
        node.graph.erase_node(user)


def _transposed_weight(node: Any) -> fx.Node | None:
    """W for a node computing W^T (permute(W, [1, 0]) or t(W)) of a graph attribute W."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _TRANSPOSES:
        return None
    src, rest = node.args[0], cast(list[Any], list(node.args[1:]))
    if node.target is aten.permute.default and list(rest[0]) != [1, 0]:
        return None
    if node.target is aten.transpose.int and sorted(int(d) % 2 for d in rest[:2]) != [0, 1]:
        return None
    return src if isinstance(src, fx.Node) and src.op == "get_attr" else None


def _undecompose(gm: fx.GraphModule, node: fx.Node) -> None:
    """Decomposed aten ops (``ExportedProgram.run_decompositions``) back to the forms we lift:
    convolution -> convNd, addmm/mm with a transposed weight -> linear, the tuple-returning
    batch-norm and max-pool-with-indices -> batch_norm / max_pool when only output 0 is read."""
    target, args = node.target, node.args
    if target is aten.convolution.default and len(args) >= 9 and not args[6]:
        weight = _attr(gm, args[1])
        rank = weight.dim() if weight is not None else None
        if rank in (3, 4, 5):
            node.target = _CONV_BY_DIMS[rank - 2]
            node.args = (args[0], args[1], args[2], args[3], args[4], args[5], args[8])
    elif target is aten.addmm.default and node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1:
        w_node = _transposed_weight(args[2])
        if w_node is not None:
            node.target, node.args, node.kwargs = aten.linear.default, (args[1], w_node, args[0]), {}
    elif target is aten.mm.default:
        w_node = _transposed_weight(args[1])
        if w_node is not None:
            node.target, node.args = aten.linear.default, (args[0], w_node)
    elif target is aten._native_batch_norm_legit_no_training.default and _first_output_only(node):
        x, w, b, mean, var, momentum, eps = args[:7]
        node.target = aten.batch_norm.default
        node.args = (x, w, b, mean, var, False, momentum, eps, False)
        _take_first_output(node)
    elif target in _POOL_WITH_INDICES and _first_output_only(node):
        node.target = _POOL_WITH_INDICES[target]
        _take_first_output(node)


def _lift_conv(gm: fx.GraphModule, node: fx.Node, dims: int, lifter: _Lifter) -> bool:
    a = _bind(node, _CONV_ARGS)
    weight, bias_node = a.get("weight"), a.get("bias")
    w = _attr(gm, weight)
    b = _attr(gm, bias_node)
    if w is None or (bias_node is not None and b is None) or w.dim() != dims + 2:
        return False
    groups = int(a.get("groups", 1) or 1)
    padding = a.get("padding", 0)
    conv = _CONV_CLASSES[dims](
        int(w.shape[1]) * groups,
        int(w.shape[0]),
        tuple(int(k) for k in w.shape[2:]),
        stride=_int_tuple(a.get("stride"), dims, 1),
        padding=padding if isinstance(padding, str) else _int_tuple(padding, dims, 0),
        dilation=_int_tuple(a.get("dilation"), dims, 1),
        groups=groups,
        bias=b is not None,
    )
    _install_weights(node, a, conv, w, b, lifter, "conv")
    return True


def _lift_linear(gm: fx.GraphModule, node: fx.Node, lifter: _Lifter) -> bool:
    a = _bind(node, _LINEAR_ARGS)
    weight, bias_node = a.get("weight"), a.get("bias")
    w = _attr(gm, weight)
    b = _attr(gm, bias_node)
    if w is None or (bias_node is not None and b is None) or w.dim() != 2:
        return False
    linear = nn.Linear(int(w.shape[1]), int(w.shape[0]), bias=b is not None)
    _install_weights(node, a, linear, w, b, lifter, "linear")
    return True


def _lift_batchnorm(gm: fx.GraphModule, node: fx.Node, names: tuple[str, ...], lifter: _Lifter) -> bool:
    a = _bind(node, names)
    mean, var = _attr(gm, a.get("running_mean")), _attr(gm, a.get("running_var"))
    w, b = _attr(gm, a.get("weight")), _attr(gm, a.get("bias"))
    if mean is None or var is None or bool(a.get("training", False)):
        return False
    affine = w is not None and b is not None
    if (w is None) != (b is None) or (a.get("weight") is not None and w is None):
        return False
    rank = _tensor_rank(a["input"])
    cls = _BN_CLASSES.get(rank, LiftedBatchNorm) if rank is not None else LiftedBatchNorm
    momentum = a.get("momentum", 0.1)
    bn = cls(int(mean.shape[0]), eps=float(a.get("eps", 1e-5)), momentum=momentum, affine=affine)
    mean_node = a["running_mean"]
    assert isinstance(mean_node, fx.Node)
    owner = _owner(str(mean_node.target))[0]
    owned = {"running_mean", "running_var", "num_batches_tracked"}
    with torch.no_grad():
        bn.running_mean = mean
        bn.running_var = var
        tracked = getattr(lifter.gm.get_submodule(owner), "num_batches_tracked", None) if owner else None
        if isinstance(tracked, Tensor) and bn.num_batches_tracked is not None:
            bn.num_batches_tracked = tracked
    if affine:
        assert w is not None and b is not None
        bn.weight = _as_param(w)
        bn.bias = _as_param(b)
        owned |= {"weight", "bias"}
    parts = [a.get(k) for k in ("weight", "bias", "running_mean", "running_var")]
    if any(isinstance(p, fx.Node) and _owner(str(p.target))[0] != owner for p in parts):
        owner = ""
    key = (str(mean_node.target), "bn")
    _to_module(node, lifter.place(key, owner, owned, bn, "bn"), a["input"])
    return True


def _lift_pool(node: fx.Node, dims: int, lifter: _Lifter) -> bool:
    a = _bind(node, _POOL_ARGS)
    if a.get("return_indices"):
        return False
    kernel = _int_tuple(a.get("kernel_size"), dims, 1)
    stride = a.get("stride")
    pool = _POOL_CLASSES[dims](
        kernel_size=kernel,
        stride=_int_tuple(stride, dims, 1) if stride not in (None, [], ()) else kernel,
        padding=_int_tuple(a.get("padding"), dims, 0),
        dilation=_int_tuple(a.get("dilation"), dims, 1),
        ceil_mode=bool(a.get("ceil_mode", False)),
    )
    stack = node.meta.get("nn_module_stack") or {}
    hint = ""
    if stack:
        path = list(stack.values())[-1]
        hint = str(path[0] if isinstance(path, tuple) else path)
    _to_module(node, lifter.fresh(_clean_path(hint), pool), a["input"])
    return True


def _clean_path(path: str) -> str:
    """nn_module_stack paths look like 'features.2' or "L['self'].features[2]"; keep the plain form."""
    if not path or any(c in path for c in "[]'\""):
        return ""
    return path


def _to_module(node: fx.Node, target: str, inp: Any) -> None:
    node.op = "call_module"
    node.target = target
    node.args = (inp,)
    node.kwargs = {}
