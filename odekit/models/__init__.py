"""Model zoo, architecture registry and layer addressing."""

from odekit.models.registry import (
    ARCHITECTURES,
    arch_names,
    architecture,
    build_model,
    register_arch,
)

__all__ = ["ARCHITECTURES", "arch_names", "architecture", "build_model", "register_arch"]
