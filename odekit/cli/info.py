"""`odekit info`: the layer table that every --layers option resolves against."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from odekit.cli.errors import captured_warnings, report_exception
from odekit.cli.names import ARCHITECTURE_NAMES
from odekit.cli.options import (
    ArchArgsOpt,
    ArchOpt,
    CheckpointArg,
    DataDirOpt,
    DataOpt,
    DebugOpt,
    JsonOpt,
    NumClassesOpt,
    ThreadsOpt,
    TrustOpt,
)
from odekit.errors import UsageError
from odekit.io.preprocessing import parse_input_shape

EPILOG = """Examples:

  odekit info checkpoints/vgg11_digits.safetensors

  odekit info checkpoints/lenet300_digits.safetensors --json | jq '.layers[].flops'

  odekit info resnet20.pt --arch resnet20 --num-classes 10

  odekit info vgg19_state.pth --arch myvgg.py:VGG --arch-args '{{"vgg_name": "VGG19"}}' --input-shape 3,32,32

  odekit info model.pt2   (torch.export archive: no code or options needed; docs/own-models.md)

  odekit info model_script.pt --data my_data.npz   (TorchScript/pickle: the input shape is --data's)

FLOPs are 2 x multiply-adds per sample (torch FlopCounterMode's convention): the rows count conv/linear
layers (attention projections included); attention's own matmuls are the 'other ops' line of the total.

Architectures for --arch: {archs}
"""

EPILOG = EPILOG.format(archs=", ".join(ARCHITECTURE_NAMES))


def info_command(
    checkpoint: CheckpointArg,
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    trust_checkpoint: TrustOpt = False,
    arch_args: ArchArgsOpt = None,
    input_shape: Annotated[
        str | None,
        typer.Option(
            "--input-shape",
            help="Input shape C,H,W (or D) when the checkpoint does not record it (TorchScript, pickles) [default: --data's].",
        ),
    ] = None,
    data: DataOpt = None,
    data_dir: DataDirOpt = None,
    json_output: JsonOpt = False,
    debug: DebugOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """List a model's compute layers (index, name, type, shapes, params, FLOPs)."""
    from odekit.device import set_threads
    from odekit.io.checkpoints import load_model
    from odekit.io.user_arch import parse_arch_args
    from odekit.models.layers import OTHER_OPS, layer_table
    from odekit.writers.report import to_jsonable

    try:
        with captured_warnings(debug):
            set_threads(threads)
            loaded = load_model(
                checkpoint, arch=arch, num_classes=num_classes, trust_checkpoint=trust_checkpoint,
                arch_args=parse_arch_args(arch_args),
            )
            shape = _input_shape(input_shape, loaded.input_shape, data, data_dir)
            summary = layer_table(loaded.model, shape)
            groups = _channel_groups(loaded.model, tuple(shape))
    except (Exception, KeyboardInterrupt) as exc:
        raise typer.Exit(report_exception(exc, debug)) from None
    payload = {
        "checkpoint": str(checkpoint),
        "arch": loaded.meta.arch,
        "format": loaded.format,
        "num_classes": loaded.meta.num_classes,
        **summary.to_dict(),
        "channel_groups": groups,
    }
    if json_output:
        print(json.dumps(to_jsonable(payload), indent=2))
        return
    console = Console(file=sys.stdout, width=max(Console(file=sys.stdout).width, 120))
    table = Table(title=f"{checkpoint} ({loaded.meta.arch}, input {list(shape)})", title_justify="left")
    for header in ("#", "alias", "name", "type", "in_shape", "out_shape", "params", "FLOPs"):
        table.add_column(header, justify="right" if header in ("#", "params", "FLOPs") else "left")
    for layer in summary.layers:
        calls = f" (x{layer.calls})" if layer.calls > 1 else ""
        table.add_row(
            str(layer.index), layer.alias, layer.name, layer.type, _shape(layer.in_shape), _shape(layer.out_shape),
            f"{layer.params:,}", f"{layer.flops:,}{calls}",
        )
    console.print(table)
    if summary.other_flops:
        console.print(
            f"rows: {summary.layer_flops:,} FLOPs + other ops: {summary.other_flops:,} FLOPs ({OTHER_OPS})", highlight=False
        )
    console.print(
        f"total: {summary.params:,} parameters, {summary.flops:,} FLOPs per sample (2 x multiply-adds)", highlight=False
    )
    if groups is not None:
        kept = [g for g in groups if not g["reducible"]]
        console.print(
            f"channel groups (reduce --mode channel): {len(groups) - len(kept)} reducible, {len(kept)} kept at full "
            "width" + (": " + "; ".join(f"{g['name']} ({g['blocked']})" for g in kept) if kept else ""),
            highlight=False,
        )


def _channel_groups(model: Any, shape: tuple[int, ...]) -> list[dict[str, Any]] | None:
    """The channel groups `reduce --mode channel` would see, or None when the model does not trace."""
    from odekit.errors import OdekitError
    from odekit.models.channel_groups import channel_groups
    from odekit.models.graph import trace_graph

    try:
        return [g.to_dict() for g in channel_groups(trace_graph(model, shape), shape)]
    except (OdekitError, RuntimeError, TypeError, ValueError):
        return None


def _input_shape(
    option: str | None, recorded: tuple[int, ...] | None, data: str | None, data_dir: Path | None
) -> tuple[int, ...]:
    """--input-shape, else the checkpoint's own (metadata, a .pt2 graph), else the shape of --data's samples."""
    if option:
        return parse_input_shape(option)
    if recorded is not None:
        return recorded
    if data is None:
        raise UsageError(
            "the checkpoint does not record its input shape (TorchScript and pickled models do not)",
            "pass --input-shape C,H,W, or --data with the data it takes (its samples' shape is used)",
        )
    from odekit.io.datasets import load_dataset

    return tuple(load_dataset(data, data_dir=data_dir).input_shape)


def _shape(shape: list[int]) -> str:
    return "x".join(str(s) for s in shape)

