"""Typed results of the API functions and the one way they are saved (the CLI saves through it too).

A result holds report.json's ``results`` (without the entries that name written files), the
``inputs`` and ``params`` the report records, the tables and headline the CLI prints, and the
objects (student model, perturbation...) a notebook keeps using. ``save(folder)`` writes what
the command writes: its files, report.json and report.md, installed as one set.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from odekit import __version__
from odekit.io.checkpoints import load_model, save_model
from odekit.io.exported import load_exported, save_exported
from odekit.io.model_meta import ModelMeta
from odekit.writers.report import ARRAYS_NAME, Report, ReportTable, to_jsonable
from odekit.writers.transaction import OutputTransaction

Claim = Callable[[str], Path]  # output name -> the path to write it to (a staging path in a transaction)
RELOAD_PROBE = 16  # inputs the reload check runs through the saved and the in-memory model


@dataclass(frozen=True)
class RunResult:
    """What one API call measured; subclasses add the objects it made."""

    command: str
    results: dict[str, Any]
    inputs: dict[str, Any]
    params: dict[str, Any]
    tables: list[ReportTable] = field(default_factory=list)
    headline: list[str] = field(default_factory=list)
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        """report.json's ``results`` (JSON types; file paths and reload checks come with `save`)."""
        return to_jsonable(copy.deepcopy(self.results))

    @property
    def report(self) -> dict[str, Any]:
        """report.json as `save` writes it, less the file entries, timings and threads."""
        return Report(self.command, __version__, self.inputs, self.params, self.results, self.device, 0.0).to_dict()

    def __str__(self) -> str:
        return "\n".join(line for line in self.headline if line)

    def write_outputs(self, claim: Claim, force: bool) -> dict[str, Any]:
        """Write this command's files (besides the reports) to ``claim(name)``; return the
        report entries naming them. The base result writes none."""
        return {}

    def save(self, folder: str | Path, *, force: bool = False) -> Path:
        """Write the command's files, report.json and report.md into ``folder`` as one set
        (refusing to overwrite an earlier set unless ``force``); returns report.json's path."""
        start = time.perf_counter()
        transaction = OutputTransaction(Path(folder), force)
        try:
            transaction.begin()
            transaction.claim("report.json")
            transaction.claim("report.md")
            written = self.write_outputs(transaction.claim, force)
            staging, final = str(transaction.staging), str(transaction.out_dir)
            results = _renamed({**self.results, **written}, staging, final)
            report = Report(
                command=self.command, odekit_version=__version__, inputs=self.inputs, params=self.params,
                results=results, device=self.device, seconds=time.perf_counter() - start,
                threads=torch.get_num_threads(), outputs=transaction.staged_names(),
                markdown_sections=[(t.title, t.markdown()) for t in self.tables],
            )  # fmt: skip
            if report.long_arrays():
                transaction.claim(ARRAYS_NAME)
                report.outputs = [*report.outputs, ARRAYS_NAME]
            report.write(transaction.staging, force=False)
            transaction.commit()
        except BaseException:
            transaction.abort()
            raise
        return Path(folder) / "report.json"


def _renamed(value: Any, staging: str, final: str) -> Any:
    """Report values naming the staging folder name the final one instead."""
    if isinstance(value, str):
        return value.replace(staging, final)
    if isinstance(value, dict):
        return {k: _renamed(v, staging, final) for k, v in value.items()}
    if isinstance(value, list):
        return [_renamed(v, staging, final) for v in value]
    return value


def model_file(stem: str, registered: bool) -> str:
    """A derived model's file name: weights + metadata when a registry entry rebuilds it, else a
    self-contained torch.export program."""
    return f"{stem}.safetensors" if registered else f"{stem}.pt2"


def save_derived_model(
    path: Path, model: nn.Module, meta: ModelMeta, input_shape: tuple[int, ...], probe: torch.Tensor, *, force: bool
) -> tuple[float, nn.Module]:
    """Write ``model`` (safetensors + ``meta``, or a ``.pt2`` program carrying it, by the file's
    suffix), read it back; return the largest absolute logit difference on ``probe`` and the
    model read back."""
    device = probe.device
    if path.suffix == ".safetensors":
        save_model(path, model, meta, force=force)
        reloaded = load_model(path).model.to(device).eval()
    else:
        model_device = next((p.device for p in model.parameters()), torch.device("cpu"))
        save_exported(path, model.cpu(), input_shape, meta.to_json(), force=force)
        model.to(model_device)
        reloaded = load_exported(path)[0].to(device)
    with torch.no_grad():
        return float((reloaded(probe) - model(probe)).abs().max()), reloaded
