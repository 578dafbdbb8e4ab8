"""issue 12: the error messages of the methods behind reduce, asnet and smoothness-check name the
current flags (docs/cli.md glossary), never a deprecated spelling."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from odekit.cli.vocabulary import DEPRECATED

METHODS = Path(__file__).resolve().parents[2] / "odekit" / "methods"
# the modules whose messages each command's users read
SOURCES = {
    "reduce": ["ron", "training.py"],
    "asnet": ["asnet", "pce.py", "training.py"],
    "smoothness-check": ["smoothness.py"],
}


def _files(entry: str) -> list[Path]:
    path = METHODS / entry
    return sorted(path.glob("*.py")) if path.is_dir() else [path]


@pytest.mark.parametrize("command", sorted(SOURCES))
def test_method_messages_use_current_flags(command: str) -> None:
    old = DEPRECATED[command]
    stale = []
    for entry in SOURCES[command]:
        for path in _files(entry):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                for flag in old:
                    if re.search(re.escape(flag) + r"(?![\w-])", line):
                        stale.append(f"{path.relative_to(METHODS)}:{number}: {flag} (now {old[flag]})")
    assert not stale, "\n".join(stale)
