"""One CLI vocabulary (issue 12, part 3): new spellings, deprecated ones with a note, clean usage lines."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from odekit.cli.app import app
from odekit.cli.vocabulary import DEPRECATED, rewrite_deprecated

runner = CliRunner()
MISSING = "no-such-checkpoint.safetensors"


def test_rewrite_replaces_only_the_commands_old_spellings_and_notes_each_once() -> None:
    notes: list[str] = []
    args = ["--eps", "0.1", "--samples=40", "--eps", "0.2", "--", "--samples"]
    out = rewrite_deprecated("asnet", args, notes.append)
    assert out == ["--energy-tol", "0.1", "--fit-samples=40", "--energy-tol", "0.2", "--", "--samples"]
    assert notes == [
        "odekit asnet: --eps is deprecated, use --energy-tol (the old spelling still works for now)",
        "odekit asnet: --samples is deprecated, use --fit-samples (the old spelling still works for now)",
    ]
    assert rewrite_deprecated("attack", ["--eps", "0.1"], notes.append) == ["--eps", "0.1"]  # attack's budget
    assert len(notes) == 2


@pytest.mark.parametrize(
    ("command", "old", "new"), [(c, old, new) for c, table in DEPRECATED.items() for old, new in table.items()]
)
def test_old_and_new_spellings_parse_alike_and_only_the_old_one_warns(command: str, old: str, new: str) -> None:
    """Both spellings get past option parsing (the missing checkpoint fails after it, exit 1, not 2)."""
    checkpoint = [] if command == "train-ode" else [MISSING]
    extra = {"train-ode": ["--resume", MISSING], "reduce": ["--layers", "1-2"]}.get(command, [])
    value = "3"
    fresh = runner.invoke(app, [command, *checkpoint, new, value, *extra])
    legacy = runner.invoke(app, [command, *checkpoint, old, value, *extra])
    assert fresh.exit_code == legacy.exit_code == 1, (fresh.stderr, legacy.stderr)
    assert "deprecated" not in fresh.stderr
    note = f"odekit {command}: {old} is deprecated, use {new}"
    assert legacy.stderr.splitlines()[0].startswith(note)
    assert legacy.stderr.splitlines()[1:] == fresh.stderr.splitlines()  # same error after the note


@pytest.mark.parametrize("command", sorted(DEPRECATED))
def test_help_shows_new_spellings_a_clean_usage_line_and_no_bool_placeholder(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = result.stdout
    for old, new in DEPRECATED[command].items():
        assert new in text
        assert f" {old} " not in text
    assert "{checkpoint" not in text and "<bool>" not in text
    if command != "train-ode":
        assert f"odekit {command} [OPTIONS] CHECKPOINT" in text


def test_delta_help_names_the_norm_and_its_units() -> None:
    text = runner.invoke(app, ["attack", "--help"], env={"COLUMNS": "400"}).stdout
    assert "l2 or linf norm ||v||" in text and "[0, 1]-pixel units" in text and "3.0 for l2" in text


def test_range_errors_name_the_new_spelling() -> None:
    result = runner.invoke(app, ["reduce", MISSING, "--layers", "1-2", "--fit-samples", str(2**64)])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: --fit-samples 18446744073709551616") and "--samples" not in result.stderr


def test_top_level_help_has_no_bool_placeholder() -> None:
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "--version" in result.stdout and "<bool>" not in result.stdout
