"""An in-memory model and tensors, as a notebook user holds them."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn


@pytest.fixture(scope="session")
def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (N, 1, 8, 8) pixels in [0, 1] and integer labels."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(digits.target)


@pytest.fixture(scope="session")
def digits_mlp(digits_tensors) -> nn.Module:
    """A small MLP trained on the tensors (seeded, full-batch Adam)."""
    x, y = digits_tensors
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()
