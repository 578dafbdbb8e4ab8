"""Narrowed models: a registered architecture with fewer channels in some convs, linears and
BatchNorms (the student of ``odekit reduce --mode channel``).

The channel student keeps the teacher's module names and changes only tensor shapes, so it is
described by the teacher's ``{"arch", "args"}`` and the narrowed shape of each changed layer:
``channel_student`` (registered as `CHANNEL_ARCH`) builds the teacher's architecture and narrows
those layers, and the stored weights load into it strictly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from odekit.models.registry import build_model, register_arch

CHANNEL_ARCH = "channel_student"
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NARROWABLE = (*_CONV, nn.Linear, nn.modules.batchnorm._BatchNorm)


def _defining_tensor(module: nn.Module) -> tuple[str, Tensor] | None:
    """The tensor whose shape gives a layer's widths: its weight (the running mean of a BatchNorm
    without affine parameters)."""
    for name in ("weight", "running_mean"):
        value = getattr(module, name, None)
        if isinstance(value, Tensor):
            return name, value
    return None


def narrowed_shapes(model: nn.Module, state: dict[str, Tensor]) -> dict[str, list[int]]:
    """Module name -> shape of the conv, linear and BatchNorm layers of ``model`` whose weight
    (running mean without affine) has another shape in ``state``; other mismatches are left to
    the strict load to report."""
    shapes: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        found = _defining_tensor(module) if isinstance(module, _NARROWABLE) else None
        if found is None:
            continue
        key = f"{name}.{found[0]}" if name else found[0]
        if key in state and tuple(state[key].shape) != tuple(found[1].shape):
            shapes[name] = [int(s) for s in state[key].shape]
    return shapes


def narrow_modules(model: nn.Module, shapes: dict[str, list[int]]) -> nn.Module:
    """Give each layer named in ``shapes`` that weight shape: its parameters and buffers are cut
    to the new widths (the weights to load overwrite them) and its width attributes follow.
    Raises ValueError for a layer that is missing, of another kind, or would grow."""
    for name, shape in shapes.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"the model has no layer '{name}' to narrow") from exc
        if not isinstance(module, _NARROWABLE):
            raise ValueError(f"layer '{name}' is a {type(module).__name__}: only convs, linears and BatchNorms narrow")
        _narrow(module, name, [int(s) for s in shape])
    return model


def narrow_to_state_dict(model: nn.Module, state: dict[str, Tensor]) -> dict[str, list[int]]:
    """Narrow ``model``'s layers to the shapes stored in ``state`` (see `narrowed_shapes`);
    returns the narrowed shapes. ``model.load_state_dict(state, strict=True)`` then fits."""
    shapes = narrowed_shapes(model, state)
    narrow_modules(model, shapes)
    return shapes


def _narrow(module: nn.Module, name: str, shape: list[int]) -> None:
    found = _defining_tensor(module)
    assert found is not None
    old = list(found[1].shape)
    if len(shape) != len(old) or any(not 1 <= s <= o for s, o in zip(shape, old, strict=True)):
        raise ValueError(f"layer '{name}' of shape {old} cannot be narrowed to {shape}")
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        for key in ("weight", "bias", "running_mean", "running_var"):
            _cut(module, key, shape[:1])
        module.num_features = shape[0]
        return
    if isinstance(module, _CONV):
        _narrow_conv(module, name, shape, old)
    else:
        assert isinstance(module, nn.Linear)
        module.out_features, module.in_features = shape[0], shape[1]
    _cut(module, "weight", shape)
    _cut(module, "bias", shape[:1])


def _narrow_conv(module: nn.Conv1d | nn.Conv2d | nn.Conv3d, name: str, shape: list[int], old: list[int]) -> None:
    if shape[2:] != old[2:]:
        raise ValueError(f"layer '{name}': a narrowed conv keeps its kernel {old[2:]}, got {shape[2:]}")
    if module.groups == 1:
        module.out_channels, module.in_channels = shape[0], shape[1]
        return
    if not (module.groups == module.in_channels == module.out_channels and shape[1] == 1):
        raise ValueError(f"layer '{name}': only depthwise grouped convs narrow (groups {module.groups})")
    module.out_channels = module.in_channels = module.groups = shape[0]


def _cut(module: nn.Module, key: str, shape: list[int]) -> None:
    """Replace ``module.key`` by its leading ``shape`` block (same dtype, device, kind)."""
    old = getattr(module, key, None)
    if not isinstance(old, Tensor):
        return
    block = old.detach()[tuple(slice(0, s) for s in shape)].clone()
    if isinstance(old, nn.Parameter):
        setattr(module, key, nn.Parameter(block, requires_grad=old.requires_grad))
    else:
        setattr(module, key, block)  # an existing buffer stays a buffer (persistent or not)


@register_arch(
    CHANNEL_ARCH,
    "channel student: a registered architecture with fewer channels in some layers (the channel mode of reduce)",
    None,
    family="channel",
)
def channel_student(arch: str, args: dict[str, Any], shapes: dict[str, list[int]]) -> nn.Module:
    """The architecture ``arch`` built with ``args``, layers narrowed to ``shapes``."""
    if arch == CHANNEL_ARCH:
        raise ValueError("a channel student's architecture cannot itself be a channel student")
    if not isinstance(args, dict) or not isinstance(shapes, dict):
        raise ValueError("a channel student's arguments 'args' and 'shapes' must be JSON objects")
    with torch.no_grad():
        return narrow_modules(build_model(arch, args), shapes)
