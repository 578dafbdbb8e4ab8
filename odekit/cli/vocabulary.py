"""One CLI vocabulary (issue 12): the glossary every command follows and the old spellings it replaced.

`docs/cli.md` renders `GLOSSARY`; `app.OdekitGroup` rewrites a deprecated spelling to its new
name before parsing and prints one note on stderr, so old command lines keep working.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

GLOSSARY = (
    ("CHECKPOINT", "a model file: .safetensors, .pt/.pth state dict or pickled model, TorchScript, torch.export .pt2"),
    ("--fit-samples N", "training-split samples a method fits on (reduce's SVDs, asnet's gradients and PCE, "
     "attack's universal vector) [default: all, attack: 200]"),
    ("--eval-samples N", "test-split samples a result is measured on (train-ode, smoothness-check, attack) "
     "[default: all]"),
    ("--iters N", "iterations of an iterative algorithm: training iterations (train-ode), attack iterations "
     "(PGD, DeepFool, ADef); --max-iters is a limit the method may stop before"),
    ("--train-samples, --test-samples, --data-size N", "sizes of data sets train-ode generates (2-D toys, "
     "cdr), not subsets of a stored split"),
    ("--steps N", "ODE solver steps over [0, t1] (train-ode, smoothness-check); never attack iterations"),
    ("--eps F", "per-sample attack budget, a norm in [0, 1]-pixel units (attack only)"),
    ("--delta F", "universal attack budget ||v||, an l2 or linf norm in [0, 1]-pixel units (attack only)"),
    ("--energy-tol F", "asnet's active-neuron threshold: the smallest r with ||(s_1..s_r)|| >= (1 - F) ||s|| "
     "(eq. 6.17)"),
    ("--rank RULE", "vbmf | energy:F (keep fraction F of sum s_i^2) | factor:F (R = ceil(D/F)) | an integer, "
     "in reduce and asnet alike; reduce also takes a comma list (one per layer output), asnet also auto "
     "(the --energy-tol rule)"),
    ("--sketch-size N", "rows of a frequent-directions sketch; a rank rule is clipped to it"),
    ("--batch-size N", "samples per forward/backward batch [256 wherever it only streams or evaluates "
     "(memory, not results); train-ode: the training batch, 64]"),
    ("--lr F", "learning rate: fine-tuning in reduce and asnet [1e-4, Adam, cosine schedule, no warm-up, thesis "
     "6.5.1; measured: on ResNet-20 layers 8-13 one epoch at 3e-5 and 1e-4 ends at 98.6% and 98.3%, at 3e-4 "
     "at 97.5%, at 1e-3 at 93.6% (5 points lost in the first epoch; 2 on VGG-11), and a warm-up did not help; "
     "VGG-19 layers 7-16 reaches 98.6% after one epoch at 1e-4; see docs/finetuning.md]; training from scratch in train-ode [1e-2]"),
    ("--beta F", "distillation weight of fine-tuning: beta KL(teacher||student) + (1-beta) CE [0.1, eq. 6.29; "
     "temperature 1: beta 0.5 and 0.9 and temperature 4 gave the same accuracy within one test digit on "
     "ResNet-20] (reduce, asnet)"),
    ("--val-fraction F", "training samples held out (seeded) to score fine-tuning before its first epoch and "
     "after each; the best-scoring model is kept, the untuned one included [0.1; never the test split] "
     "(reduce, asnet)"),
    ("--patience N", "stop fine-tuning after N epochs without a better validation score [off] (reduce, asnet)"),
    ("--recalibrate-bn", "re-estimate the statistics of BatchNorms whose inputs a compression changed before "
     "scoring or fine-tuning, undone if validation drops [on] (reduce)"),
    ("--seed N", "one seed for data order, subsets, sampling and initialisation"),
)  # fmt: skip

# command -> {old spelling: new spelling}; old spellings are accepted with a note on stderr
DEPRECATED: dict[str, dict[str, str]] = {
    "reduce": {"--samples": "--fit-samples"},
    "asnet": {"--samples": "--fit-samples", "--eps": "--energy-tol"},
    "smoothness-check": {"--samples": "--eval-samples"},
    "attack": {"--steps": "--iters", "--max-iter": "--max-iters"},
    "train-ode": {"--samples": "--data-size"},
}


def rewrite_deprecated(
    command: str, args: list[str], warn: Callable[[str], None] | None = None
) -> list[str]:
    """``args`` with the command's deprecated option spellings replaced (one note per spelling)."""
    table = DEPRECATED.get(command, {})
    if not table:
        return args
    say = warn or (lambda line: print(line, file=sys.stderr))
    out: list[str] = []
    noted: set[str] = set()
    for arg in args:
        if arg == "--":
            out += args[len(out):]
            break
        name, sep, value = arg.partition("=")
        new = table.get(name)
        if new is not None:
            if name not in noted:
                say(f"odekit {command}: {name} is deprecated, use {new} (the old spelling still works for now)")
                noted.add(name)
            arg = f"{new}{sep}{value}"
        out.append(arg)
    return out
