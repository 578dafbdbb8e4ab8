"""Issue 17: outputs are transactional, locked, signal-safe and never hold NaN (in-process tests)."""

from __future__ import annotations

import errno
import json
import os
import signal
import warnings
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

from odekit.cli.options import CommonOptions, DebugOpt, ForceOpt, OutOpt
from odekit.cli.runner import CommandContext, CommandOutput, run_command
from odekit.writers.atomic import atomic_write_text, atomic_write_with
from odekit.writers.transaction import OutputTransaction

demo = typer.Typer()


@demo.command()
def run(
    out: OutOpt = None,
    force: ForceOpt = False,
    debug: DebugOpt = False,
    extra: bool = False,
    action: str = "",
    lr: float = 0.1,
) -> None:
    def body(ctx: CommandContext) -> CommandOutput:
        artifact = ctx.path("artifact.txt")
        atomic_write_text(artifact, f"lr={lr}", ctx.force)
        if extra:
            atomic_write_text(ctx.path("extra.txt"), "extra", ctx.force)
        if action == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        if action == "nan":
            tensors = {"w": torch.tensor([1.0, float("nan")])}
            atomic_write_with(ctx.path("vectors.safetensors"), lambda tmp: save_file(tensors, str(tmp)), ctx.force)
        if action == "warn":
            warnings.warn("torch.jit.load is deprecated", FutureWarning, stacklevel=1)
        if action == "disk-full":
            def fail(tmp: Path) -> None:
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

            atomic_write_with(ctx.path("big.bin"), fail, ctx.force)
        return CommandOutput(results={"artifact": str(artifact)}, headline=[f"wrote {artifact}"])

    run_command("demo", CommonOptions(out=out, force=force, debug=debug), inputs={}, params={"lr": lr}, body=body)


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(demo, list(args))


def one_error_line(result) -> str:  # type: ignore[no-untyped-def]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Hint: " in lines[0], result.stderr
    return lines[0]


def test_report_names_final_paths_and_no_litter(tmp_path: Path) -> None:
    out = tmp_path / "o"
    result = invoke("--out", str(out))
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["results"]["artifact"] == str(out / "artifact.txt")  # not the staging folder
    assert report["outputs"] == ["report.json", "report.md", "artifact.txt"]
    assert f"wrote {out / 'artifact.txt'}" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no lock, no staging left


def test_second_run_on_a_locked_out_fails_at_once(tmp_path: Path) -> None:
    holder = OutputTransaction(tmp_path / "o", force=False)
    holder.begin()
    try:
        line = one_error_line(result := invoke("--out", str(tmp_path / "o")))
        assert result.exit_code == 1
        assert f"in use by another odekit run (pid {os.getpid()})" in line
        assert holder.staging.is_dir()  # the loser's cleanup leaves the holder's files alone
    finally:
        holder.abort()
    assert invoke("--out", str(tmp_path / "o")).exit_code == 0


