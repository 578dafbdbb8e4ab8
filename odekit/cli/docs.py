"""Markdown CLI reference generated from the Typer app (docs/cli.md; a test keeps it fresh)."""

from __future__ import annotations

from typing import Any

import typer.main
from typer.core import TyperGroup

from odekit.cli.app import app
from odekit.cli.vocabulary import DEPRECATED, GLOSSARY

HEADER = """# odekit CLI reference

Generated from the Typer application by `python -m odekit.cli.docs > docs/cli.md`;
`tests/foundation/test_docs.py` fails when this file is stale.
"""


def _default(param: Any) -> str:
    default = param.default
    if default is None or callable(default) or (getattr(param, "is_flag", False) and default is False):
        return ""
    return f"`{default}`"


def glossary() -> list[str]:
    """The words every command uses in one sense only, and the old spellings they replaced."""
    out = ["## Glossary", "", "Every command uses these words in one sense only.", "", "| word | meaning |", "|---|---|"]
    out += [f"| `{word}` | {meaning.replace('|', chr(92) + '|')} |" for word, meaning in GLOSSARY]
    out += [
        "",
        "Deprecated spellings still work, with a one-line note on stderr; they are hidden from `--help`:",
        "",
        "| command | old | new |",
        "|---|---|---|",
    ]
    out += [f"| {command} | `{old}` | `{new}` |" for command, table in DEPRECATED.items() for old, new in table.items()]
    return [*out, ""]


def render() -> str:
    root = typer.main.get_command(app)
    assert isinstance(root, TyperGroup)
    ctx = root.make_context("odekit", [], resilient_parsing=True)
    out = [HEADER, *glossary()]
    for name in root.list_commands(ctx):
        command = root.get_command(ctx, name)
        if command is None:
            continue
        out += [f"## odekit {name}", "", (command.help or "").strip(), ""]
        arguments = [p for p in command.params if not getattr(p, "opts", ["-"])[0].startswith("-")]
        options = [p for p in command.params if p not in arguments]
        if arguments:
            out += ["| argument | help |", "|---|---|"]
            out += [f"| `{(p.metavar or p.name).upper()}` | {(getattr(p, 'help', '') or '').strip()} |" for p in arguments]
            out.append("")
        if options:
            out += ["| option | help | default |", "|---|---|---|"]
            for p in options:
                flags = ", ".join(f"`{o}`" for o in p.opts)
                text = (getattr(p, "help", "") or "").replace("|", "\\|").strip()
                out.append(f"| {flags} | {text} | {_default(p)} |")
            out.append("")
        if command.epilog:
            out += ["```text", command.epilog.strip(), "```", ""]
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
