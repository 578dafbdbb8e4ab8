"""Models odekit did not build: every save format loads, runs and reports what it assumed.

The issue's failure modes are replayed here: a pickle whose module sits next to it, a state dict
for a class of the user's, TorchScript, .pt2, attack without --data, an --arch that does not fit.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from foreign_models import FORMATS, USER_MODULE, ForeignModel
from typer.testing import CliRunner

from odekit.cli.app import app
from odekit.errors import CheckpointError
from odekit.io.checkpoints import load_model
from odekit.io.user_arch import parse_arch_args


def _load(model: ForeignModel, fmt: str):
    kwargs: dict = {}
    if fmt == "pickle":
        kwargs["trust_checkpoint"] = True
    if fmt == "state":
        kwargs.update(arch=model.arch_spec, arch_args=model.arch_args)
    return load_model(model.files[fmt], **kwargs)


def _reference_logits(model: ForeignModel, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _load(model, "state").model(x)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_loads_with_identical_logits(foreign_vgg, foreign_mlp, fmt):
    for model in (foreign_vgg, foreign_mlp):
        x = torch.rand(3, *model.input_shape)
        loaded = _load(model, fmt)
        with torch.no_grad():
            diff = (loaded.model(x) - _reference_logits(model, x)).abs().max()
        assert float(diff) < 1e-5, (model.name, fmt)
        expected_arch = {
            "pickle": f"pickled:{type(_load(model, 'state').model).__name__}",
            "state": f"user:{model.arch_spec}",
            "torchscript": "torchscript",
            "export": "export",
        }[fmt]
        assert (loaded.format, loaded.meta.arch) == (
            {"state": "pickle"}.get(fmt, fmt),
            expected_arch,
        )
    # a .pt2 archive knows its input shape without any option
    assert _load(foreign_vgg, "export").meta.input_shape == [3, 32, 32]


@pytest.mark.parametrize("fmt", ["pickle", "torchscript", "export"])
def test_arch_is_honoured_for_whole_module_formats(foreign_vgg, fmt):
    """--arch on a pickle/TorchScript/.pt2 rebuilds the user's class and loads the weights into it."""
    kwargs = {"trust_checkpoint": fmt == "pickle"}
    loaded = load_model(foreign_vgg.files[fmt], arch=foreign_vgg.arch_spec, arch_args=foreign_vgg.arch_args, **kwargs)
    assert type(loaded.model).__name__ == "KuangliuVGG" and loaded.meta.arch.startswith("user:")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert float((loaded.model(x) - _reference_logits(foreign_vgg, x)).abs().max()) < 1e-5


def test_wrong_arch_lists_keys_one_line_each_capped(foreign_vgg):
    with pytest.raises(CheckpointError) as info:
        load_model(foreign_vgg.files["state"], arch="vgg19_bn", num_classes=10)
    lines = str(info.value).splitlines()
    assert "2 missing" in lines[0] and "18 unexpected" in lines[0] and "Hint:" in lines[0]
    assert lines[1] == "  missing in checkpoint: classifier.1.weight (10x512)"
    assert "  unexpected in checkpoint: features.0.bias (4)" in lines
    assert len(lines) == 1 + 10 + 1 and lines[-1].startswith("  ... and ") and lines[-1].endswith(" more")


def test_arch_args_must_be_a_json_object():
    assert parse_arch_args('{"width_div": 16}') == {"width_div": 16}
    for bad in ("{width: 1}", "[1, 2]"):
        with pytest.raises(Exception, match="`arch_args`"):
            parse_arch_args(bad)


def _one_error_line(result) -> str:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_pickle_finds_its_module_next_to_the_checkpoint(foreign_vgg, tmp_path, monkeypatch):
    """The user's module sits in the checkpoint's folder: no PYTHONPATH needed. Moved away, the
    error names PYTHONPATH and --arch FILE.py:Name, and that --arch then works."""
    runner = CliRunner()
    ok = runner.invoke(app, ["info", *foreign_vgg.args("pickle"), "--input-shape", "3,32,32", "--json"])
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.stdout)["arch"] == "pickled:KuangliuVGG"

    alone = tmp_path / "vgg.pt"
    alone.write_bytes(foreign_vgg.files["pickle"].read_bytes())
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, USER_MODULE, raising=False)  # imported by earlier tests in this process
    line = _one_error_line(runner.invoke(app, ["info", str(alone), "--trust-checkpoint", "--input-shape", "3,32,32"]))
    assert "user_models" in line and "PYTHONPATH" in line and "--arch path/to/user_models.py:ClassName" in line

    rescued = runner.invoke(app, ["info", str(alone), "--trust-checkpoint", "--input-shape", "3,32,32", "--json",
                                  "--arch", foreign_vgg.arch_spec, "--arch-args", json.dumps(foreign_vgg.arch_args)])  # fmt: skip
    assert rescued.exit_code == 0, rescued.stderr
    assert json.loads(rescued.stdout)["arch"] == f"user:{foreign_vgg.arch_spec}"


