"""docs/api.md's examples run: every ```python block, in order, in one namespace (a block
after `<!-- needs: NAME -->` is skipped until the API takes parameter NAME)."""

from __future__ import annotations

import inspect
import re
from dataclasses import fields
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"(?:<!-- needs: (\w+) -->\n)?```python\n(.*?)```", re.S)


def blocks() -> list[tuple[str | None, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer((ROOT / "docs" / "api.md").read_text())]


def available(name: str) -> bool:
    """A parameter the API or the settings it forwards to take (other branches add some)."""
    import odekit
    from odekit.methods.ron import RonSettings
    from odekit.methods.training import TrainSettings

    known = {f.name for f in fields(RonSettings)} | {f.name for f in fields(TrainSettings)}
    return name in known or (name in inspect.signature(odekit.reduce).parameters and name not in ("target_flops", "mode"))


def test_every_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    found = blocks()
    assert len(found) >= 8
    (tmp_path / "checkpoints").symlink_to(ROOT / "checkpoints")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    setup = next(code for need, code in found if "load_digits" in code)
    exec(compile(setup, "docs/api.md (setup)", "exec"), namespace)  # the shortest snippets use it too
    for i, (need, code) in enumerate(found):
        if need is not None and not available(need):
            continue
        exec(compile(code, f"docs/api.md block {i + 1}", "exec"), namespace)
    assert (tmp_path / "runs" / "compress" / "report.json").exists() and (tmp_path / "runs" / "model.onnx").exists()


def test_the_shortest_snippets_are_three_lines_without_odekit_classes():
    snippets = [code for _, code in blocks()][:2]
    for code in snippets:
        lines = [line for line in code.strip().splitlines() if line.strip()]
        assert len(lines) == 3 and lines[0] == "import odekit"
        assert not re.search(r"odekit\.[A-Z]|from odekit", code)
