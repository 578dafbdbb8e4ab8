"""`odekit certify` on the foreign-model zoo (tests/foreign): every model, as a state dict with
--arch, a trusted pickle and a .pt2 export, gives a sound report; TorchScript is refused in one
line. Slow: the zoo is built (and the VGG trained) once per session."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from odekit.cli.app import app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "foreign"))
from foreign_models import build_foreign  # the zoo builder shared with tests/foreign

pytestmark = pytest.mark.slow
runner = CliRunner()
FAST = ["--eval-samples", "12", "--pgd-steps", "2", "--power-iters", "5", "--eps", "0.01,0.1", "--threads", "1", "--json"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("certify-zoo")
    return {name: build_foreign(name, root) for name in ("mlp", "resnet18", "vgg")}


@pytest.mark.parametrize("name", ["mlp", "resnet18", "vgg"])
@pytest.mark.parametrize("fmt", ["state", "pickle", "export"])
def test_certify_runs_on_the_foreign_zoo(zoo, name, fmt, tmp_path):
    model = zoo[name]
    res = runner.invoke(app, ["certify", *model.args(fmt), *model.data_args(), "-o", str(tmp_path / "r"), *FAST])
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)["results"]
    assert 0 < r["lipschitz_lower_local"] <= r["lipschitz_upper"]
    compute = [layer for layer in r["layers"] if layer["index"] is not None]
    assert compute and all(0 < layer["lipschitz_lower"] <= layer["lipschitz_upper"] * (1 + 1e-9) for layer in compute)
    assert all(row["violations"] == 0 and row["order_holds"] for row in r["budgets"])


def test_torchscript_is_refused_in_one_line(zoo, tmp_path):
    res = runner.invoke(app, ["certify", *zoo["mlp"].args("torchscript"), *zoo["mlp"].data_args(), "-o", str(tmp_path / "t")])
    assert res.exit_code == 1 and res.stderr.startswith("Error:") and res.stderr.count("\n") == 1
