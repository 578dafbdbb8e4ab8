"""report.json / report.md: the record every subcommand leaves behind."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from odekit.writers.atomic import atomic_write_text
from odekit.writers.tables import ReportTable, markdown_table

__all__ = ["ARRAYS_NAME", "Report", "ReportTable", "markdown_table", "to_jsonable"]

ARRAYS_NAME = "arrays.csv"
MARKDOWN_ARRAY_LIMIT = 32  # numeric lists longer than this go to arrays.csv, not into report.md


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
        arrays = long_arrays(data["results"])
        lines += ["## Results (JSON)", ""]
        if arrays:
            lines += [
                f"{len(arrays)} long array(s) are in [{ARRAYS_NAME}]({ARRAYS_NAME}), one column each, named by "
                "its path in the results (report.json holds them too).",
                "",
            ]
        results = _point_to_csv(data["results"], set(arrays))
        lines += ["```json", json.dumps(results, indent=2), "```", ""]
        return "\n".join(lines)

    def long_arrays(self) -> dict[str, list[Any]]:
        """The result arrays that report.md leaves to arrays.csv, by dotted path."""
        return long_arrays(to_jsonable(self.results))

    def write(self, out_dir: Path, force: bool) -> list[Path]:
        written = [
            atomic_write_text(out_dir / "report.json", self.to_json() + "\n", force),
            atomic_write_text(out_dir / "report.md", self.to_markdown(), force),
        ]
        arrays = self.long_arrays()
        if arrays:
            written.append(atomic_write_text(out_dir / ARRAYS_NAME, arrays_csv(arrays), force))
        return written


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def long_arrays(value: Any, path: str = "") -> dict[str, list[Any]]:
    """Numeric lists longer than MARKDOWN_ARRAY_LIMIT inside JSON-like ``value``, by dotted path."""
    found: dict[str, list[Any]] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            found |= long_arrays(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        if len(value) > MARKDOWN_ARRAY_LIMIT and all(_is_number(v) for v in value):
            return {path: value}
        for i, item in enumerate(value):
            found |= long_arrays(item, f"{path}.{i}" if path else str(i))
    return found


def _point_to_csv(value: Any, paths: set[str], path: str = "") -> Any:
    """``value`` with each array at ``paths`` replaced by a pointer into arrays.csv."""
    if path in paths:
        return f"{len(value)} values: {ARRAYS_NAME}, column {path}"
    if isinstance(value, dict):
        return {k: _point_to_csv(v, paths, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_point_to_csv(v, paths, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value)]
    return value


def arrays_csv(arrays: dict[str, list[Any]]) -> str:
    """One column per array (header: its path), row i holding element i; shorter columns end blank."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["index", *arrays])
    for i in range(max(len(a) for a in arrays.values())):
        writer.writerow([i, *("" if i >= len(a) or a[i] is None else repr(a[i]) for a in arrays.values())])
    return buffer.getvalue()


def _bullet(mapping: dict[str, Any]) -> list[str]:
    return [f"- {key}: `{json.dumps(value)}`" for key, value in mapping.items()] or ["- (none)"]
