"""ONNX deployment: a compressed in-memory model exports with a dynamic batch dimension and
matches PyTorch in onnxruntime; a model with an op ONNX lacks gets one line naming it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import odekit
from odekit.errors import UnsupportedModelError

ort = pytest.importorskip("onnxruntime")


@pytest.mark.slow  # two exports (teacher and student): ~10 s; test_api_cli_parity checks one in the default suite
def test_reduce_export_onnx_matches_pytorch(digits_mlp, digits_tensors, tmp_path):
    result = odekit.reduce(digits_mlp, digits_tensors, layers="1-2", rank=12, latency_batch=32, export="onnx")
    onnx = result.to_dict()["onnx"]
    assert onnx["check"]["relative_diff"] <= 1e-4 and onnx["check"]["matches"]
    medians = onnx["latency"]["median_ms_per_batch"]
    assert set(medians) == {"pytorch/teacher", "pytorch/student", "onnxruntime/teacher", "onnxruntime/student"}
    assert onnx["latency"]["speedup_onnxruntime"] > 0
    saved = json.loads(result.save(tmp_path / "r").read_text())
    assert "student.onnx" in saved["outputs"]
    session = ort.InferenceSession(str(tmp_path / "r" / "student.onnx"), providers=["CPUExecutionProvider"])
    x = digits_tensors[0][:3]
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert result.student is not None
    assert torch.allclose(got, result.student(x), atol=1e-4)


class Bessel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.special.bessel_j0(x.flatten(1)))


def test_unexportable_op_is_named_in_one_line(digits_tensors):
    with pytest.raises(UnsupportedModelError) as caught:
        odekit.export_onnx(Bessel(), digits_tensors)
    line = str(caught.value)
    assert "bessel_j0" in line and "\n" not in line
