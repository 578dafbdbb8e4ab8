"""`odekit certify`: l2 Lipschitz bounds per layer and for the network, certified radii and
accuracy beside the attacks' robust accuracy; a student beside its teacher with --compare."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from odekit.cli.options import (
    STREAM_BATCH_SIZE,
    ArchArgsOpt,
    ArchOpt,
    BatchSizeOpt,
    CheckpointArg,
    CommonOptions,
    DataDirOpt,
    DataOpt,
    DebugOpt,
    DeviceOpt,
    ForceOpt,
    InputShapeOpt,
    JsonOpt,
    LayoutOpt,
    ModelOptions,
    NormalizeOpt,
    NumClassesOpt,
    OutOpt,
    PixelMaxOpt,
    SeedOpt,
    ThreadsOpt,
    TrustOpt,
)
from odekit.cli.runner import CommandContext, CommandOutput, run_command
from odekit.io.preprocessing import Preprocessing

if TYPE_CHECKING:  # loaded by the command body, so `--help` never imports torch (issue 12)
    from torch import nn

    from odekit.io.datasets import Dataset

CERTIFY = "Certificate options"

EPILOG = """Examples:

  odekit certify checkpoints/lenet5_digits.safetensors

  odekit certify checkpoints/vgg11_digits.safetensors --eps 0.05,0.1,0.25 --eval-samples 200 --json

  odekit certify student.pt2 --compare checkpoints/vgg11_digits.safetensors --layers 3-8

  odekit certify model.pt2 --data cifar10 --data-dir DIR --no-attack --iters 8

