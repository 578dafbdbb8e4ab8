"""Choice names for help texts and docs, importable without torch (issue 12: `--help` stays fast).

The registries live in modules that load torch; these mirrors let `odekit COMMAND --help` list
the choices without loading them. `tests/cli/test_fast_start.py` fails when a mirror and its
registry disagree, so add a registry entry here too.
"""

from __future__ import annotations

DEVICE_CHOICES = ("auto", "cpu", "cuda")
SOLVER_NAMES = ("euler", "rk2", "rk4", "dopri5")
GRADIENT_METHOD_NAMES = ("backprop", "rdm", "anode", "irdm")
TOY_DATASET_NAMES = ("2spirals", "pinwheel", "moons", "circles", "checkerboard")
ARCHITECTURE_NAMES = (
    "mlp", "lenet300", "lenet5",
    "vgg11", "vgg11_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "tv-vgg11", "tv-vgg11_bn", "tv-vgg13", "tv-vgg13_bn", "tv-vgg16", "tv-vgg16_bn", "tv-vgg19", "tv-vgg19_bn",
    "tv-resnet18", "tv-resnet34", "tv-resnet50", "tv-resnet101", "tv-resnet152",
)  # fmt: skip
RANK_RULE_HELP = (
    ("vbmf", "analytic empirical VBMF (Nakajima et al. 2013), noise variance estimated"),
    ("energy", "smallest R keeping the given fraction of sum s_i^2, e.g. energy:0.99"),
    ("factor", "R = ceil(D / F): layer width reduced F times, e.g. factor:4"),
)
ATTACK_HELP = (
    ("active-subspace", "universal: recursive active-subspace direction (thesis Algorithm 4)"),
    ("as+uap", "universal: UAP passes started from the active-subspace vector (and its negative)"),
    ("as-k", "universal: best vector of the top-k active subspace (projected gradient steps)"),
    ("uap", "universal: UAP (Moosavi-Dezfooli et al. 2017), DeepFool steps accumulated"),
    ("random", "universal baseline: Gaussian direction scaled to the budget norm"),
    ("fgsm", "per-sample: fast gradient (sign) method, one step"),
    ("pgd", "per-sample: projected gradient descent, random start, restarts"),
    ("deepfool", "per-sample: DeepFool minimal perturbation, restricted to eps"),
    ("adef", "per-sample: ADef adversarial deformation (smooth vector field), T-norm budget"),
)
ACTIVATION_NAMES = ("relu", "tanh", "softplus", "elu")
NORM_CHOICES = (("bn", "batch norm"), ("ln", "layer norm"), ("wn", "weight norm"), ("sn", "spectral norm"), ("none", ""))
TRACE_MODE_NAMES = ("auto", "exact", "hutchinson")
REGIME_HELP = (
    ("standalone", "one fixed solver (the --solver/--u given)"),
    ("switching", "RK2(u), u drawn uniformly from --u-set every iteration"),
    ("smoothing", "RK2(u), u ~ Normal(--u-mean, --u-std) redrawn into (0, 1] every iteration"),
    ("ensembling", "RK2: the block returns the weighted mean of the solves with every u in --u-set"),
)


def help_line(entries: tuple[tuple[str, str], ...]) -> str:
    """'name: description; ...', the form `Registry.help_text` gives."""
    return "; ".join(f"{name}: {description}" if description else name for name, description in entries)


def names(entries: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    return tuple(name for name, _ in entries)
