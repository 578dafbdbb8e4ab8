"""Data sources: embedded digits, local torchvision folders, ImageFolder and .npz files.

Every source is turned into in-memory tensors in *model-input units* (pixels in [0, 1],
then normalised per channel with the recorded mean/std), with a fixed train/test split.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from odekit.errors import DataError, UsageError
from odekit.io.cdr import REGRESSION_DATASETS
from odekit.io.validation import decoded_images, image_folder_classes, read_npz, validate_npz

SPLIT_SEED = 0


@dataclass
class Split:
    """Inputs (model-input units) and integer labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, n: int | None, seed: int = 0) -> Split:
        """The first ``n`` samples of a seeded permutation (all of them when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise UsageError(f"asked for {n} samples", "ask for at least one sample")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return Split(self.x[order], self.y[order])

    def batches(
        self,
        batch_size: int,
        device: torch.device | str = "cpu",
        shuffle: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield self.x[idx].to(device), self.y[idx].to(device)

    def num_batches(self, batch_size: int) -> int:
        return (len(self) + batch_size - 1) // batch_size


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]
    mean: list[float]
    std: list[float]
    source: dict[str, Any] = field(default_factory=dict)

    def _channel_view(self, values: list[float]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.float32)
        if len(self.input_shape) == 3:
            return t.view(-1, 1, 1)
        return t.view(-1) if len(values) > 1 else t.view(())

    @property
    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Model-input values of pixel 0 and pixel 1, broadcastable against one sample."""
        mean, std = self._channel_view(self.mean), self._channel_view(self.std)
        return (0.0 - mean) / std, (1.0 - mean) / std

    @property
    def pixel_scale(self) -> torch.Tensor:
        """Multiply a model-input perturbation by this to express it in [0, 1] pixel units."""
        return self._channel_view(self.std)

    def normalization(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    def describe(self) -> dict[str, Any]:
        """JSON description stored in checkpoint metadata and reports."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "train_samples": len(self.train),
            "test_samples": len(self.test),
            **self.source,
        }


EXPECTED_LAYOUT = {
    "cifar10": "<data-dir>/cifar-10-batches-py/ (data_batch_1..5, test_batch), as torchvision unpacks it",
    "cifar100": "<data-dir>/cifar-100-python/ (train, test, meta), as torchvision unpacks it",
    "mnist": "<data-dir>/MNIST/raw/ with train-images-idx3-ubyte etc., as torchvision downloads it",
    "fashion-mnist": "<data-dir>/FashionMNIST/raw/ with train-images-idx3-ubyte etc.",
    "svhn": "<data-dir>/train_32x32.mat and <data-dir>/test_32x32.mat",
    "imagefolder": "<data-dir>/train/<class>/*.png and <data-dir>/test/<class>/*.png (or val/)",
}
DATASET_NAMES = ("digits", "cifar10", "cifar100", "mnist", "fashion-mnist", "svhn", "imagefolder")


def _check_finite(x: torch.Tensor, what: str) -> None:
    if x.numel() == 0:
        raise DataError(f"{what} is empty", "give a data set with at least one sample")
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise DataError(f"{what} holds {bad} NaN or infinite values", "clean the data before using it")


def _to_nchw(x: torch.Tensor, layout: str = "auto") -> torch.Tensor:
    """Accept (N,H,W), (N,H,W,C) or (N,C,H,W) images; ``auto`` detects channels-last by C in {1,3,4}."""
    if x.ndim == 3:
        return x.unsqueeze(1)
    if x.ndim == 4 and layout == "nhwc":
        return x.permute(0, 3, 1, 2)
    if x.ndim == 4 and layout == "auto" and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        return x.permute(0, 3, 1, 2)
    return x


def _fit_shape(x: torch.Tensor, shape: tuple[int, ...] | None, name: str) -> torch.Tensor:
    """Resize/convert images (N,C,H,W) to ``shape`` = (C,H,W); flat data must match exactly."""
    if shape is None:
        return x
    if x.ndim == 2 or len(shape) == 1:
        if tuple(x.shape[1:]) != tuple(shape) and int(np.prod(x.shape[1:])) != int(np.prod(shape)):
            raise DataError(
                f"{name} samples have shape {tuple(x.shape[1:])}, the model expects {tuple(shape)}",
                "choose data that matches the model's input",
            )
        return x.reshape(x.shape[0], *shape)
    channels, height, width = shape
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        elif channels == 1 and x.shape[1] == 3:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise DataError(
                f"{name} images have {x.shape[1]} channels, the model expects {channels}",
                "choose data that matches the model's input",
            )
    if tuple(x.shape[2:]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return x.contiguous()


def _finish(
    name: str,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    input_shape: tuple[int, ...] | None,
    normalization: dict[str, list[float]] | None,
    source: dict[str, Any],
    num_classes: int | None = None,
) -> Dataset:
    x_train = _fit_shape(x_train.float(), input_shape, name)
    x_test = _fit_shape(x_test.float(), input_shape, name)
    _check_finite(x_train, f"{name} training data")
    _check_finite(x_test, f"{name} test data")
    if normalization is None:
        dims = [0, 2, 3] if x_train.ndim == 4 else list(range(x_train.ndim))
        mean = x_train.mean(dim=dims).reshape(-1).tolist()
        std = x_train.std(dim=dims).clamp_min(1e-6).reshape(-1).tolist()
    else:
        mean, std = list(normalization["mean"]), list(normalization["std"])
        channels = x_train.shape[1] if x_train.ndim == 4 else 1
        if len(mean) == 1 and len(std) == 1 and channels > 1:  # one value for every channel
            mean, std = mean * channels, std * channels
        if x_train.ndim == 4 and len(mean) != channels:
            raise DataError(
                f"the normalisation has {len(mean)} channel values, the {name} images have {channels} channels",
                "give one MEAN,STD or one value per channel (`normalize` M1,M2,M3/S1,S2,S3)",
            )
    view = (1, -1, 1, 1) if x_train.ndim == 4 else ((1, -1) if len(mean) > 1 else (1,) * x_train.ndim)
    mean_t, std_t = torch.tensor(mean).view(view), torch.tensor(std).view(view)
    k = num_classes if num_classes is not None else int(max(y_train.max(), y_test.max())) + 1
    return Dataset(
        name=name,
        train=Split((x_train - mean_t) / std_t, y_train.long()),
        test=Split((x_test - mean_t) / std_t, y_test.long()),
        num_classes=k,
        input_shape=tuple(x_train.shape[1:]),
        mean=mean,
        std=std,
        source=source,
    )


def _digits(input_shape: tuple[int, ...] | None, normalization: dict[str, list[float]] | None) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(bunch.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=0.2, random_state=SPLIT_SEED, stratify=bunch.target
    )
    shape = input_shape or (1, 8, 8)
    source = {"source": "sklearn.datasets.load_digits", "split": f"stratified 80/20, seed {SPLIT_SEED}"}
    return _finish("digits", x[idx_train], y[idx_train], x[idx_test], y[idx_test], shape, normalization, source, 10)


def _require_dir(name: str, data_dir: str | Path | None) -> Path:
    if data_dir is None:
        raise UsageError(f"data set '{name}' is read from local files", f"pass `data_dir`; expected layout: {EXPECTED_LAYOUT[name]}")
    path = Path(data_dir)
    if not path.is_dir():
        raise DataError(f"data folder '{path}' does not exist", f"expected layout: {EXPECTED_LAYOUT[name]}")
    return path


def _torchvision(name: str, data_dir: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    import torchvision.datasets as tvd

    def build(train: bool) -> Any:
        if name == "svhn":
            return tvd.SVHN(str(data_dir), split="train" if train else "test", download=False)
        cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST}[name]
        return cls(str(data_dir), train=train, download=False)

    try:
        parts = [build(True), build(False)]
    except (RuntimeError, FileNotFoundError, OSError) as exc:
        raise DataError(
            f"'{name}' files were not found under '{data_dir}' ({str(exc).splitlines()[0]})",
            f"expected layout: {EXPECTED_LAYOUT[name]} (odekit never downloads data)",
        ) from exc
    out = []
    for ds in parts:
        data = torch.as_tensor(np.asarray(ds.data))
        labels = torch.as_tensor(np.asarray(getattr(ds, "targets", getattr(ds, "labels", None))))
        if name in ("cifar10", "cifar100"):
            data = data.permute(0, 3, 1, 2)
        out += [_to_nchw(data).float() / 255.0, labels.long()]
    return out[0], out[1], out[2], out[3]


def _image_folder(data_dir: Path, input_shape: tuple[int, ...] | None) -> tuple[torch.Tensor, ...]:
    import torchvision.datasets as tvd
    import torchvision.transforms.functional as TF

    test_dir = next((data_dir / d for d in ("test", "val") if (data_dir / d).is_dir()), None)
    if not (data_dir / "train").is_dir() or test_dir is None:
        raise DataError(f"'{data_dir}' is not an ImageFolder tree", f"expected layout: {EXPECTED_LAYOUT['imagefolder']}")
    image_folder_classes(data_dir / "train", test_dir)  # before torchvision, which fails obscurely
    size = tuple(input_shape[1:]) if input_shape else None
    tensors: list[torch.Tensor] = []
    for folder in (data_dir / "train", test_dir):
        ds = tvd.ImageFolder(str(folder))
        if len(ds) == 0:
            raise DataError(f"'{folder}' holds no images", "put images in one subfolder per class")
        xs = []
        for image in decoded_images(ds, folder):
            t = TF.to_tensor(image)
            xs.append(F.interpolate(t[None], size=size, mode="bilinear", antialias=True)[0] if size else t)
        if len({tuple(x.shape) for x in xs}) > 1:
            raise DataError(f"images in '{folder}' differ in size", "give the model's input size so they can be resized")
        tensors += [torch.stack(xs), torch.tensor(ds.targets)]
    return tuple(tensors)


def _npz(
    path: Path, layout: str = "auto", pixel_max: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Arrays ``x``, ``y`` (and optionally ``x_test``, ``y_test``); pixels are divided by
    ``pixel_max`` (default: 255 for uint8 arrays, 1 for floats, which must then lie in [0, 1])."""
    if not path.is_file():
        raise DataError(f"data file '{path}' does not exist", "give a .npz with arrays x and y")
    content = read_npz(path)
    validate_npz(content, path)  # x/y rank, dtype, labels and lengths (odekit.io.validation)

    def images(a: np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(a)
        scale = pixel_max if pixel_max is not None else (255.0 if a.dtype == np.uint8 else 1.0)
        t = t.float() / scale
        return _to_nchw(t, layout) if t.ndim >= 3 else t

    x, y = images(content["x"]), torch.as_tensor(content["y"]).long().reshape(-1)
    if x.shape[0] != y.shape[0]:
        raise DataError(f"'{path}': x has {x.shape[0]} samples but y has {y.shape[0]}", "x and y must have one label per sample")
    if "x_test" in content and "y_test" in content:
        return x, y, images(content["x_test"]), torch.as_tensor(content["y_test"]).long().reshape(-1)
    if len(y) < 2:
        raise DataError(f"'{path}' holds {len(y)} sample(s); a train/test split needs at least 2", "add samples or give x_test/y_test")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train, test = order[: int(0.8 * len(y))], order[int(0.8 * len(y)) :]
    return x[train], y[train], x[test], y[test]


def load_dataset(
    name: str = "digits",
    *,
    data_dir: str | Path | None = None,
    input_shape: tuple[int, ...] | list[int] | None = None,
    normalization: dict[str, list[float]] | None = None,
    layout: str = "auto",
    pixel_max: float | None = None,
) -> Dataset:
    """Load a data set by name, or a ``.npz`` file by path.

    ``input_shape`` (C,H,W) resizes and converts channels to what a model expects;
    ``normalization`` reuses recorded statistics (else they come from the training split).
    ``layout`` (auto | nchw | nhwc) and ``pixel_max`` say how to read ``.npz`` image arrays.
    """
    shape = tuple(input_shape) if input_shape is not None else None
    key = name.strip().lower().replace("_", "-")
    if key.endswith(".npz"):
        xtr, ytr, xte, yte = _npz(Path(name), layout, pixel_max)
        return _finish(Path(name).stem, xtr, ytr, xte, yte, shape, normalization, {"source": str(name)})
    if key == "digits":
        return _digits(shape, normalization)
    if key in ("cifar10", "cifar100", "mnist", "fashion-mnist", "fashionmnist", "svhn"):
        key = "fashion-mnist" if key == "fashionmnist" else key
        folder = _require_dir(key, data_dir)
        xtr, ytr, xte, yte = _torchvision(key, folder)
        return _finish(key, xtr, ytr, xte, yte, shape, normalization, {"source": f"torchvision {key} (local)"})
    if key == "imagefolder":
        folder = _require_dir(key, data_dir)
        xtr, ytr, xte, yte = _image_folder(folder, shape)
        k = int(max(ytr.max(), yte.max())) + 1
        return _finish(folder.name, xtr, ytr, xte, yte, shape, normalization, {"source": f"ImageFolder {folder.name}", "classes": k}, k)
    if key in REGRESSION_DATASETS:  # issue 14: regression data live in odekit.io.cdr
        raise UsageError(f"'{name}' is a regression data set (float targets), not a classification one",
                         "use odekit train-ode `task` regress `data` cdr")  # fmt: skip
    raise UsageError(f"unknown data set '{name}'", f"choose one of {', '.join(DATASET_NAMES)} or give a path to a .npz file")


def dataset_for_model(
    meta_input_shape: tuple[int, ...] | list[int] | None,
    meta_normalization: dict[str, list[float]] | None,
    meta_dataset: dict[str, Any] | None,
    data: str | None = None,
    data_dir: str | Path | None = None,
    layout: str = "auto",
    pixel_max: float | None = None,
) -> Dataset:
    """The data a checkpoint expects: its recorded data set unless ``data`` overrides it."""
    recorded = meta_dataset or {}
    # An .npz is recorded by its file stem; its path is in "source".
    recorded_npz = recorded.get("source") if str(recorded.get("source", "")).endswith(".npz") else None
    name = data or recorded_npz or recorded.get("name") or "digits"
    return load_dataset(
        name, data_dir=data_dir, input_shape=meta_input_shape, normalization=meta_normalization,
        layout=layout, pixel_max=pixel_max,
    )
