"""Result tables: the CLI prints them, report.md embeds them (no torch import: `--help` stays fast)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ReportTable:
    """A table of results: printed by the CLI, a section of report.md."""

    title: str
    headers: list[str]
    rows: list[list[Any]]

    def markdown(self) -> str:
        return markdown_table(self.headers, self.rows)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)
