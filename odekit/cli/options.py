"""Option aliases shared by every subcommand (one definition, same help text everywhere)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from odekit.device import DEVICE_CHOICES

COMMON = "Common options"
MODEL = "Model options"
DATA = "Data options"

CheckpointArg = Annotated[
    Path,
    typer.Argument(help="Model checkpoint: .safetensors, .pt/.pth state dict or TorchScript archive.", show_default=False),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help=f"Where to compute: {'|'.join(DEVICE_CHOICES)}.", rich_help_panel=COMMON)
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (data order, sampling, init).", rich_help_panel=COMMON)]


def _out_folder(text: str) -> Path:
    """--out as given; an empty string would silently mean the working directory (issue 17)."""
    if not text.strip():
        raise typer.BadParameter("an empty path would write into the current folder; give a folder (or '.')")
    return Path(text)


OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out", "-o", parser=_out_folder, metavar="PATH", help="Output folder [default: odekit-runs/COMMAND-NAME-TIME].", show_default=False, rich_help_panel=COMMON
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.", rich_help_panel=COMMON)]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the report as JSON on stdout, nothing else.", rich_help_panel=COMMON)
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.", rich_help_panel=COMMON)]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="CPU threads for torch's intra-op parallelism [default: physical cores, capped by OMP_NUM_THREADS].",
        show_default=False,
        rich_help_panel=COMMON,
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option("--arch", help="Architecture of a checkpoint without odekit metadata (see 'odekit info --help').", rich_help_panel=MODEL),
]
NumClassesOpt = Annotated[
    int | None, typer.Option("--num-classes", min=1, help="Number of classes, with --arch.", rich_help_panel=MODEL)
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-checkpoint",
        help="Allow unpickling whole model objects (runs code from the file; only for files you trust).",
        rich_help_panel=MODEL,
    ),
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="digits | cifar10 | cifar100 | mnist | fashion-mnist | svhn | imagefolder | PATH.npz [default: the checkpoint's own].",
        show_default=False,
        rich_help_panel=DATA,
    ),
]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Folder holding the data set's files (never downloaded).", rich_help_panel=DATA)
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Batch size for streaming and evaluation.", rich_help_panel=DATA)]


@dataclass(frozen=True)
class CommonOptions:
    """The options every subcommand shares, gathered once."""

    device: str = "auto"
    seed: int = 0
    out: Path | None = None
    force: bool = False
    json: bool = False
    debug: bool = False
    threads: int | None = None


@dataclass(frozen=True)
class ModelOptions:
    checkpoint: Path
    arch: str | None = None
    num_classes: int | None = None
    trust_checkpoint: bool = False
