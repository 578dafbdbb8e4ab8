"""Architecture registry: names -> builders whose JSON-serialisable kwargs rebuild a model.

Every model odekit loads or writes is described by ``{"arch": name, "args": {...}}``; the
builder called with those args gives a module whose ``state_dict`` keys and shapes match the
stored weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from odekit.errors import CheckpointError, OdekitError, UsageError
from odekit.registry import Registry


@dataclass(frozen=True)
class Architecture:
    """A registered architecture: its builder and the input shape it expects by default."""

    builder: Callable[..., nn.Module]
    default_input_shape: tuple[int, ...] | None
    family: str


ARCHITECTURES: Registry[Architecture] = Registry("architecture")


def register_arch(
    name: str,
    description: str,
    default_input_shape: tuple[int, ...] | None = None,
    family: str = "zoo",
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a builder under ``name``."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ARCHITECTURES.add(name, Architecture(builder, default_input_shape, family), description)
        return builder

    return decorator


def build_model(arch: str, args: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate a registered architecture; bad args become a `CheckpointError`."""
    _ensure_plugins_loaded()
    entry = ARCHITECTURES.get(arch)
    try:
        return entry.builder(**(args or {}))
    except OdekitError:  # a ValueError too, but the builder's own message says it better
        raise
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"cannot build architecture '{arch}' with arguments {args}: {exc}",
            "check the checkpoint metadata or the `arch`/`num_classes` options",
        ) from exc


def architecture(arch: str) -> Architecture:
    _ensure_plugins_loaded()
    return ARCHITECTURES.get(arch)


# Every rebuildable model type (zoo nets, ODE nets, RON and channel students, ASNets) is registered by a
# module of this package; importing them lazily keeps `odekit info` fast, and `load_model`
# never imports `odekit.methods` (the layering contract in pyproject.toml checks it).
_ARCH_MODULES = (
    "odekit.models.zoo",
    "odekit.models.ode_models",
    "odekit.models.antisym",
    "odekit.models.ron_student",
    "odekit.models.asnet",
    "odekit.models.narrow",
)
_plugins_loaded = False


def _ensure_plugins_loaded() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    import importlib

    for module in _ARCH_MODULES:
        importlib.import_module(module)


def arch_names() -> list[str]:
    _ensure_plugins_loaded()
    return ARCHITECTURES.names()


def require_num_classes(num_classes: int | None, arch: str) -> int:
    if num_classes is None or num_classes < 1:
        raise UsageError(
            f"architecture '{arch}' needs the number of classes", "pass `num_classes` K"
        )
    return num_classes
