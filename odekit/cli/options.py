"""Option aliases shared by every subcommand (one definition, same help text everywhere)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from odekit.api.defaults import (
    DISTILLATION_BETA,
    EXPORT_FORMATS,
    FINETUNE_LR,
    STREAM_BATCH_SIZE,
    VAL_FRACTION,
)
from odekit.cli.names import DEVICE_CHOICES

__all__ = ["DISTILLATION_BETA", "FINETUNE_LR", "STREAM_BATCH_SIZE", "VAL_FRACTION"]

COMMON = "Common options"
MODEL = "Model options"
DATA = "Data options"

CheckpointArg = Annotated[
    Path,
    typer.Argument(
        help="Model checkpoint: .safetensors, .pt/.pth state dict or pickled model, TorchScript or torch.export (.pt2) archive.",
        show_default=False,
        metavar="CHECKPOINT",
    ),
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
    typer.Option(
        "--arch",
        help="Architecture of a checkpoint without odekit metadata: a zoo name (see 'odekit info --help'), "
        "torchvision:NAME, module.path:Name or path/to/file.py:Name (docs/own-models.md).",
        rich_help_panel=MODEL,
    ),
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
    arch_args: str | None = None


# --- issue 11: bring your own model, explicit preprocessing ---
ArchArgsOpt = Annotated[
    str | None,
    typer.Option(
        "--arch-args",
        help='Keyword arguments for --arch as a JSON object, e.g. \'{"num_classes": 10}\'.',
        show_default=False,
        rich_help_panel=MODEL,
    ),
]
NormalizeOpt = Annotated[
    str | None,
    typer.Option(
        "--normalize",
        help="Input normalisation: data (train-split mean/std) | none ([0,1] pixels) | MEAN,STD | M1,M2,M3/S1,S2,S3 "
        "[default: the checkpoint's own; none without odekit metadata; data when training from scratch].",
        show_default=False,
        rich_help_panel=DATA,
    ),
]
InputShapeOpt = Annotated[
    str | None,
    typer.Option(
        "--input-shape",
        help="Model input shape C,H,W (or D); images are resized to it [default: the checkpoint's own, else the data's].",
        show_default=False,
        rich_help_panel=DATA,
    ),
]
LayoutOpt = Annotated[
    str,
    typer.Option(
        "--layout", help="Axis order of .npz image arrays: auto | NCHW | NHWC (auto: channels-last if the last axis is 1, 3 or 4).",
        rich_help_panel=DATA,
    ),
]
PixelMaxOpt = Annotated[
    float | None,
    typer.Option(
        "--pixel-max",
        help="Value of a white pixel in .npz arrays (pixels are divided by it) [default: 255 for uint8, 1 for floats].",
        show_default=False,
        rich_help_panel=DATA,
    ),
]


# --- issue 12: one default per word (docs/cli.md glossary) ---
FINETUNE = "Fine-tuning options"

FinetuneLrOpt = Annotated[
    float,
    typer.Option(
        "--lr",
        help="Fine-tuning learning rate (Adam, cosine schedule; thesis: 1e-4 for VGG).",
        rich_help_panel=FINETUNE,
    ),
]
BetaOpt = Annotated[
    float,
    typer.Option(
        "--beta",
        help="Distillation weight of the fine-tuning loss: beta KL(teacher||student) + (1-beta) CE (thesis eq. 6.29).",
        rich_help_panel=FINETUNE,
    ),
]
ValFractionOpt = Annotated[
    float,
    typer.Option(
        "--val-fraction",
        help="Training samples held out (seeded) to score every epoch and keep the best model, the untuned "
        "one included; 0: no validation, the last epoch is kept. Never the test split.",
        rich_help_panel=FINETUNE,
    ),
]
PatienceOpt = Annotated[
    int | None,
    typer.Option(
        "--patience",
        help="Stop fine-tuning after this many epochs without a better validation score [default: run every epoch].",
        show_default=False,
        rich_help_panel=FINETUNE,
    ),
]
RecalibrateBnOpt = Annotated[
    bool,
    typer.Option(
        "--recalibrate-bn/--no-recalibrate-bn",
        help="Re-estimate the statistics of the BatchNorms whose inputs changed (a no-gradient pass over the "
        "training images) before evaluating or fine-tuning; undone if validation gets worse.",
        rich_help_panel=FINETUNE,
    ),
]

# --- issue 22: deployment formats ---
ExportOpt = Annotated[
    str | None,
    typer.Option(
        "--export",
        help=f"Also write the compressed model as {' | '.join(EXPORT_FORMATS)} (dynamic batch), checked in onnxruntime "
        "against PyTorch and timed in both runtimes beside the teacher. Needs odekit[onnx].",
        show_default=False,
    ),
]
