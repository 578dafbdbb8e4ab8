"""ONNX students of the foreign zoo: `reduce --export onnx` on each model's torch.export archive
writes student.onnx, which matches PyTorch in onnxruntime within 1e-4 of the logits' scale, and
`odekit export` does the same for the teacher."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from odekit.cli.app import app

pytest.importorskip("onnxruntime")

# (layers, rank): a VGG-19 range as the benchmark reduces it, a whole ResNet-18 block, both MLP layers
CASES = {"vgg": ("7-16", "16"), "resnet18": ("19-20", "32"), "mlp": ("1-2", "8")}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg", "resnet18", "mlp"])
def test_student_and_teacher_export_to_onnx_and_match(foreign, name, tmp_path) -> None:
    import onnxruntime

    model = foreign(name)
    runner = CliRunner()
    out = tmp_path / "ron"
    args = ["reduce", *model.args("export"), *model.data_args(), "--layers", CASES[name][0], "--rank", CASES[name][1],
            "--fit-samples", "300", "--latency-batch", "32", "--export", "onnx", "--out", str(out), "--json"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    onnx = json.loads(result.stdout)["results"]["onnx"]
    assert onnx["check"]["relative_diff"] <= 1e-4 and onnx["check"]["matches"]
    assert {"pytorch/student", "onnxruntime/student", "pytorch/teacher"} <= set(onnx["latency"]["median_ms_per_batch"])
    session = onnxruntime.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # the batch dimension is dynamic
        x = torch.rand(batch, *model.input_shape).numpy()
        assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (batch, 10)
    teacher = runner.invoke(app, ["export", *model.args("export"), *model.data_args(), "--latency-batch", "16",
                                  "--out", str(tmp_path / "teacher"), "--json"])  # fmt: skip
    assert teacher.exit_code == 0, teacher.output
    assert json.loads(teacher.stdout)["results"]["onnx"]["check"]["matches"]
