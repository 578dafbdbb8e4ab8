"""Issue 17: one validation layer for inputs (metadata, .npz, ImageFolder, options) and integrity."""

from __future__ import annotations

import contextlib
import io
import json
import resource
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.torch import load_file, save_file

from odekit.cli.runner import check_option_values
from odekit.errors import CheckpointError, DataError, IntegrityError, OdekitError, UsageError
from odekit.io.checkpoints import ModelMeta, load_model, save_model, save_state_dict_pt
from odekit.io.datasets import load_dataset
from odekit.io.integrity import DIGEST_KEY
from odekit.io.validation import check_classes_match, read_npz
from odekit.linalg.rank import parse_rank_spec

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
RSS_BOUND_MB = 300  # a fuzz run may not grow the process by more than this


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture
def lenet(checkpoints_dir: Path) -> Path:
    return checkpoints_dir / "lenet300_digits.safetensors"


def with_meta(src: Path, dst: Path, meta: object) -> Path:
    save_file(load_file(str(src)), str(dst), metadata={"odekit": json.dumps(meta)})
    return dst


def good_meta(src: Path) -> dict:
    return json.loads(ModelMeta.to_json(load_model(src).meta))


@pytest.mark.parametrize(
    ("field", "value", "text"),
    [
        ("input_shape", "1,28,28", "input_shape"),
        ("input_shape", [1, 28.5, 28], "input_shape"),
        ("input_shape", [1, 100000, 100000], "out of bounds"),
        ("normalization", "imagenet", "normalization"),
        ("normalization", {"mean": [0.1], "std": [0.0]}, "positive"),
        ("normalization", {"mean": [0.1, 0.2], "std": [1.0]}, "standard deviations"),
        ("dataset", ["digits"], "dataset"),
        ("num_classes", 10_000_000, "num_classes"),
        ("num_classes", True, "num_classes"),
        ("history", {"a": 1}, "history"),
        ("arch", "", "arch"),
    ],
)
def test_metadata_schema_rejects(lenet: Path, tmp_path: Path, field: str, value: object, text: str) -> None:
    meta = {**good_meta(lenet), field: value}
    with pytest.raises(CheckpointError, match=text):
        load_model(with_meta(lenet, tmp_path / "m.safetensors", meta))


def test_declared_sizes_are_checked_before_allocation(lenet: Path, tmp_path: Path) -> None:
    meta = good_meta(lenet)
    meta["num_classes"] = meta["args"]["num_classes"] = 900_000  # within bounds, but not this file
    before = peak_rss_mb()
    with pytest.raises(CheckpointError, match=r"does not match architecture .*shape mismatch"):
        load_model(with_meta(lenet, tmp_path / "m.safetensors", meta))
    assert peak_rss_mb() - before < 100  # a real build would take ~360 MB for the last layer alone


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(
    ["arch", "args", "num_classes", "input_shape", "normalization", "dataset", "history", "extra", "source_sha256"]
), json_values | st.integers(min_value=1, max_value=10**12).map(lambda n: [1, n, n]), max_size=3))
def test_fuzz_metadata_only_odekit_errors(lenet: Path, tmp_path: Path, changes: dict) -> None:
    before = peak_rss_mb()
    path = with_meta(lenet, tmp_path / "fuzz.safetensors", {**good_meta(lenet), **changes})
    with contextlib.suppress(OdekitError):
        load_model(path)
    assert peak_rss_mb() - before < RSS_BOUND_MB


@FUZZ
@given(text=st.text(max_size=40) | st.binary(max_size=40).map(lambda b: b.decode("latin-1")))
def test_fuzz_metadata_text(text: str) -> None:
    with contextlib.suppress(OdekitError):
        ModelMeta.from_json(text)


# ---------------------------------------------------------------------------------------- .npz


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("arrays", "text"),
    [
        ({"x": np.arange(10.0), "y": np.zeros(10, int)}, "shape"),
        ({"x": np.zeros((10, 1, 2, 2, 2)), "y": np.zeros(10, int)}, "shape"),
        ({"x": np.array(["a"] * 10), "y": np.zeros(10, int)}, "numbers only"),
        ({"x": np.zeros((10, 4)), "y": np.r_[-1, np.zeros(9, int)]}, "negative labels"),
        ({"x": np.zeros((10, 4)), "y": np.r_[np.nan, np.zeros(9)]}, "NaN"),
        ({"x": np.zeros((10, 4)), "y": np.zeros(9, int)}, "9 labels"),
        ({"x": np.zeros((10, 4)), "y": np.zeros(10, int), "x_test": np.zeros((3, 4)), "y_test": np.zeros(2, int)}, "2 labels"),
        ({"x": np.zeros((10, 4)), "y": np.zeros(10, int), "x_test": np.zeros((3, 4))}, "only one of"),
    ],
)
def test_npz_defects(tmp_path: Path, arrays: dict, text: str) -> None:
    with pytest.raises(DataError, match=text):
        load_dataset(str(_npz(tmp_path / "d.npz", **arrays)))


