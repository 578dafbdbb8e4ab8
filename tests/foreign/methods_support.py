"""Shared by the foreign-model RON/ASNet tests: teachers as modules and as .pt2 graphs, data."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

from odekit.io.datasets import Dataset, Split
from odekit.io.exported import load_exported

ZOO = Path(__file__).with_name("zoo.py")


def teacher(model, fmt: str) -> nn.Module:
    """The zoo model rebuilt from its state dict ("module") or its .pt2 archive ("export")."""
    if fmt == "export":
        return load_exported(model.files["export"])[0]
    spec = importlib.util.spec_from_file_location("foreign_zoo_for_methods", ZOO)
    assert spec is not None and spec.loader is not None
    zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo)
    module = getattr(zoo, model.arch_spec.rsplit(":", 1)[1])(**model.arch_args)
    module.load_state_dict(torch.load(model.files["state"], weights_only=True))
    return module.eval()


def dataset(model) -> Dataset:
    """The model's digits .npz in model-input units (its --normalize applied)."""
    arrays = np.load(model.data)

    def units(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x).float()
        if model.normalize == "none":
            return t
        mean, std = (float(v) for v in model.normalize.split(","))
        return (t - mean) / std

    train = Split(units(arrays["x"]), torch.from_numpy(arrays["y"]).long())
    test = Split(units(arrays["x_test"]), torch.from_numpy(arrays["y_test"]).long())
    return Dataset("digits-npz", train, test, 10, tuple(model.input_shape), [0.0], [1.0])


def agreement(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """Fraction of equal top-1 predictions."""
    with torch.no_grad():
        return float((a(x).argmax(1) == b(x).argmax(1)).float().mean())


def max_abs_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())
