"""How a channel student is written: safetensors + metadata (and the .pt2) for a registered
teacher, rebuilt by narrowing the registered architecture; the .pt2 alone otherwise."""

from __future__ import annotations

import json

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import odekit
from odekit.io.checkpoints import load_model, save_model
from odekit.io.model_meta import ModelMeta
from odekit.io.user_arch import StateDictMismatchError
from odekit.methods.evaluation import model_cost
from odekit.models.narrow import CHANNEL_ARCH, narrow_modules, narrow_to_state_dict
from odekit.models.registry import build_model

RESNET_ARGS = {"num_classes": 10, "in_channels": 1}


class Widths(nn.Module):
    """A conv, a depthwise conv, BatchNorms (one without affine), a linear: widths c and h."""

    def __init__(self, c: int = 12, h: int = 20) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn_plain = nn.BatchNorm2d(c, affine=False)
        self.pw = nn.Conv1d(c, 6, 1)
        self.fc1 = nn.Linear(6 * 16, h)
        self.fc2 = nn.Linear(h, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_plain(self.dw(torch.relu(self.bn(self.conv(x))))))
        x = self.pw(x.flatten(2)).reshape(x.shape[0], 6, 4, 4)
        x = nn.functional.max_pool2d(x, 1).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def _randomised(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_narrow_to_state_dict_conv_depthwise_linear_batchnorm() -> None:
    torch.manual_seed(0)
    small = _randomised(Widths(c=5, h=7))
    big = Widths().eval()
    shapes = narrow_to_state_dict(big, small.state_dict())
    assert shapes == {"conv": [5, 3, 3, 3], "bn": [5], "dw": [5, 1, 3, 3], "bn_plain": [5], "pw": [6, 5, 1],
                      "fc1": [7, 96], "fc2": [4, 7]}  # fmt: skip
    big.load_state_dict(small.state_dict(), strict=True)
    assert (big.conv.out_channels, big.bn.num_features, big.bn_plain.num_features) == (5, 5, 5)
    assert big.dw.in_channels == big.dw.out_channels == big.dw.groups == 5
    assert (big.pw.in_channels, big.fc1.out_features, big.fc2.in_features) == (5, 7, 7)
    x = torch.randn(3, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(big(x), small(x))
    assert all(p.requires_grad for p in big.parameters())
    assert {n for n, _ in big.named_buffers()} == {n for n, _ in small.named_buffers()}


def test_narrowing_refuses_growth_grouped_convs_and_other_layers() -> None:
    with pytest.raises(ValueError, match="cannot be narrowed"):
        narrow_modules(Widths(c=5), {"conv": [6, 3, 3, 3]})
    grouped = nn.Sequential(nn.Conv2d(8, 8, 3, groups=2))
    with pytest.raises(ValueError, match="depthwise"):
        narrow_modules(grouped, {"0": [4, 4, 3, 3]})
    with pytest.raises(ValueError, match="only convs"):
        narrow_modules(nn.Sequential(nn.LayerNorm(8)), {"0": [4]})
    with pytest.raises(ValueError, match="no layer"):
        narrow_modules(Widths(), {"nowhere": [1]})


def _narrowed_resnet() -> nn.Module:
    model = build_model("resnet20", RESNET_ARGS)
    narrow_modules(model, {"layers.0.conv1": [9, 16, 3, 3], "layers.0.bn1": [9], "layers.0.conv2": [16, 9, 3, 3]})
    return model.eval()


def test_mismatched_weights_without_the_channel_mark_are_refused(tmp_path) -> None:
    model = _narrowed_resnet()
    plain = tmp_path / "plain.safetensors"
    save_model(plain, model, ModelMeta(arch="resnet20", args=RESNET_ARGS, input_shape=[1, 32, 32]))
    with pytest.raises(StateDictMismatchError, match="does not match architecture 'resnet20'"):
        load_model(plain)
    shapes = narrow_to_state_dict(build_model("resnet20", RESNET_ARGS), model.state_dict())
    marked = tmp_path / "marked.safetensors"
    args = {"arch": "resnet20", "args": RESNET_ARGS, "shapes": shapes}
    save_model(marked, model, ModelMeta(arch=CHANNEL_ARCH, args=args, input_shape=[1, 32, 32]))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_model(marked).model(x), model(x))
    wrong = tmp_path / "wrong.safetensors"  # the mark's shapes must be the file's shapes too
    args = {**args, "shapes": {**shapes, "layers.0.bn1": [8]}}
    save_model(wrong, model, ModelMeta(arch=CHANNEL_ARCH, args=args, input_shape=[1, 32, 32]))
    with pytest.raises(StateDictMismatchError, match="does not match architecture 'channel_student'"):
        load_model(wrong)


def _digits(n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.images[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(digits.target[:n])


def test_registered_teacher_writes_safetensors_and_program(tmp_path) -> None:
    """A quarter-width ResNet-20 on 8x8 digits (untrained: the mechanics), as a checkpoint on disk."""
    torch.manual_seed(0)
    args = {**RESNET_ARGS, "width": 0.25}
    teacher = _randomised(build_model("resnet20", args))
    save_model(tmp_path / "teacher.safetensors", teacher, ModelMeta(arch="resnet20", args=args, num_classes=10, input_shape=[1, 8, 8]))
    result = odekit.reduce(tmp_path / "teacher.safetensors", _digits(), mode="channel", target_flops=0.5, fit_samples=64,
                           latency_batch=8, device="cpu")  # fmt: skip
    assert result.registered and result.meta is not None and result.meta.arch == CHANNEL_ARCH
    report = json.loads(result.save(tmp_path / "run").read_text())
    r, folder = report["results"], tmp_path / "run"
    assert r["student_checkpoint"].endswith("student.safetensors") and r["student_program"].endswith("student.pt2")
    assert {"student.safetensors", "student.pt2"} <= set(report["outputs"])
    assert r["reload_max_abs_diff"] < 1e-5 and r["program_reload_max_abs_diff"] < 1e-5
    loaded = odekit.load(folder / "student.safetensors")
    assert type(loaded).__name__ == "CifarResNet"
    cost = model_cost(loaded, (1, 8, 8))
    assert (cost.flops, cost.params) == (r["student"]["flops"], r["student"]["params"])
    assert cost.flops <= 0.5 * r["teacher"]["flops"] and any(m.num_features < 4 for m in loaded.modules() if isinstance(m, nn.BatchNorm2d))
    x = result.probe
    assert x is not None and result.student is not None
    program = torch.export.load(str(folder / "student.pt2")).module()
    with torch.no_grad():
        expected = result.student(x)
        assert float((loaded(x) - expected).abs().max()) < 1e-5
        assert float((program(x) - expected).abs().max()) < 1e-5
    meta = load_model(folder / "student.safetensors").meta
    assert meta.args["arch"] == "resnet20" and meta.history[-1]["mode"] == "channel"
    assert meta.extra["groups"] == r["groups"]


def test_unregistered_teacher_writes_the_program_only(tmp_path) -> None:
    x, y = _digits()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10)).eval()  # fmt: skip
    program = torch.export.export(net, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    torch.export.save(program, tmp_path / "teacher.pt2")
    result = odekit.reduce(tmp_path / "teacher.pt2", (x, y), mode="channel", target_flops=0.5, fit_samples=64,
                           latency_batch=8, device="cpu")  # fmt: skip
    assert not result.registered
    report = json.loads(result.save(tmp_path / "run").read_text())
    assert report["results"]["student_checkpoint"].endswith("student.pt2")
    assert "student_program" not in report["results"]
    assert not (tmp_path / "run" / "student.safetensors").exists()
    assert model_cost(odekit.load(tmp_path / "run" / "student.pt2"), (1, 8, 8)).flops == report["results"]["student"]["flops"]


def test_channel_student_of_a_channel_student_narrows_the_first_teacher(tmp_path) -> None:
    """Reducing a channel student again records the shipped teacher's architecture, and a region
    student of a channel student rebuilds its (narrowed) teacher parts."""
    settings = {"fit_samples": 128, "latency_batch": 8, "device": "cpu"}
    first = odekit.reduce("checkpoints/lenet5_digits.safetensors", mode="channel", target_flops=0.7, **settings)
    first.save(tmp_path / "a")
    second = odekit.reduce(tmp_path / "a" / "student.safetensors", mode="channel", target_flops=0.7, **settings)
    assert second.registered and second.meta is not None and second.meta.args["arch"] == "lenet5"
    report = json.loads(second.save(tmp_path / "b").read_text())["results"]
    loaded = load_model(tmp_path / "b" / "student.safetensors")
    assert loaded.meta.arch == CHANNEL_ARCH and len(loaded.meta.history) == 3
    assert model_cost(loaded.model, (1, 28, 28)).flops == report["student"]["flops"]
    region = odekit.reduce(tmp_path / "a" / "student.safetensors", layers="3-5", rank=8, mode="region", **settings)
    assert region.registered
    assert json.loads(region.save(tmp_path / "c").read_text())["results"]["reload_max_abs_diff"] < 1e-5
