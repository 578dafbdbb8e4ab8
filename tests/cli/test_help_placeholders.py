"""`odekit attack --help` names its argument like every other command (issue 12): CHECKPOINT...
with the type of one value, and --delta says what its number measures."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from odekit.cli.app import app


def _help(command: str) -> str:
    res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", res.output))


def test_attack_argument_reads_checkpoint_dots_with_a_path_type():
    text = _help("attack")
    assert "list[" not in text and "CHECKPOINT......" not in text
    assert "Usage: odekit attack [OPTIONS] CHECKPOINT..." in text
    assert "* CHECKPOINT... <path> Target checkpoint" in text
    assert "* CHECKPOINT <path> Model checkpoint" in _help("reduce")  # one value: unchanged


def test_delta_help_states_norm_units_and_default():
    text = _help("attack")
    delta = text[text.index("--delta") : text.index("--target")]
    assert "l2 or linf norm" in delta and "[0, 1]-pixel units" in delta
    assert "[default: 3.0 for l2" in delta