def test_npz_declared_shape_must_match_stored_bytes(tmp_path: Path) -> None:
    """A header that declares a huge array over a few stored bytes is refused before allocation."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.zeros(4, np.float32))
    data = buffer.getvalue().replace(b"(4,)", b"(4000000000,)".ljust(4, b" "))
    header_len = int.from_bytes(data[8:10], "little")
    data = data[:8] + header_len.to_bytes(2, "little") + data[10:]
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as archive:
        archive.writestr("x.npy", data)
    with pytest.raises(DataError):
        read_npz(tmp_path / "bomb.npz")


def test_zero_byte_npz(tmp_path: Path) -> None:
    (tmp_path / "z.npz").write_bytes(b"")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_dataset(str(tmp_path / "z.npz"))


array_dtypes = st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.bool_, np.int8, np.float16])


@FUZZ
@given(
    x=hnp.arrays(array_dtypes, hnp.array_shapes(min_dims=0, max_dims=5, max_side=5)),
    y=hnp.arrays(st.sampled_from([np.int64, np.float64, np.int32]), hnp.array_shapes(min_dims=0, max_dims=2, max_side=6)),
    junk=st.binary(max_size=64) | st.none(),
)
def test_fuzz_npz_only_odekit_errors(tmp_path: Path, x: np.ndarray, y: np.ndarray, junk: bytes | None) -> None:
    path = tmp_path / "f.npz"
    if junk is not None:
        path.write_bytes(junk)
    else:
        np.savez(path, x=x, y=y)
    before = peak_rss_mb()
    try:
        data = load_dataset(str(path))
    except OdekitError:
        return
    finally:
        assert peak_rss_mb() - before < RSS_BOUND_MB
    for split in (data.train, data.test):  # what loads is consistent
        assert split.x.shape[0] == split.y.shape[0]
        assert bool((split.y >= 0).all())
        assert bool((split.y < data.num_classes).all())
        assert bool(torch.isfinite(split.x).all())


# ------------------------------------------------------------------------------------- options


@FUZZ
@given(text=st.text(max_size=30) | st.from_regex(r"(factor|energy):[-+0-9.e]*(nan|inf)?", fullmatch=True) | st.integers().map(str))
def test_fuzz_rank_spec(text: str) -> None:
    try:
        spec = parse_rank_spec(text)
    except UsageError:
        return
    assert spec.value is None or np.isfinite(spec.value)


@FUZZ
@given(value=st.floats() | st.integers())
def test_fuzz_option_values(value: float | int) -> None:
    try:
        check_option_values({"oversample": value})
    except UsageError as exc:
        assert "--oversample" in str(exc) and "Hint:" in str(exc)
        return
    assert np.isfinite(value) and (isinstance(value, float) or abs(value) < 2**63)


# ---------------------------------------------------------------------------------- ImageFolder


def _image_tree(root: Path, classes: dict[str, int]) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
        for name, count in classes.items():
            (root / split / name).mkdir(exist_ok=True)
            for i in range(count):
                Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(root / split / name / f"{i}.png")
    return root


def test_imagefolder_defects(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no class folders"):
        load_dataset("imagefolder", data_dir=_image_tree(tmp_path / "a", {}))
    with pytest.raises(DataError, match="hold no images"):
        load_dataset("imagefolder", data_dir=_image_tree(tmp_path / "b", {"cat": 2, "dog": 0}))
    bad = _image_tree(tmp_path / "c", {"cat": 2, "dog": 2})
    (bad / "test" / "dog" / "1.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="cannot be decoded"):
        load_dataset("imagefolder", data_dir=bad)
    good = load_dataset("imagefolder", data_dir=_image_tree(tmp_path / "d", {"cat": 2, "dog": 2, "eel": 1}))
    assert good.num_classes == 3 and good.source["classes"] == 3
    with pytest.raises(DataError, match="3 class folders, the model predicts 10"):
        check_classes_match(good.num_classes, 2, good.source["classes"], 10, good.name)


# ------------------------------------------------------------------------------------ integrity


def test_pt_with_flipped_bytes_is_refused(lenet: Path, tmp_path: Path) -> None:
    loaded = load_model(lenet)
    path = save_state_dict_pt(tmp_path / "m.pt", loaded.model, loaded.meta)
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    for i in rng.choice(np.arange(len(data) // 4, len(data) // 2), 400, replace=False):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="CRC-32"):
        load_model(path)


def test_odekit_safetensors_carry_a_verified_tensor_hash(lenet: Path, tmp_path: Path) -> None:
    loaded = load_model(lenet)
    path = save_model(tmp_path / "m.safetensors", loaded.model, loaded.meta)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        assert len(handle.metadata()[DIGEST_KEY]) == 64
    assert load_model(path).sha256  # the untouched file loads
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match the hash"):
        load_model(path)


def test_save_model_refuses_nan(lenet: Path, tmp_path: Path) -> None:
    loaded = load_model(lenet)
    with torch.no_grad():
        next(loaded.model.parameters())[0, 0] = float("inf")
    with pytest.raises(OdekitError, match="NaN or infinite"):
        save_model(tmp_path / "m.safetensors", loaded.model, loaded.meta)
    assert not (tmp_path / "m.safetensors").exists()
