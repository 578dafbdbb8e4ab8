"""report.json / report.md: the record every subcommand leaves behind."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from odekit.writers.atomic import atomic_write_text


def to_jsonable(value: Any) -> Any:
    """Plain JSON types; NaN/inf become null so the output stays strict JSON."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.device | torch.dtype):
        return str(value)
    if value is None or isinstance(value, bool | int | str):
        return value
    if hasattr(value, "to_dict"):
        return to_jsonable(value.to_dict())
    return str(value)


@dataclass
class Report:
    command: str
    odekit_version: str
    inputs: dict[str, Any]
    params: dict[str, Any]
    results: dict[str, Any]
    device: str
    seconds: float
    threads: int | None = None
    outputs: list[str] = field(default_factory=list)
    markdown_sections: list[tuple[str, str]] = field(default_factory=list)
    world_size: int = 1  # ranks of a torchrun launch (issue 15)
    backend: str | None = None  # their torch.distributed backend (None for one process)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(
            {
                "command": self.command,
                "odekit_version": self.odekit_version,
                "inputs": self.inputs,
                "params": self.params,
                "results": self.results,
                "device": self.device,
                "threads": self.threads,
                "world_size": self.world_size,
                "backend": self.backend,
                "seconds": round(self.seconds, 4),
                "outputs": self.outputs,
            }
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def to_markdown(self) -> str:
        data = self.to_dict()
        lines = [
            f"# odekit {self.command}",
            "",
            f"- odekit version: {self.odekit_version}",
            f"- device: {self.device}",
            f"- threads: {self.threads}",
            f"- seconds: {data['seconds']}",
            "",
            "## Inputs",
            "",
            *_bullet(data["inputs"]),
            "",
            "## Parameters",
            "",
            *_bullet(data["params"]),
            "",
        ]
        for title, body in self.markdown_sections:
            lines += [f"## {title}", "", body.rstrip(), ""]
        lines += ["## Results (JSON)", "", "```json", json.dumps(data["results"], indent=2), "```", ""]
        return "\n".join(lines)

    def write(self, out_dir: Path, force: bool) -> list[Path]:
        return [
            atomic_write_text(out_dir / "report.json", self.to_json() + "\n", force),
            atomic_write_text(out_dir / "report.md", self.to_markdown(), force),
        ]


def _bullet(mapping: dict[str, Any]) -> list[str]:
    return [f"- {key}: `{json.dumps(value)}`" for key, value in mapping.items()] or ["- (none)"]


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)
