"""odekit: neural ODEs, reduced-order networks and universal adversarial perturbations.

The functions (`odekit.load`, `odekit.reduce`, `odekit.asnet`, `odekit.attack`,
`odekit.certify`, `odekit.smoothness_check`, `odekit.export_onnx`; docs/api.md) load on first use, so
`import odekit` and `odekit --help` never import torch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from odekit.errors import OdekitError

try:
    __version__ = version("odekit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.1.0"

if TYPE_CHECKING:  # the names `__getattr__` loads, for type checkers and IDEs
    from odekit.api.asnets import ASNetRunResult, asnet
    from odekit.api.attacks import AttackResult, attack
    from odekit.api.certify import CertifyResult, certify
    from odekit.api.compression import ReduceResult, reduce
    from odekit.api.inputs import load
    from odekit.api.onnx_export import OnnxExport, export_onnx
    from odekit.api.smoothness import SmoothnessRunResult, smoothness_check

__all__ = [
    "ASNetRunResult",
    "AttackResult",
    "CertifyResult",
    "OdekitError",
    "OnnxExport",
    "ReduceResult",
    "SmoothnessRunResult",
    "__version__",
    "asnet",
    "attack",
    "certify",
    "export_onnx",
    "load",
    "reduce",
    "smoothness_check",
]
_API = frozenset(__all__) - {"OdekitError", "__version__"}


def __getattr__(name: str) -> Any:
    if name in _API:  # loaded by name: every layer imports `odekit` for __version__, none needs the API
        return importlib.import_module("odekit.api").export(name)
    raise AttributeError(f"module 'odekit' has no attribute '{name}'")