def test_info_on_a_state_dict_with_the_users_class(foreign_vgg):
    result = CliRunner().invoke(app, ["info", *foreign_vgg.args("state"), "--input-shape", "3,32,32", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    reference = _load(foreign_vgg, "state").model
    assert report["params"] == sum(p.numel() for p in reference.parameters())
    assert len(report["layers"]) == 17  # 16 convs + the classifier


def test_torchscript_cannot_be_reduced_and_says_how_to_export(foreign_mlp, tmp_path):
    result = CliRunner().invoke(app, ["reduce", *foreign_mlp.args("torchscript"), *foreign_mlp.data_args(),
                                      "--layers", "1-2", "-o", str(tmp_path / "r")])  # fmt: skip
    line = _one_error_line(result)
    assert "TorchScript" in line and "torch.export.save(torch.export.export(" in line and "--arch" in line


def test_attack_without_data_asks_for_data_instead_of_falling_back(foreign_vgg, tmp_path):
    for fmt in ("pickle", "export"):
        result = CliRunner().invoke(app, ["attack", *foreign_vgg.args(fmt), "--method", "fgsm", "--eps", "0.1",
                                          "-o", str(tmp_path / fmt)])  # fmt: skip
        line = _one_error_line(result)
        assert "--data" in line and ("3x32x32" in line or "1x8x8" in line)


def _attack(model: ForeignModel, fmt: str, out, *extra: str) -> tuple[dict, str]:
    result = CliRunner().invoke(app, [
        "attack", *model.args(fmt), "--data", str(model.data), "--method", "active-subspace", "--delta", "2",
        "--fit-samples", "60", "--max-iter", "4", "-o", str(out), "--json", *extra,
    ])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout), result.stderr


@pytest.mark.parametrize("fmt", FORMATS)
def test_attack_reports_the_given_normalisation_and_true_accuracy(foreign_mlp, fmt, tmp_path):
    """The MLP was trained on (x - 0.3) / 0.4: with that --normalize the clean accuracy is exactly
    the one measured in plain torch, the attack lowers it within its budget."""
    report, stderr = _attack(foreign_mlp, fmt, tmp_path / "a", "--normalize", foreign_mlp.normalize)
    data = report["inputs"]["data"]
    assert data["normalization"] == {"mean": [0.3], "std": [0.4], "source": "--normalize"}
    assert data["input_shape"] == [64]
    r = report["results"]
    assert r["clean_accuracy"] == pytest.approx(foreign_mlp.accuracy, abs=1e-6)
    assert r["robust_accuracy"] < r["clean_accuracy"] - 0.2
    assert r["norm_pixel"] <= 2.0 + 1e-4
    # the warning names only what was assumed: never the given normalisation, never a .pt2's own shape
    warnings = [line for line in stderr.splitlines() if line.startswith("Warning:")]
    if fmt == "export":
        assert not warnings, stderr
    else:
        assert len(warnings) == 1 and "input shape 64 (assumed: as stored in digits)" in warnings[0]
        assert "normalisation" not in warnings[0] and "pass --input-shape to state it" in warnings[0]


def test_no_metadata_defaults_to_raw_pixels_and_says_so(foreign_vgg, tmp_path):
    report, stderr = _attack(foreign_vgg, "export", tmp_path / "a", "--input-shape", "3,32,32")
    assert report["inputs"]["data"]["normalization"]["mean"] == [0.0, 0.0, 0.0]
    assert report["inputs"]["data"]["normalization"]["source"] == "assumed (no odekit metadata)"
    assert report["results"]["clean_accuracy"] == pytest.approx(foreign_vgg.accuracy, abs=1e-6)
    assert report["results"]["robust_accuracy"] < report["results"]["clean_accuracy"]
    warnings = [line for line in stderr.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1 and "none ([0, 1] pixels as they are) (assumed)" in warnings[0]
    assert "input shape" not in warnings[0] and "pass --normalize to state it" in warnings[0]
    # stated explicitly, nothing is assumed and nothing is said
    _, quiet = _attack(foreign_vgg, "export", tmp_path / "b", "--input-shape", "3,32,32", "--normalize", "none")
    assert not [line for line in quiet.splitlines() if line.startswith("Warning:")]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_resnet18_loads_and_attacks_in_every_format(foreign_resnet, fmt, tmp_path):
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert float((_load(foreign_resnet, fmt).model(x) - _reference_logits(foreign_resnet, x)).abs().max()) < 1e-4
    report, _ = _attack(foreign_resnet, fmt, tmp_path / "a", "--normalize", "none", "--eval-samples", "60")
    assert report["results"]["norm_pixel"] <= 2.0 + 1e-4
    # The ResNet-18 is untrained (chance level), so accuracy may move either way under the
    # perturbation; what must hold is that the perturbation changes predictions.
    assert report["results"]["fooling_rate_test"] > 0.0


def test_torchvision_builder_with_num_classes(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    loaded = load_model(tmp_path / "r18.pth", arch="torchvision:resnet18", num_classes=10)
    assert loaded.meta.arch == "torchvision:resnet18" and loaded.meta.args == {"num_classes": 10}
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    with pytest.raises(Exception, match="torchvision has no model 'resnet19'"):
        load_model(tmp_path / "r18.pth", arch="torchvision:resnet19")


def test_torchvision_class_with_a_custom_configuration(tmp_path):
    """torchvision:VisionTransformer and torchvision.models:VisionTransformer build the class with --arch-args."""
    from torchvision.models import VisionTransformer

    config = {"image_size": 16, "patch_size": 8, "num_layers": 1, "num_heads": 2, "hidden_dim": 8, "mlp_dim": 16,
              "num_classes": 10}  # fmt: skip
    torch.manual_seed(0)
    model = VisionTransformer(**config).eval()
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    x = torch.rand(2, 3, 16, 16)
    for arch in ("torchvision:VisionTransformer", "torchvision.models:VisionTransformer"):
        loaded = load_model(tmp_path / "vit.pth", arch=arch, arch_args=config)
        assert type(loaded.model).__name__ == "VisionTransformer"
        with torch.no_grad():
            assert torch.equal(loaded.model(x), model(x))
