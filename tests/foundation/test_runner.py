"""The shared command life cycle: reports, --json, --force, cleanup after failures."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from odekit.cli.options import CommonOptions, ForceOpt, JsonOpt, OutOpt
from odekit.cli.runner import CommandContext, CommandOutput, ResultTable, run_command
from odekit.errors import NumericalError
from odekit.writers.atomic import atomic_write_text

demo = typer.Typer()


@demo.command()
def run(out: OutOpt = None, force: ForceOpt = False, json_output: JsonOpt = False, fail: bool = False) -> None:
    def body(ctx: CommandContext) -> CommandOutput:
        artifact = ctx.path("artifact.txt")
        atomic_write_text(artifact, "payload", ctx.force)
        if fail:
            raise NumericalError("rank 99 is impossible", "choose a rank below 10")
        return CommandOutput(
            results={"answer": 42, "ratio": float("nan")},
            tables=[ResultTable("numbers", ["a", "b"], [[1, 2.5]])],
            headline=["all good"],
        )

    run_command(
        "demo", CommonOptions(out=out, force=force, json=json_output), inputs={"x": 1}, params={"p": 2}, body=body
    )


def test_json_output_is_the_report(tmp_path: Path) -> None:
    result = CliRunner().invoke(demo, ["--out", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    stored = json.loads((tmp_path / "o" / "report.json").read_text())
    assert printed == stored
    assert set(printed) == {
        "command", "odekit_version", "inputs", "params", "results", "device", "threads", "world_size", "backend",
        "seconds", "outputs",
    }  # fmt: skip
    assert (printed["world_size"], printed["backend"]) == (1, None)
    assert printed["outputs"] == ["report.json", "report.md", "artifact.txt"]
    assert printed["results"] == {"answer": 42, "ratio": None}  # NaN becomes null: strict JSON
    assert "| 1 | 2.5 |" in (tmp_path / "o" / "report.md").read_text()


def test_human_output_and_existing_outputs_need_force(tmp_path: Path) -> None:
    runner = CliRunner()
    first = runner.invoke(demo, ["--out", str(tmp_path)])
    assert first.exit_code == 0 and "all good" in first.stdout
    before = (tmp_path / "report.json").read_text()
    second = runner.invoke(demo, ["--out", str(tmp_path)])
    assert second.exit_code == 1 and second.stderr.startswith("Error: output")
    assert "--force" in second.stderr
    assert (tmp_path / "report.json").read_text() == before
    assert runner.invoke(demo, ["--out", str(tmp_path), "--force"]).exit_code == 0


def test_failure_leaves_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "new" / "run"
    result = CliRunner().invoke(demo, ["--out", str(out), "--fail"])
    assert result.exit_code == 1
    assert result.stderr.strip() == "Error: rank 99 is impossible. Hint: choose a rank below 10"
    assert not (tmp_path / "new").exists()


def test_failure_keeps_older_outputs_with_force(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(demo, ["--out", str(tmp_path)]).exit_code == 0
    assert runner.invoke(demo, ["--out", str(tmp_path), "--force", "--fail"]).exit_code == 1
    assert (tmp_path / "report.json").exists()


def test_json_stdout_survives_native_prints(tmp_path: Path, capfd) -> None:
    """Native libraries (MAGMA on CUDA) write banners to fd 1; with --json they must land on stderr."""
    import os

    def body(ctx: CommandContext) -> CommandOutput:
        os.write(1, b"native banner\n")
        print("stray print")
        return CommandOutput(results={"answer": 42})

    try:
        run_command("demo", CommonOptions(out=tmp_path / "o", json=True), inputs={}, params={}, body=body)
    except typer.Exit as exc:  # pragma: no cover - a failure here is the test failing
        raise AssertionError(f"exit {exc.exit_code}") from exc
    captured = capfd.readouterr()
    assert json.loads(captured.out)["results"] == {"answer": 42}
    assert "native banner" in captured.err and "stray print" in captured.err


long_demo = typer.Typer()


@long_demo.command()
def run_long(out: OutOpt = None) -> None:
    spectrum = [1.0 / (i + 1) for i in range(100)]

    def body(ctx: CommandContext) -> CommandOutput:
        return CommandOutput(results={"layers": [{"sv": spectrum, "rank": 3}], "short": [1.0, 0.5]})

    run_command("demo", CommonOptions(out=out), inputs={}, params={}, body=body)


def test_long_arrays_go_to_a_csv_that_report_md_links(tmp_path: Path) -> None:
    """issue 12: report.md points to arrays.csv; report.json keeps every number; the CSV round-trips."""
    out = tmp_path / "o"
    result = CliRunner().invoke(long_demo, ["--out", str(out)])
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["outputs"] == ["report.json", "report.md", "arrays.csv"]
    assert report["results"]["layers"][0]["sv"] == [1.0 / (i + 1) for i in range(100)]
    markdown = (out / "report.md").read_text()
    assert "[arrays.csv](arrays.csv)" in markdown and "100 values: arrays.csv, column layers.0.sv" in markdown
    # short lists stay inline, long ones leave (1/97 in full: a run time such as 0.0107 s must not match)
    assert '"short": [' in markdown and repr(1.0 / 97) not in markdown
    rows = (out / "arrays.csv").read_text().splitlines()
    assert rows[0] == "index,layers.0.sv" and len(rows) == 101
    assert [float(row.split(",")[1]) for row in rows[1:]] == report["results"]["layers"][0]["sv"]
