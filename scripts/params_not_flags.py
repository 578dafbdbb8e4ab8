"""Rewrite CLI flags in the library's messages as the Python API's parameter names (issue 22).

    python scripts/params_not_flags.py            # rewrite odekit/{methods,io,models,linalg}
    python scripts/params_not_flags.py --check    # list what it would change; exit 1 if anything

Library messages name parameters in backticks (`fit_samples`); the CLI shows them as flags
(--fit-samples) through `odekit.cli.errors.cli_text`, so every audience reads its own spelling.
This script turns each `--flag-name` inside a string literal (docstrings aside) into
`flag_name`; `PARAMETER_OF` lists the flags whose parameter is spelt otherwise (empty today:
every flag's parameter is the flag with underscores). Rerun it after merging branches that add
messages; tests/api/test_library_messages.py fails while a flag is left.
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("methods", "io", "models", "linalg")
FLAG = re.compile(r"(?<![\w`-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")
# a flag an f-string builds from a name: --{name} or --{name.replace('_', '-')}
BUILT_FLAG = re.compile(r"(?<![\w`-])--\{([^{}]+?)(?:\.replace\(['\"]_['\"], ['\"]-['\"]\))?\}")
PARAMETER_OF: dict[str, str] = {}  # flag -> parameter, where it is not the flag with underscores


def parameter(flag: str) -> str:
    return PARAMETER_OF.get(flag, flag.replace("-", "_"))


def docstring_lines(tree: ast.AST) -> set[int]:
    """Line numbers of module, class and function docstrings (not messages)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                lines.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return lines


def rewrite(source: str) -> tuple[str, list[str]]:
    """``source`` with flags in string literals rewritten, and one line per change."""
    skip = docstring_lines(ast.parse(source))
    lines = source.splitlines(keepends=True)
    changes: list[str] = []
    edits: list[tuple[int, int, int, int, str]] = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.STRING or token.start[0] in skip:
            continue
        new = FLAG.sub(lambda m: f"`{parameter(m.group(1))}`", token.string)
        new = BUILT_FLAG.sub(lambda m: f"`{{{m.group(1)}}}`", new)
        if new != token.string:
            edits.append((*token.start, *token.end, new))
            changes.append(f"{token.start[0]}: {token.string.strip()[:90]}")
    for (row, col, end_row, end_col, new) in reversed(edits):
        head = lines[row - 1][:col]
        tail = lines[end_row - 1][end_col:]
        lines[row - 1 : end_row] = [head + new + tail]
    return "".join(lines), changes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a flag is left")
    args = parser.parse_args()
    total = 0
    for layer in LAYERS:
        for path in sorted((ROOT / "odekit" / layer).rglob("*.py")):
            source = path.read_text()
            new, changes = rewrite(source)
            total += len(changes)
            for change in changes:
                print(f"{path.relative_to(ROOT)}:{change}")
            if changes and not args.check:
                path.write_text(new)
    print(f"{total} string(s) {'name' if args.check else 'named'} CLI flags", file=sys.stderr)
    return 1 if args.check and total else 0


if __name__ == "__main__":
    sys.exit(main())
