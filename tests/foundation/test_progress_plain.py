"""Plain progress lines for logs: stage start/end and at most one k/n line per interval."""

from __future__ import annotations

import io
import json

from typer.testing import CliRunner

from odekit.api.progress import PlainProgress, plain_progress
from odekit.cli.app import app


def test_lines_at_start_end_and_every_interval():
    now = [0.0]
    stream = io.StringIO()
    progress = PlainProgress(stream, interval=10.0, clock=lambda: now[0])
    for _ in progress.track(range(100), 100, "stream"):
        now[0] += 1.0  # one second per step: a line every ten steps, not every step
        progress.update(loss=0.5)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[odekit] stream: start (100 steps)"
    assert lines[1] == "[odekit] stream: 10/100 (10 s) loss=0.5"
    assert len(lines) == 1 + 10 + 1  # start, 10 progress lines (every 10 s of 100 s), end
    assert lines[-1] == "[odekit] stream: end 100/100 in 100.0 s loss=0.5"


def test_environment_switch(monkeypatch):
    monkeypatch.setenv("ODEKIT_PROGRESS", "auto")
    assert plain_progress(stderr_is_terminal=False) is not None
    assert plain_progress(stderr_is_terminal=True) is None
    monkeypatch.setenv("ODEKIT_PROGRESS", "off")
    assert plain_progress(stderr_is_terminal=False) is None
    monkeypatch.setenv("ODEKIT_PROGRESS", "plain")
    assert plain_progress(stderr_is_terminal=True) is not None


def test_cli_in_a_pipe_talks_on_stderr_and_keeps_json_pure(monkeypatch, checkpoints_dir, tmp_path):
    monkeypatch.setenv("ODEKIT_PROGRESS", "auto")  # CliRunner's stderr is not a terminal
    result = CliRunner().invoke(app, [
        "attack", str(checkpoints_dir / "lenet300_digits.safetensors"), "--method", "active-subspace",
        "--delta", "2", "--fit-samples", "30", "--eval-samples", "30", "--max-iter", "2", "-o", str(tmp_path), "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    json.loads(result.stdout)
    lines = result.stderr.splitlines()
    assert "[odekit] active-subspace: start (2 steps)" in lines
    assert any(line.startswith("[odekit] active-subspace: end ") for line in lines)
    assert lines[-1].startswith("[odekit] attack: done in ")
