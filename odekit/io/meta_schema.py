"""The schema of odekit checkpoint metadata: types and bounds, checked before anything is built.

Metadata comes from a file, so nothing in it is trusted: every field is type- and range-checked
here, and `check_against_tensors` builds the declared architecture on the ``meta`` device (no
memory) and compares its tensor shapes with the tensors the file really holds, so a small file
cannot make odekit allocate a huge model.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from odekit.errors import CheckpointError, OdekitError

MAX_CLASSES = 1_000_000
MAX_INPUT_DIMS = 4
MAX_INPUT_SIDE = 1 << 16
MAX_INPUT_ELEMENTS = 1 << 24  # per sample: 3 x 2048 x 2048 fits
MAX_ARCH_CHARS = 200
HINT = "the metadata was edited or not written by odekit; fix it, or drop it and pass `arch`/`num_classes`"


def _fail(field: str, problem: str) -> CheckpointError:
    return CheckpointError(f"checkpoint metadata field '{field}' {problem}", HINT)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def validate_meta_fields(raw: Any) -> dict[str, Any]:
    """The known fields of parsed metadata JSON, each checked; raises `CheckpointError`."""
    if not isinstance(raw, dict):
        raise _fail("(top level)", f"must be a JSON object, got {type(raw).__name__}")
    arch = raw.get("arch")
    if not isinstance(arch, str) or not arch.strip() or len(arch) > MAX_ARCH_CHARS:
        raise _fail("arch", f"must be a non-empty name of at most {MAX_ARCH_CHARS} characters")
    for key in ("args", "dataset", "extra"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise _fail(key, f"must be a JSON object, got {type(raw[key]).__name__}")
    dataset_name = (raw.get("dataset") or {}).get("name")
    if dataset_name is not None and not isinstance(dataset_name, str):
        raise _fail("dataset.name", "must be a string")
    history = raw.get("history")
    if history is not None and not (isinstance(history, list) and all(isinstance(h, dict) for h in history)):
        raise _fail("history", "must be a list of JSON objects")
    for key in ("source_sha256", "odekit_version"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise _fail(key, "must be a string")
    num_classes = raw.get("num_classes")
    if num_classes is not None and not (_is_int(num_classes) and 1 <= num_classes <= MAX_CLASSES):
        raise _fail("num_classes", f"must be an integer in [1, {MAX_CLASSES}], got {num_classes!r:.40}")
    args_classes = (raw.get("args") or {}).get("num_classes")
    if args_classes is not None and not (_is_int(args_classes) and 1 <= args_classes <= MAX_CLASSES):
        raise _fail("args.num_classes", f"must be an integer in [1, {MAX_CLASSES}], got {args_classes!r:.40}")
    shape = raw.get("input_shape")
    if shape is not None:
        _check_shape(shape)
    if raw.get("normalization") is not None:
        _check_normalization(raw["normalization"], shape)
    return raw


def _check_shape(shape: Any) -> None:
    if not (isinstance(shape, list) and 1 <= len(shape) <= MAX_INPUT_DIMS and all(_is_int(s) for s in shape)):
        raise _fail("input_shape", f"must be a list of 1 to {MAX_INPUT_DIMS} integers, got {shape!r:.60}")
    if any(not 1 <= s <= MAX_INPUT_SIDE for s in shape) or math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise _fail(
            "input_shape", f"{shape} is out of bounds (each size in [1, {MAX_INPUT_SIDE}], at most {MAX_INPUT_ELEMENTS} values)"
        )


def _check_normalization(norm: Any, shape: Any) -> None:
    if not isinstance(norm, dict):
        raise _fail("normalization", f"must be an object with lists 'mean' and 'std', got {type(norm).__name__}")
    mean, std = norm.get("mean"), norm.get("std")
    for key, values in (("mean", mean), ("std", std)):
        if not (isinstance(values, list) and 1 <= len(values) <= MAX_INPUT_SIDE and all(_is_number(v) for v in values)):
            raise _fail(f"normalization.{key}", "must be a non-empty list of finite numbers")
    assert isinstance(mean, list) and isinstance(std, list)
    if len(mean) != len(std):
        raise _fail("normalization", f"has {len(mean)} means but {len(std)} standard deviations")
    if any(s <= 0 for s in std):
        raise _fail("normalization.std", "must be positive")
    channels = shape[0] if isinstance(shape, list) and len(shape) == 3 else None
    if len(mean) > 1 and channels is not None and len(mean) != channels:
        raise _fail("normalization", f"has {len(mean)} channels, input_shape {shape} has {channels}")


def check_against_tensors(arch: str, args: dict[str, Any], state: dict[str, torch.Tensor], path: Any) -> None:
    """Build ``arch`` on the meta device (no memory) and compare its tensor shapes with ``state``."""
    from odekit.models.registry import build_model

    try:
        with torch.device("meta"):
            model = build_model(arch, args)
    except OdekitError:
        raise
    except Exception:  # a builder that cannot run on the meta device: the real build checks instead
        return
    declared = model.state_dict()
    from odekit.io.user_arch import check_state_dict

    check_state_dict(declared, state, path, arch)  # shapes only: meta tensors hold no memory
