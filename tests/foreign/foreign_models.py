"""The foreign-model zoo, saved the four ways users save models (fixtures in conftest.py).

Each ``ForeignModel`` is built from ``tests/foreign/zoo.py`` copied into its own folder as
``user_models.py`` (a user's module, not importable from the tests' ``sys.path``), trained
briefly on digits (seeded, one thread) and written as:

- ``pickle``: ``torch.save(model)`` (needs ``--trust-checkpoint`` and the module importable),
- ``state``: ``torch.save(model.state_dict())`` + ``--arch FOLDER/user_models.py:Name``,
- ``torchscript``: ``torch.jit.trace`` + ``torch.jit.save``,
- ``export``: ``torch.export.export`` (dynamic batch) + ``torch.export.save`` (``.pt2``).

Data are ``.npz`` files in [0, 1] pixels with an explicit test split, so the accuracy computed
here in plain torch is the one odekit must report given the same ``--normalize``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ZOO_FILE = Path(__file__).with_name("zoo.py")
USER_MODULE = "user_models"
FORMATS = ("pickle", "state", "torchscript", "export")


@dataclass(frozen=True)
class ForeignModel:
    """One zoo model saved four ways, with the data and normalisation it was trained with."""

    name: str
    folder: Path
    input_shape: tuple[int, ...]
    data: Path
    normalize: str  # the --normalize value matching training ("none" or "MEAN,STD")
    accuracy: float  # test accuracy in plain torch under that normalisation
    arch_spec: str  # --arch value for the state dict
    arch_args: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)

    def args(self, fmt: str) -> list[str]:
        """Checkpoint path plus the options needed to load it in format ``fmt``."""
        path = str(self.files[fmt])
        if fmt == "pickle":
            return [path, "--trust-checkpoint"]
        if fmt == "state":
            return [path, "--arch", self.arch_spec, "--arch-args", json.dumps(self.arch_args)]
        return [path]

    def data_args(self) -> list[str]:
        return ["--data", str(self.data), "--normalize", self.normalize]


def _digits_pixels() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """8x8 digits in [0, 1] as (N, 1, 8, 8) with a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]
    idx_train, idx_test = train_test_split(np.arange(len(x)), test_size=0.2, random_state=0, stratify=bunch.target)
    return x[idx_train], bunch.target[idx_train], x[idx_test], bunch.target[idx_test]


def write_digits_npz(path: Path, shape: tuple[int, ...]) -> Path:
    """Digits as ``shape`` (3,32,32: grey upsampled to RGB; (64,): flattened) in an .npz."""
    xtr, ytr, xte, yte = _digits_pixels()

    def fit(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x)
        if len(shape) == 1:
            return t.reshape(len(t), -1).numpy()
        t = F.interpolate(t, size=shape[1:], mode="bilinear", align_corners=False).clamp(0, 1)
        return t.expand(-1, shape[0], -1, -1).contiguous().numpy()

    np.savez(path, x=fit(xtr), y=ytr, x_test=fit(xte), y_test=yte)
    return path


def _import_user_module(path: Path):
    spec = importlib.util.spec_from_file_location(USER_MODULE, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[USER_MODULE] = module
    spec.loader.exec_module(module)
    return module


def _normalised(x: torch.Tensor, normalize: str) -> torch.Tensor:
    if normalize == "none":
        return x
    mean, std = (float(v) for v in normalize.split(","))
    return (x - mean) / std


def _train(model: nn.Module, data: Path, normalize: str, epochs: int) -> float:
    """A few seeded Adam epochs; returns test accuracy under ``normalize``."""
    arrays = np.load(data)
    xtr, ytr = _normalised(torch.from_numpy(arrays["x"]), normalize), torch.from_numpy(arrays["y"]).long()
    xte, yte = _normalised(torch.from_numpy(arrays["x_test"]), normalize), torch.from_numpy(arrays["y_test"]).long()
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(ytr), generator=generator)
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            optimizer.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        return float((model(xte).argmax(1) == yte).float().mean())


def save_four_ways(model: nn.Module, folder: Path, stem: str, input_shape: tuple[int, ...]) -> dict[str, Path]:
    """Write ``model`` (whose class lives in the user module) as pickle, state dict, TorchScript and .pt2."""
    model.eval()
    example = torch.zeros(2, *input_shape)
    files = {
        "pickle": folder / f"{stem}.pt",
        "state": folder / f"{stem}_state.pth",
        "torchscript": folder / f"{stem}_script.pt",
        "export": folder / f"{stem}.pt2",
    }
    torch.save(model, files["pickle"])
    torch.save(model.state_dict(), files["state"])
    # check_trace=False: a ViT's trace check re-runs it and compares graphs, which differ in names only
    torch.jit.save(torch.jit.trace(model, example, check_trace=False), str(files["torchscript"]))
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(files["export"]))
    return files


SPECS: dict[str, dict[str, Any]] = {
    # name: factory in zoo.py, its kwargs, input shape, --normalize used in training, epochs
    "vgg": {"factory": "KuangliuVGG", "kwargs": {"vgg_name": "VGG19", "width_div": 16}, "shape": (3, 32, 32),
            "normalize": "none", "epochs": 3},
    "resnet18": {"factory": "resnet18", "kwargs": {"num_classes": 10}, "shape": (3, 32, 32),
                 "normalize": "none", "epochs": 0},
    "mlp": {"factory": "FunctionalMLP", "kwargs": {"in_features": 64, "hidden": 32}, "shape": (64,),
            "normalize": "0.3,0.4", "epochs": 15},
    # modern blocks at small widths (16x16 inputs)
    "vit": {"factory": "vit", "kwargs": {"image_size": 16, "patch_size": 4, "num_layers": 2, "num_heads": 2,
                                         "hidden_dim": 32, "mlp_dim": 64, "num_classes": 10},
            "shape": (3, 16, 16), "normalize": "none", "epochs": 2},
    "convnext": {"factory": "ConvNeXtNet", "kwargs": {"dim": 16, "depth": 2}, "shape": (3, 16, 16),
                 "normalize": "none", "epochs": 4},
    "mbconv": {"factory": "MBNet", "kwargs": {"channels": 8, "depth": 2}, "shape": (3, 16, 16),
               "normalize": "none", "epochs": 3},
}
# The modern-block models every command must handle in every format (channel reduce: test_foreign_channel.py).
MODERN = ("vit", "convnext", "mbconv")


def build_foreign(name: str, root: Path) -> ForeignModel:
    """Build, train and save zoo model ``name`` under ``root/name``."""
    spec = SPECS[name]
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    module_file = folder / f"{USER_MODULE}.py"
    shutil.copyfile(ZOO_FILE, module_file)
    data = write_digits_npz(folder / "digits.npz", spec["shape"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module = _import_user_module(module_file)
        torch.manual_seed(0)
        model = getattr(module, spec["factory"])(**spec["kwargs"])
        accuracy = _train(model, data, spec["normalize"], spec["epochs"])
        files = save_four_ways(model, folder, name, spec["shape"])
    finally:
        # The user's module must not stay importable: loading has to find it on its own.
        sys.modules.pop(USER_MODULE, None)
        torch.set_num_threads(threads)
    return ForeignModel(
        name=name,
        folder=folder,
        input_shape=spec["shape"],
        data=data,
        normalize=spec["normalize"],
        accuracy=accuracy,
        arch_spec=f"{module_file}:{spec['factory']}",
        arch_args=spec["kwargs"],
        files=files,
    )
