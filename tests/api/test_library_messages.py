"""Library messages name the Python API's parameters, not CLI flags (issue 22): no string under
odekit/{methods,io,models,linalg} names a flag (scripts/params_not_flags.py rewrites them), and
every parameter they name is a flag of some command once the CLI maps it."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from params_not_flags import BUILT_FLAG, FLAG, LAYERS, docstring_lines  # noqa: E402

PARAMETER = re.compile(r"`([a-z][a-z0-9_]*)(?:=[^`\s]+)?`")


def library_strings() -> list[tuple[str, int, str]]:
    found = []
    for layer in LAYERS:
        for path in sorted((ROOT / "odekit" / layer).rglob("*.py")):
            tree = ast.parse(path.read_text())
            skip = docstring_lines(tree)
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.lineno not in skip:
                    found.append((str(path.relative_to(ROOT)), node.lineno, node.value))
    return found


def test_no_library_message_names_a_flag():
    flagged = [f"{path}:{line}: {text[:80]}" for path, line, text in library_strings()
               if FLAG.search(text) or BUILT_FLAG.search(text) or "--{" in text]  # fmt: skip
    assert not flagged, "run scripts/params_not_flags.py:\n" + "\n".join(flagged)


def test_every_parameter_named_is_a_cli_flag():
    from typer.main import get_command

    from odekit.cli.app import app
    from odekit.cli.errors import flag_of

    group = get_command(app)
    flags = {opt for command in group.commands.values() for p in command.params for opt in getattr(p, "opts", [])}  # type: ignore[attr-defined]
    named = {name for _, _, text in library_strings() for name in PARAMETER.findall(text)}
    assert len(named) > 30
    assert {name for name in named if flag_of(name) not in flags} == set()