Bounds: every conv layer gets [power iteration, Gram-iteration bound] on its spectral norm
(BatchNorm folded into the conv before it), linear layers their exact norm (SVD), activations
and pooling their constants; residual sums add, the network bound L is propagated through the
traced graph. Certified radius r = margin / (sqrt(2) L) in [0, 1]-pixel l2 units (like the
attacks' --eps); empirical radii from DeepFool and l2 PGD (--pgd-steps) at every budget.
Per budget: certified accuracy <= robust accuracy under attack <= clean accuracy.
LayerNorm, attention and other operations without a global constant are refused in one line.
Writes certify.png (accuracy vs budget), layers.png, report.json and report.md.
"""


# `reduce --certify` / `asnet --certify`: the student's certificate beside the teacher's
CERTIFY_SAMPLES = 200
CertifyFlag = Annotated[bool, typer.Option(
    "--certify", help=f"Also bound the Lipschitz constants of student and teacher and their certified l2 accuracy on "
    f"{CERTIFY_SAMPLES} test samples, side by side (as 'odekit certify STUDENT --compare TEACHER --no-attack').",
    rich_help_panel=CERTIFY)]  # fmt: skip


def certify_student(student: nn.Module, teacher: nn.Module, dataset: Dataset, ctx: CommandContext) -> dict[str, Any]:
    """report.json's ``certify`` entry of reduce/asnet: bounds and certified accuracy of both."""
    from odekit.api.certify import run_certify
    from odekit.methods.certify.certificate import CertifySettings
    from odekit.methods.certify.ops import NotCertifiable

    try:
        result = run_certify(student, dataset, CertifySettings(attack=False), ctx.device, teacher=teacher,
                             names=("student", "teacher"), samples=CERTIFY_SAMPLES, seed=ctx.seed, params={},
                             inputs={})  # fmt: skip
    except NotCertifiable as exc:  # the compression itself succeeded: say why there is no certificate
        ctx.log(f"[yellow]Warning:[/yellow] --certify: {exc.message}")
        return {"not_certifiable": exc.message}
    runs = result.certificates
    return {"student_lipschitz_upper": runs["student"].network.upper,
            "teacher_lipschitz_upper": runs["teacher"].network.upper,
            "student_certified_accuracy": runs["student"].certificate.to_dict()["certified_accuracy"],
            "teacher_certified_accuracy": runs["teacher"].certificate.to_dict()["certified_accuracy"],
            "comparison": result.results["comparison"]}  # fmt: skip


def _budgets(text: str) -> tuple[float, ...]:
    from odekit.methods.attacks.plan import parse_budgets

    return tuple(parse_budgets(text, "--eps"))


def certify_command(
    checkpoint: CheckpointArg,
    compare: Annotated[Path | None, typer.Option("--compare", help="Teacher checkpoint: certify both on the same samples, side by side.", show_default=False, rich_help_panel=CERTIFY)] = None,
    norm: Annotated[str, typer.Option("--norm", help="Perturbation norm: 2 (l2 certificates).", rich_help_panel=CERTIFY)] = "2",
    eps: Annotated[str, typer.Option("--eps", help="l2 budgets in [0, 1]-pixel units, comma-separated (fractions allowed).", rich_help_panel=CERTIFY)] = "0.01,0.02,0.05,0.1,0.25,0.5",
    layers: Annotated[str | None, typer.Option("--layers", help="Also report the product of these layers' bounds (e.g. 3-8, conv7-conv16).", show_default=False, rich_help_panel=CERTIFY)] = None,
    iters: Annotated[int, typer.Option("--iters", help="Gram iterations per conv bound (6 is within ~1% of the limit).", rich_help_panel=CERTIFY)] = 6,
    power_iters: Annotated[int, typer.Option("--power-iters", help="Power iterations per layer lower bound.", rich_help_panel=CERTIFY)] = 30,
    attack: Annotated[bool, typer.Option("--attack/--no-attack", help="Measure empirical radii (DeepFool + l2 PGD at every budget).", rich_help_panel=CERTIFY)] = True,
    pgd_steps: Annotated[int, typer.Option("--pgd-steps", help="l2 PGD steps per budget.", rich_help_panel=CERTIFY)] = 20,
    samples: Annotated[int | None, typer.Option("--eval-samples", min=1, help="Test samples (seeded subset) [default: all].", show_default=False)] = None,
    data: DataOpt = None,
    data_dir: DataDirOpt = None,
    batch_size: BatchSizeOpt = STREAM_BATCH_SIZE,
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    trust_checkpoint: TrustOpt = False,
    arch_args: ArchArgsOpt = None,
    normalize: NormalizeOpt = None,
    input_shape: InputShapeOpt = None,
    layout: LayoutOpt = "auto",
    pixel_max: PixelMaxOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    out: OutOpt = None,
    force: ForceOpt = False,
    json_output: JsonOpt = False,
    debug: DebugOpt = False,
    threads: ThreadsOpt = None,
) -> None:  # fmt: skip
    """Certified l2 robustness from Lipschitz bounds, next to the attacks; teacher vs student."""
    common = CommonOptions(device=device, seed=seed, out=out, force=force, json=json_output, debug=debug, threads=threads)
    params = {"norm": norm, "eps": eps, "layers": layers, "iters": iters, "power_iters": power_iters, "attack": attack,
              "pgd_steps": pgd_steps, "samples": samples, "data": data, "batch_size": batch_size, "seed": seed}  # fmt: skip

    def body(ctx: CommandContext) -> CommandOutput:
        from odekit.api.certify import check_teacher_shape, run_certify
        from odekit.cli.common import load_checkpoint, load_data, require_python_module
        from odekit.cli.errors import cli_text
        from odekit.methods.certify.certificate import CertifySettings

        settings = CertifySettings(_budgets(eps), norm.strip(), iters, power_iters, pgd_steps, attack=attack,
                                   batch_size=batch_size, layers=layers)  # fmt: skip
        paths = {name: ctx.path(name) for name in ("certify.png", "layers.png")}
        prep = Preprocessing.from_options(normalize, input_shape, layout, pixel_max)
        loaded = load_checkpoint(ctx, ModelOptions(checkpoint, arch, num_classes, trust_checkpoint, arch_args))
        require_python_module(loaded, "certify")  # bounds need the traced graph
        dataset = load_data(ctx, loaded, data, data_dir, prep=prep)
        teacher = None
        if compare is not None:
            teacher = load_checkpoint(ctx, ModelOptions(compare, None, None, trust_checkpoint, None), key="teacher")
            require_python_module(teacher, "certify")
            check_teacher_shape(teacher.meta.input_shape, dataset.input_shape)
        result = run_certify(loaded.model, dataset, settings, ctx.device, teacher=teacher.model if teacher else None,
                             names=(checkpoint.name, compare.name if compare else "teacher"), samples=samples,
                             seed=seed, params=ctx.params, inputs=ctx.inputs, progress=ctx.progress)  # fmt: skip
        written = result.write_outputs(paths.__getitem__, ctx.force)
        return CommandOutput(results={**result.results, **written}, tables=result.tables,
                             headline=[cli_text(line) for line in result.headline])  # fmt: skip

    run_command("certify", common, inputs={}, params=params, body=body, run_name=checkpoint.stem)
