"""`.pt2` archives: exact round trip, any batch size, metadata carried."""

from __future__ import annotations

import zipfile

import pytest
import torch
from torch import nn

from odekit.errors import UnsupportedModelError
from odekit.io.exported import is_export_archive, load_exported, save_exported


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)
    ).eval()


def test_round_trip_exact_for_every_batch_size(tmp_path):
    model = _cnn()
    path = save_exported(tmp_path / "m.pt2", model, (3, 8, 8), '{"arch": "x"}')
    assert is_export_archive(zipfile.ZipFile(path).namelist())
    loaded, meta = load_exported(path)
    assert meta == '{"arch": "x"}'
    for batch in (1, 2, 7):
        x = torch.randn(batch, 3, 8, 8)
        assert torch.equal(loaded(x), model(x))


class _DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_data_dependent_control_flow_is_one_clear_error(tmp_path):
    with pytest.raises(UnsupportedModelError, match=r"torch\.export could not trace"):
        save_exported(tmp_path / "m.pt2", _DataDependent(), (4,), None)
    assert not (tmp_path / "m.pt2").exists()
