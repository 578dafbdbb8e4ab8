"""issue 12: `asnet --rank` reads reduce's rank grammar (plus `auto`) through one parser, and the
rank it uses is the rule applied to the cut layer's gradient-sketch singular values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from odekit.cli.app import app
from odekit.errors import UsageError
from odekit.io.checkpoints import load_model
from odekit.io.datasets import load_dataset
from odekit.linalg import active_count, energy_rank, vbmf_rank
from odekit.linalg.rank import parse_rank_option, rank_grammar
from odekit.methods.asnet import SubspaceSettings, active_subspace, cut_model, parse_rank
from odekit.methods.comparison import compare_student

FIT = 200  # training samples streamed, in the CLI runs and in the direct computation alike


@pytest.fixture(scope="module")
def cut1_subspace():
    """The gradient sketch of lenet300's layer 1, streamed as `asnet --cut 1 --fit-samples 200` does."""
    loaded = load_model(Path(__file__).resolve().parents[2] / "checkpoints" / "lenet300_digits.safetensors")
    data = load_dataset("digits", input_shape=loaded.meta.input_shape, normalization=loaded.meta.normalization)
    chain = cut_model(loaded.model, loaded.meta.input_shape)
    return active_subspace(chain, chain.cut("1"), data.train, SubspaceSettings(samples=FIT), torch.device("cpu"))


def _direct(spec: str, sub, features: int) -> int:
    """The rank rule computed here, on the singular values of the same sketch."""
    s, n = sub.singular_values, sub.n_samples
    if spec == "vbmf":
        return vbmf_rank(s, n, features, total_energy=sub.total_energy)
    if spec.startswith("energy:"):
        return energy_rank(s, float(spec.split(":")[1]), total_energy=sub.total_energy)
    if spec.startswith("factor:"):
        return math.ceil(features / float(spec.split(":")[1]))
    if spec == "auto":
        return active_count(s, 0.05, form="eq6.17")
    return int(spec)


@pytest.mark.parametrize("spec", ["vbmf", "energy:0.9", "factor:4", "8", "auto"])
def test_asnet_rank_rules_match_the_rule_on_the_sketch(checkpoints_dir, tmp_path, cut1_subspace, spec) -> None:
    result = CliRunner().invoke(app, [
        "asnet", str(checkpoints_dir / "lenet300_digits.safetensors"), "--cut", "1", "--rank", spec,
        "--fit-samples", str(FIT), "--degree", "1", "--no-baselines", "--no-latency", "--device", "cpu",
        "-o", str(tmp_path / "run"), "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    cut = json.loads(result.stdout)["results"]["cut"]
    want = _direct(spec, cut1_subspace, 300)
    assert 1 <= cut["rank"] == want <= min(100, 300, FIT)
    assert cut["gradient_samples"] == FIT and cut["n_l"] == 300
    if spec == "auto":
        assert cut["rank"] == cut["active_neurons"]
    elif not spec.isdigit():
        assert cut["rank_rule"].startswith(f"`rank` {spec}")  # the library's spelling of the parameter


def test_one_parser_for_both_commands() -> None:
    assert rank_grammar() == "vbmf | energy:F | factor:F | INT"
    assert rank_grammar(("auto",)) == "vbmf | energy:F | factor:F | INT | auto"
    assert parse_rank_option("Auto", keywords=("auto",)) == "auto"
    assert str(parse_rank_option("energy:0.9")) == "energy:0.9"
    assert parse_rank("factor:4") == "factor:4" and parse_rank("8") == 8 and parse_rank("vbmf") == "vbmf"
    with pytest.raises(UsageError) as err:
        parse_rank_option("auto")  # reduce has no `auto`
    assert "`rank` 'auto'" in err.value.message and "vbmf | energy:F" in (err.value.hint or "")
    with pytest.raises(UsageError, match="energy threshold"):
        parse_rank("energy:1.5")


def test_asnet_rank_errors_name_the_grammar(checkpoints_dir, tmp_path) -> None:
    result = CliRunner().invoke(app, ["asnet", str(checkpoints_dir / "lenet300_digits.safetensors"), "--cut", "1",
                                      "--rank", "energy", "--fit-samples", "50", "-o", str(tmp_path / "e")])  # fmt: skip
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert line.startswith("Error: --rank 'energy'") and "auto" in line and "Traceback" not in line
    reduce = CliRunner().invoke(app, ["reduce", str(checkpoints_dir / "lenet300_digits.safetensors"), "--layers", "1",
                                      "--rank", "auto", "-o", str(tmp_path / "r")])  # fmt: skip
    assert reduce.exit_code == 1 and "unknown rank rule 'auto'" in reduce.stderr


def test_compare_student_of_a_model_with_itself() -> None:
    """Agreement 1, KL 0 and every ratio 1; accuracy carries n and a Wilson interval."""
    from odekit.io.datasets import Split

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 3))
    test = Split(torch.randn(50, 8), torch.randint(0, 3, (50,)))
    compared = compare_student(model, model, test, (8,), torch.device("cpu"), student_before=0.5)
    assert compared.agreement == 1.0 and abs(compared.mean_kl) < 1e-12 and compared.compared == 50
    assert compared.flop_reduction == compared.param_reduction == compared.storage_reduction == 1.0
    report = compared.to_dict("reduce")
    assert report["student"]["accuracy_before_finetune"] == 0.5 and report["accuracy_drop"] == 0.0
    low, high = report["teacher"]["accuracy_ci95"]
    assert report["teacher"]["accuracy_n"] == 50 and low <= report["teacher"]["accuracy"] <= high
    assert set(compared.to_dict("asnet")) >= {"teacher", "asnet", "storage_reduction", "agreement", "mean_kl"}
    with pytest.raises(UsageError):
        compared.to_dict("attack")
