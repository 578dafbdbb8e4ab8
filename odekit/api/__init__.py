"""The Python API: a model object (or a path) and data in, a frozen typed result out.

`odekit.load`, `odekit.reduce`, `odekit.asnet`, `odekit.attack`, `odekit.certify`, `odekit.smoothness_check` and
`odekit.export_onnx` live here; the CLI commands call them and render what they return. Names
load on first use, so importing `odekit` (and `odekit --help`) stays free of torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module of odekit.api defining it
EXPORTS = {
    "load": "inputs",
    "load_checkpoint": "inputs",
    "reduce": "compression",
    "ReduceResult": "compression",
    "asnet": "asnets",
    "ASNetRunResult": "asnets",
    "attack": "attacks",
    "AttackResult": "attacks",
    "certify": "certify",
    "CertifyResult": "certify",
    "smoothness_check": "smoothness",
    "SmoothnessRunResult": "smoothness",
    "export_onnx": "onnx_export",
    "OnnxExport": "onnx_export",
    "RunResult": "results",
}

__all__ = sorted(EXPORTS)


def export(name: str) -> Any:
    """The object ``name`` of `EXPORTS`, importing its module now."""
    return getattr(importlib.import_module(f"odekit.api.{EXPORTS[name]}"), name)


def __getattr__(name: str) -> Any:
    if name not in EXPORTS:
        raise AttributeError(f"module 'odekit.api' has no attribute '{name}'")
    return export(name)