def test_stale_staging_from_a_killed_run_is_removed(tmp_path: Path) -> None:
    stale = tmp_path / ".o.odekit-staging.999999"
    stale.mkdir()
    (stale / "student.safetensors").write_bytes(b"half")
    (tmp_path / ".o.odekit-old.999999").mkdir()
    assert invoke("--out", str(tmp_path / "o")).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_force_replaces_the_old_set_as_a_whole(tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert invoke("--out", str(out), "--extra", "--lr", "0.5").exit_code == 0
    assert invoke("--out", str(out), "--force").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["artifact.txt", "report.json", "report.md"]
    assert (out / "artifact.txt").read_text() == "lr=0.1"


def test_force_in_a_folder_with_user_files_keeps_them(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert invoke("--out", str(tmp_path), "--extra").exit_code == 0
    assert invoke("--out", str(tmp_path), "--force").exit_code == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["artifact.txt", "notes.txt", "report.json", "report.md"]  # old extra.txt gone
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_sigterm_exits_143_and_leaves_nothing(tmp_path: Path) -> None:
    result = invoke("--out", str(tmp_path / "a" / "o"), "--action", "sigterm")
    assert result.exit_code == 143
    assert "interrupted by SIGTERM" in result.stderr
    assert list(tmp_path.iterdir()) == []  # the parents it created are gone too
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_sigterm_during_force_rerun_keeps_the_old_set(tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert invoke("--out", str(out), "--lr", "0.5").exit_code == 0
    assert invoke("--out", str(out), "--force", "--action", "sigterm").exit_code == 143
    assert (out / "artifact.txt").read_text() == "lr=0.5"
    assert json.loads((out / "report.json").read_text())["params"]["lr"] == 0.5


def test_nan_vector_is_never_written(tmp_path: Path) -> None:
    result = invoke("--out", str(tmp_path / "o"), "--action", "nan")
    assert result.exit_code == 1
    line = one_error_line(result)
    assert "demo: output 'vectors.safetensors'" in line and "NaN or infinite" in line
    assert not (tmp_path / "o").exists()


def test_third_party_warnings_only_with_debug(tmp_path: Path) -> None:
    quiet = invoke("--out", str(tmp_path / "a"), "--action", "warn")
    assert quiet.exit_code == 0 and "deprecated" not in quiet.stderr
    loud = invoke("--out", str(tmp_path / "b"), "--action", "warn", "--debug")
    assert loud.exit_code == 0 and "warning: FutureWarning: torch.jit.load is deprecated" in loud.stderr


def test_non_finite_option_is_a_usage_error(tmp_path: Path) -> None:
    result = invoke("--out", str(tmp_path / "o"), "--lr", "nan")
    assert result.exit_code == 1
    assert "--lr nan is not a finite number" in one_error_line(result)
    assert not (tmp_path / "o").exists()


def test_empty_out_is_refused(tmp_path: Path) -> None:
    result = invoke("--out", "")
    assert result.exit_code == 2 and "empty path" in result.stderr


def test_disk_full_names_the_final_path(tmp_path: Path) -> None:
    out = tmp_path / "o"
    line = one_error_line(result := invoke("--out", str(out), "--action", "disk-full"))
    assert result.exit_code == 1
    assert f"could not write '{out / 'big.bin'}': No space left on device" in line
    assert "free disk space" in line and not out.exists()


@pytest.mark.parametrize("bad", ["a/../b", "/abs"])
def test_claims_stay_inside_out(tmp_path: Path, bad: str) -> None:
    transaction = OutputTransaction(tmp_path / "o", force=False)
    transaction.begin()
    try:
        with pytest.raises(Exception, match="plain relative name"):
            transaction.claim(bad)
    finally:
        transaction.abort()


def test_out_as_the_working_directory_is_filled_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    inode = here.stat().st_ino
    assert invoke("--out", ".").exit_code == 0
    assert invoke("--out", ".", "--force").exit_code == 0
    assert here.stat().st_ino == inode  # the folder the shell sits in was not swapped away
    assert sorted(p.name for p in here.iterdir()) == ["artifact.txt", "report.json", "report.md"]


def test_outputs_list_only_what_was_written(tmp_path: Path) -> None:
    transaction = OutputTransaction(tmp_path / "o", force=False)
    transaction.begin()
    try:
        for name in ("report.json", "report.md", "model.safetensors", "plot.png"):
            transaction.claim(name)
        (transaction.staging / "plot.png").write_bytes(b"png")
        assert transaction.staged_names() == ["report.json", "report.md", "plot.png"]
    finally:
        transaction.abort()
    assert list(tmp_path.iterdir()) == []


def test_read_only_out_is_one_clean_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(self: OutputTransaction) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(self.lock_path))

    monkeypatch.setattr(OutputTransaction, "_lock", read_only)
    line = one_error_line(result := invoke("--out", str(tmp_path / "o")))
    assert result.exit_code == 1
    assert f"cannot prepare --out '{tmp_path / 'o'}': Read-only file system" in line and "writable --out" in line


def test_ctrl_c_in_info_exits_130(checkpoints_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from odekit.cli.app import app
    from odekit.io import checkpoints

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "load_model", interrupted)  # info imports it when it runs
    result = CliRunner().invoke(app, ["info", str(checkpoints_dir / "lenet300_digits.safetensors")])
    assert result.exit_code == 130 and result.stderr.strip() == "Error: interrupted"
