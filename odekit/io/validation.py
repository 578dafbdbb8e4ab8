"""Validation of data sets read from user files: .npz arrays, ImageFolder trees, labels.

Everything here raises `DataError` with a hint; nothing is allocated from sizes a file declares
before those sizes are checked against the bytes the file really holds.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from odekit.errors import DataError

NPZ_HINT = "write it with numpy.savez(path, x=..., y=...): x numeric (N,D), (N,H,W) or (N,H,W,C)/(N,C,H,W); y integer labels"
IMAGE_RANKS = (2, 3, 4)  # (N,D), (N,H,W), (N,H,W,C) or (N,C,H,W)
MAX_LABEL = 1 << 31
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Arrays of a .npz file, each declared size checked against the stored bytes first."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise DataError(f"'{path}' is not a readable .npz file ({exc})", NPZ_HINT) from exc
    content: dict[str, np.ndarray] = {}
    with archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[: -len(".npy")]
            try:
                with archive.open(info) as member:
                    content[name] = _read_member(member, info, name, path)
            except DataError:
                raise
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, NotImplementedError) as exc:
                raise DataError(f"'{path}': array '{name}' cannot be read ({exc})", NPZ_HINT) from exc
    return content


def _read_member(member: Any, info: zipfile.ZipInfo, name: str, path: Path) -> np.ndarray:
    fmt = np.lib.format
    version = fmt.read_magic(member)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(member)
    else:
        shape, fortran, dtype = fmt.read_array_header_2_0(member)
    if dtype.kind not in "biuf" or dtype.hasobject:
        raise DataError(f"'{path}': array '{name}' has dtype {dtype}, odekit reads numbers only", NPZ_HINT)
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    header_bytes = member.tell()
    if declared != info.file_size - header_bytes:
        raise DataError(
            f"'{path}': array '{name}' declares shape {shape} ({declared} bytes) but stores {info.file_size - header_bytes}",
            "the file is truncated or corrupted; write it again",
        )
    data = member.read(declared)
    array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return array.copy()


def validate_npz(content: dict[str, np.ndarray], path: Path) -> None:
    """x/y (and x_test/y_test) present, numeric, of a supported rank, with matching lengths."""
    if "x" not in content or "y" not in content:
        raise DataError(f"'{path}' lacks arrays 'x' and 'y' (found {sorted(content)})", NPZ_HINT)
    if ("x_test" in content) != ("y_test" in content):
        raise DataError(f"'{path}' has only one of 'x_test' and 'y_test'", "give both or neither")
    for x_key, y_key in (("x", "y"), ("x_test", "y_test")):
        if x_key not in content:
            continue
        x, y = content[x_key], content[y_key]
        if x.ndim not in IMAGE_RANKS or 0 in x.shape:
            raise DataError(
                f"'{path}': '{x_key}' has shape {x.shape}; expected (N,D), (N,H,W), (N,H,W,C) or (N,C,H,W) with N, D > 0",
                NPZ_HINT,
            )
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise DataError(f"'{path}': '{x_key}' holds NaN or infinite values", "clean the data before using it")
        content[y_key] = labels_array(y, f"'{path}': '{y_key}'")
        if content[y_key].shape[0] != x.shape[0]:
            raise DataError(
                f"'{path}': '{x_key}' has {x.shape[0]} samples but '{y_key}' has {content[y_key].shape[0]} labels",
                "give one label per sample",
            )


def labels_array(y: np.ndarray, what: str) -> np.ndarray:
    """Labels as int64: integers (or integral floats) in [0, 2**31), one per sample."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{what} has shape {y.shape}; labels must be one integer per sample", "give y of shape (N,)")
    if y.dtype.kind not in "iuf":
        raise DataError(f"{what} must hold integer class labels, not {y.dtype}", "give labels 0..K-1 as integers")
    if y.dtype.kind == "f" and not (np.isfinite(y) & (y == np.round(y))).all():
        raise DataError(f"{what} holds NaN, infinite or fractional labels", "give labels 0..K-1 as integers")
    if y.size and y.min() < 0:
        raise DataError(f"{what} holds negative labels (min {y.min():g})", "labels must be class indices 0..K-1")
    if y.size and y.max() >= MAX_LABEL:
        raise DataError(f"{what} holds labels up to {y.max():g}, beyond any class count", "labels must be class indices 0..K-1")
    return y.astype(np.int64)


def image_folder_classes(train_dir: Path, test_dir: Path) -> list[str]:
    """Class names of an ImageFolder tree: the same non-empty class folders in train and test."""
    found: list[list[str]] = []
    for folder in (train_dir, test_dir):
        classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
        if not classes:
            raise DataError(f"'{folder}' has no class folders", "put images in one subfolder per class")
        empty = [c for c in classes if not any(_is_image(p) for p in (folder / c).rglob("*"))]
        if empty:
            raise DataError(f"class folder(s) {', '.join(empty[:5])} in '{folder}' hold no images", "remove them or add images")
        found.append(classes)
    if found[0] != found[1]:
        raise DataError(
            f"'{train_dir}' and '{test_dir}' have different classes ({len(found[0])} vs {len(found[1])})",
            "both splits need the same class folders, in the same order",
        )
    return found[0]


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def decoded_images(dataset: Any, folder: Path) -> Iterator[Any]:
    """The images of a torchvision ImageFolder; an unreadable file becomes a `DataError` naming it."""
    for index in range(len(dataset)):
        try:
            image, _ = dataset[index]
        except (OSError, ValueError, SyntaxError) as exc:  # PIL raises all three for damaged files
            raise DataError(
                f"image '{dataset.samples[index][0]}' in '{folder}' cannot be decoded ({exc})",
                "remove or replace the damaged file",
            ) from exc
        yield image


def check_classes_match(dataset_classes: int, labels_max: int, declared: int | None, model_classes: int | None, name: str) -> None:
    """The data's classes fit the model: labels below its class count, folder counts equal to it."""
    if model_classes is None:
        return
    if labels_max >= model_classes:
        raise DataError(
            f"data set '{name}' has {dataset_classes} classes, the model predicts {model_classes}",
            "choose the data set the model was trained on",
        )
    if declared is not None and declared != model_classes:
        raise DataError(
            f"data set '{name}' has {declared} class folders, the model predicts {model_classes} classes",
            "an ImageFolder tree needs exactly one folder per model class, in the training order",
        )
