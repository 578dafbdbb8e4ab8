"""`odekit --help`, `odekit COMMAND --help` and `--version` load no heavy library (issue 12, part 4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from odekit.cli import names

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "numpy", "matplotlib", "sklearn", "foolbox", "scipy")
COMMANDS = ("info", "train-ode", "smoothness-check", "reduce", "asnet", "attack", "certify", "export")

PROBE = f"""
import json, sys
from odekit.cli.app import main
sys.argv = ["odekit", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    code = exc.code
print(json.dumps({{"code": code, "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}), file=sys.stderr)
"""


def _probe(*args: str) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    result: dict[str, object] = json.loads(done.stderr.strip().splitlines()[-1])
    result["stdout"] = done.stdout
    return result


def test_help_version_and_every_command_help_leave_heavy_libraries_unloaded() -> None:
    # one subprocess per invocation: each starts from a clean sys.modules
    for args in (["--help"], ["--version"], *([command, "--help"] for command in COMMANDS)):
        result = _probe(*args)
        assert result["code"] == 0, (args, result)
        assert result["loaded"] == [], f"odekit {' '.join(args)} imported {result['loaded']}"
        assert "Usage" in str(result["stdout"]) or "odekit" in str(result["stdout"])


def test_a_command_that_runs_still_loads_torch() -> None:
    """The lazy imports are only deferred: a real run (info on a missing file fails after parsing) loads them."""
    result = _probe("info", "missing-checkpoint.safetensors")
    assert result["code"] == 1
    assert "torch" in str(result["loaded"])


@pytest.mark.parametrize(
    ("mirror", "registry"),
    [
        (names.DEVICE_CHOICES, lambda: __import__("odekit.device", fromlist=["x"]).DEVICE_CHOICES),
        (names.SOLVER_NAMES, lambda: __import__("odekit.ode", fromlist=["x"]).SOLVERS.names()),
        (names.GRADIENT_METHOD_NAMES, lambda: __import__("odekit.ode", fromlist=["x"]).GRADIENT_METHODS.names()),
        (names.TOY_DATASET_NAMES, lambda: __import__("odekit.io.toy2d", fromlist=["x"]).TOY_DATASETS.names()),
        (names.TRACE_MODE_NAMES, lambda: __import__("odekit.models.ode_models", fromlist=["x"]).TRACE_MODES),
        (names.ACTIVATION_NAMES, lambda: list(__import__("odekit.models.ode_models", fromlist=["x"]).ACTIVATIONS)),
    ],
)
def test_name_mirrors_match_their_registries(mirror: tuple[str, ...], registry: object) -> None:
    assert list(mirror) == list(registry())  # type: ignore[operator]


def test_help_mirrors_match_their_registries() -> None:
    from odekit.linalg.rank import RANK_RULES
    from odekit.methods.attacks import ATTACKS
    from odekit.methods.ode_train import REGIMES
    from odekit.models.ode_models import NORM_HELP, NORMS

    assert names.help_line(names.RANK_RULE_HELP) == RANK_RULES.help_text()
    assert names.help_line(names.ATTACK_HELP) == ATTACKS.help_text()
    from odekit.cli.errors import cli_text

    # the library names parameters (`u_set`); the help text shows the flags (--u-set)
    assert names.help_line(names.REGIME_HELP) == cli_text(REGIMES.help_text())
    assert names.help_line(names.NORM_CHOICES) == NORM_HELP
    assert names.names(names.NORM_CHOICES) == tuple(NORMS)


def test_architecture_mirror_is_the_zoo() -> None:
    """--arch's list in `info --help` is the built-in zoo (a fresh process: plugins register more)."""
    code = "import odekit.models.zoo; from odekit.models.registry import ARCHITECTURES; print(ARCHITECTURES.names())"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    assert done.stdout.strip() == str(list(names.ARCHITECTURE_NAMES))
