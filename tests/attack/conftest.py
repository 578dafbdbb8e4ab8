"""Small models and data for attack tests (CPU, one thread: the machine is shared)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread inside these tests (fastest on a shared CPU); restored afterwards so
    other test folders keep their own setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ROOT = Path(__file__).resolve().parents[2]
CHECKPOINTS = ROOT / "checkpoints"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path.name} is not there yet")
    return path


@pytest.fixture(scope="session")
def lenet300_path() -> Path:
    return _need(CHECKPOINTS / "lenet300_digits.safetensors")


@pytest.fixture(scope="session")
def lenet5_path() -> Path:
    return _need(CHECKPOINTS / "lenet5_digits.safetensors")


@pytest.fixture(scope="session")
def odenet_path() -> Path:
    return _need(CHECKPOINTS / "odenet4_digits_euler.safetensors")


@pytest.fixture(scope="session")
def digits_pixels():
    """8x8 digits in [0, 1] pixels (train x, train y, test x, test y)."""
    from odekit.io.datasets import load_dataset
    from odekit.methods.attacks import to_pixels

    data = load_dataset(
        "digits", input_shape=(1, 8, 8), normalization={"mean": [0.0], "std": [1.0]}
    )
    return to_pixels(data.train.x, data), data.train.y, to_pixels(data.test.x, data), data.test.y


@pytest.fixture(scope="session")
def small_mlp(digits_pixels) -> nn.Module:
    """A small MLP on 8x8 digits pixels, trained for a few seconds (seeded)."""
    x, y, _, _ = digits_pixels
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()
