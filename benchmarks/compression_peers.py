"""odekit's channel reduction against the compressors a user would pick instead (issue 26).

    .venv/bin/python benchmarks/compression_peers.py --quick                      # a few minutes
    .venv/bin/python benchmarks/compression_peers.py --models vgg19,resnet20 --budgets 1.7,2.6,4,8,16

Teachers are trained briefly on digits at 3x32x32 (ResNet-20: the shipped 1x32x32 checkpoint)
and cached under odekit-runs/compression_peers/. At every FLOPs budget, in one process, on the
same images:

* ``odekit``: ``reduce --mode channel --target-flops 1/B`` (the global greedy and the uniform
  widths, the one with the lower validation KL kept; maxvol pick, least-squares reconstruction
  to the teacher, BatchNorm recalibrated);
* ``odekit-l1pick``: odekit's widths, channels picked by L1 norm instead of maxvol;
* ``thinet``: uniform widths, L1 pick, the same layer-wise least-squares reconstruction;
* ``tp-l1-global`` / ``tp-l1-uniform``: Torch-Pruning magnitude (L1) pruning + recalibration;
* ``svd``: per-layer truncated SVD (k x k conv -> r channels + 1x1 conv; linear -> two) + recal.

Each peer's ratio is bisected to odekit's FLOPs. Recorded per method: accuracy, agreement and
mean KL to the teacher on the test split, FLOPs, parameters, latency (teacher and student
interleaved), compression wall time (ratio search and recalibration included), then the same
after one epoch of the same fine-tuning loop (``train_classifier``, distilled). One JSON line
per (model, budget, method) in benchmarks/results/compression_peers.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from measure import (  # benchmarks/measure.py (the script folder is on sys.path)
    emit_line,
    results_path,
)
from torch import nn

from odekit.errors import UsageError
from odekit.io.checkpoints import load_model
from odekit.io.datasets import Dataset, load_dataset
from odekit.methods.batchnorm import recalibrate_batchnorm
from odekit.methods.evaluation import accuracy, agreement, compare_latency, model_cost
from odekit.methods.ron.channel import plan_channels, reduce_channels
from odekit.methods.ron.channel_budget import cost_model, measure_sensitivity
from odekit.methods.ron.channel_build import build_within_budget, holdout
from odekit.methods.ron.settings import RonSettings
from odekit.methods.training import TrainSettings, train_classifier

ROOT = Path(__file__).resolve().parent.parent
RESULTS = results_path("compression_peers")
CACHE = ROOT / "odekit-runs" / "compression_peers"
CPU = torch.device("cpu")
MODELS = ("vgg19", "resnet20", "resnet18", "mobilenet_v2", "vit")
BUDGETS = (1.7, 2.6, 4.0, 8.0, 16.0)
METHODS = ("odekit", "odekit-l1pick", "thinet", "tp-l1-global", "tp-l1-uniform", "svd")


# ----------------------------------------------------------------------------- teachers


def _digits(shape: tuple[int, ...]) -> Dataset:
    return load_dataset("digits", input_shape=shape, normalization={"mean": [0.0], "std": [1.0]})


def _build(name: str, quick: bool, vgg_width_div: int) -> nn.Module:
    import torchvision

    if name == "vgg19":
        sys.path.insert(0, str(ROOT / "tests" / "foreign"))
        from zoo import KuangliuVGG  # the user's VGG-19 of benchmarks/vgg19_reduce.py

        return KuangliuVGG("VGG19", num_classes=10, width_div=4 if quick else vgg_width_div)
    if name == "resnet18":
        return torchvision.models.resnet18(num_classes=10)
    if name == "mobilenet_v2":
        return torchvision.models.mobilenet_v2(num_classes=10)
    if name == "vit":
        return torchvision.models.VisionTransformer(
            image_size=32,
            patch_size=4,
            num_layers=4,
            num_heads=4,
            hidden_dim=128,
            mlp_dim=256,
            num_classes=10,
        )
    raise SystemExit(f"unknown model {name}")


def teacher(
    name: str, quick: bool, epochs: int, vgg_width_div: int = 1
) -> tuple[nn.Module, Dataset, tuple[int, ...], dict[str, Any]]:
    """The cached (or freshly trained) teacher, its data and input shape."""
    if name == "resnet20":
        loaded = load_model(ROOT / "checkpoints" / "resnet20_digits.safetensors")
        meta = loaded.meta
        data = load_dataset(
            "digits",
            input_shape=tuple(meta.input_shape or (1, 32, 32)),
            normalization=meta.normalization,
        )
        return loaded.model.eval(), data, tuple(data.input_shape), {"train_seconds": None}
    shape = (3, 32, 32)
    data = _digits(shape)
    torch.manual_seed(0)  # the same teacher in every process (the cache is per process's disk)
    model = _build(name, quick, vgg_width_div)
    width = f"-w{vgg_width_div}" if name == "vgg19" and vgg_width_div > 1 else ""
    path = CACHE / f"{name}{width}{'-quick' if quick else ''}-e{epochs}.pt"
    info: dict[str, Any] = {"train_seconds": None, "cached": path.exists()}
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        start = time.perf_counter()
        one_cycle(model, data, epochs)
        info["train_seconds"] = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval(), data, shape, info


def one_cycle(model: nn.Module, data: Dataset, epochs: int) -> None:
    """The teacher recipe of benchmarks/vgg19_reduce.py: Adam, one-cycle to 2e-3, batch 64, seeded."""
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = epochs * ((len(data.train) + 63) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=max(steps, 1))
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for x, y in data.train.batches(64, shuffle=True, generator=generator):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            schedule.step()
    model.eval()


# ----------------------------------------------------------------------------- peers


def _classifier(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def torch_pruning(
    model: nn.Module, shape: tuple[int, ...], ratio: float, global_pruning: bool
) -> nn.Module:
    import torch_pruning as tp

    student = copy.deepcopy(model).eval()
    ignored = [_classifier(student)]
    heads: dict[nn.Module, int] = {}
    for m in student.modules():
        if isinstance(m, nn.MultiheadAttention):
            heads[m] = m.num_heads
    extra: dict[str, Any] = {"num_heads": heads} if heads else {}
    pruner = tp.pruner.MagnitudePruner(
        student, torch.zeros(1, *shape), importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=ratio, ignored_layers=ignored, global_pruning=global_pruning, **extra,
    )  # fmt: skip
    pruner.step()
    return student


def _svd_conv(conv: nn.Conv2d, keep: float) -> nn.Module:
    o, c, kh, kw = conv.weight.shape
    full = min(o, c * kh * kw)
    r = max(1, round(keep * full))
    if r * (c * kh * kw + o) >= o * c * kh * kw:
        return conv  # no saving at this rank
    u, s, vh = torch.linalg.svd(conv.weight.detach().reshape(o, -1), full_matrices=False)
    first = nn.Conv2d(c, r, (kh, kw), conv.stride, conv.padding, conv.dilation, bias=False)
    first.weight.data = (s[:r, None] * vh[:r]).reshape(r, c, kh, kw)
    second = nn.Conv2d(r, o, 1, bias=conv.bias is not None)
    second.weight.data = u[:, :r].reshape(o, r, 1, 1).clone()
    if conv.bias is not None:
        second.bias.data = conv.bias.detach().clone()
    return nn.Sequential(first, second)


def _svd_linear(lin: nn.Linear, keep: float) -> nn.Module:
    o, c = lin.weight.shape
    r = max(1, round(keep * min(o, c)))
    if r * (c + o) >= o * c:
        return lin
    u, s, vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    first, second = nn.Linear(c, r, bias=False), nn.Linear(r, o, bias=lin.bias is not None)
    first.weight.data = s[:r, None] * vh[:r]
    second.weight.data = u[:, :r].clone()
    if lin.bias is not None:
        second.bias.data = lin.bias.detach().clone()
    return nn.Sequential(first, second)


def truncated_svd(model: nn.Module, shape: tuple[int, ...], keep: float) -> nn.Module:
    student = copy.deepcopy(model).eval()
    last = _classifier(student)
    for parent in list(student.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d) and child.groups == 1:
                setattr(parent, name, _svd_conv(child, keep))
            elif (
                isinstance(child, nn.Linear)
                and child is not last
                and type(parent).__name__ != "MultiheadAttention"
            ):
                setattr(parent, name, _svd_linear(child, keep))
    return student


def bisect_ratio(
    make: Callable[[float], nn.Module],
    shape: tuple[int, ...],
    target: float,
    lo: float,
    hi: float,
    more_is_smaller: bool,
) -> tuple[nn.Module, float]:
    """The ratio in [lo, hi] whose student's FLOPs come closest to ``target`` from below-or-near."""
    best: tuple[float, nn.Module, float] | None = None
    for _ in range(12):
        mid = (lo + hi) / 2
        student = make(mid)
        flops = model_cost(student, shape).flops
        gap = abs(flops - target) / target
        if best is None or gap < best[0]:
            best = (gap, student, mid)
        if gap < 0.01:
            break
        if (flops > target) == more_is_smaller:
            lo = mid
        else:
            hi = mid
    assert best is not None
    return best[1], best[2]


# ----------------------------------------------------------------------------- measurement


def measure(
    teacher_m: nn.Module, student: nn.Module, data: Dataset, shape: tuple[int, ...], repeats: int
) -> dict[str, Any]:
    student.eval()
    cost, t_cost = model_cost(student, shape), model_cost(teacher_m, shape)
    agree = agreement(teacher_m, student, data.test)
    lat = compare_latency(teacher_m, student, data.test.x[:64], CPU, repeats=repeats)
    return {
        "accuracy": accuracy(student, data.test), "agreement": agree["agreement"], "mean_kl": agree["mean_kl"],
        "flops": cost.flops, "params": cost.params, "flop_reduction": t_cost.flops / cost.flops,
        "param_reduction": t_cost.params / max(cost.params, 1), "latency_speedup": lat.speedup,
    }  # fmt: skip


def finetuned(
    teacher_m: nn.Module, student: nn.Module, data: Dataset, shape: tuple[int, ...], repeats: int
) -> dict[str, Any]:
    tuned = copy.deepcopy(student)
    train_classifier(
        tuned,
        data,
        TrainSettings(epochs=1, lr=1e-4, batch_size=64, beta=0.1, seed=0),
        CPU,
        teacher=teacher_m,
    )
    return measure(teacher_m, tuned.eval(), data, shape, repeats)


def odekit_students(
    teacher_m: nn.Module,
    data: Dataset,
    shape: tuple[int, ...],
    budget: float,
    plan_cache: dict[str, Any],
    samples: int,
    methods: set[str],
) -> dict[str, tuple[nn.Module, float]]:
    """odekit (what `reduce --mode channel --target-flops` runs: the better of the greedy and the
    uniform widths on the validation split), odekit's widths with an L1 pick, and the
    uniform-width ThiNet-style peer (L1 pick, the same least-squares reconstruction)."""
    settings = RonSettings(mode="channel", target_flops=1.0 / budget, samples=samples)
    fit, val = holdout(data.train, settings, 0)
    start = time.perf_counter()
    if "plan" not in plan_cache:  # the sensitivities do not depend on the budget: measured once
        plan = plan_channels(teacher_m, shape)
        plan_cache.update(
            plan=plan,
            model=cost_model(plan),
            sens=measure_sensitivity(plan, fit.x, val.x, 256, CPU),
        )
        plan_cache["sens_seconds"] = time.perf_counter() - start
    plan, model = plan_cache["plan"], plan_cache["model"]
    start = time.perf_counter()
    built, alloc = build_within_budget(plan, model, plan_cache["sens"], fit, val, settings, CPU)
    out = {"odekit": (built.student, time.perf_counter() - start + plan_cache["sens_seconds"])}
    plan_cache["candidates"] = built.budget.get("candidates")
    if "odekit-l1pick" in methods:
        start = time.perf_counter()
        l1 = reduce_channels(plan, fit.x, settings, CPU, alloc.widths, selection="l1").student
        out["odekit-l1pick"] = (l1, time.perf_counter() - start + plan_cache["sens_seconds"])
    if "thinet" in methods:
        start = time.perf_counter()
        target = model.cost({g.index: g.channels for g in plan.reducible})[0] / budget

        def uniform(frac: float) -> dict[int, int]:
            return {g.index: max(1, round(frac * g.channels)) for g in plan.reducible}

        lo, hi = 0.0, 1.0
        for _ in range(30):  # the predicted FLOPs are exact: bisect them, build once
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if model.cost(uniform(mid))[0] < target else (lo, mid)
        thinet = reduce_channels(plan, fit.x, settings, CPU, uniform(hi), selection="l1").student
        out["thinet"] = (thinet, time.perf_counter() - start)
    return out


def peer_students(
    teacher_m: nn.Module, data: Dataset, shape: tuple[int, ...], target: float, methods: set[str]
) -> dict[str, tuple[nn.Module, float]]:
    out: dict[str, tuple[nn.Module, float]] = {}
    recal_x = data.train.subset(512, seed=0).x
    for method in ("tp-l1-global", "tp-l1-uniform", "svd"):
        if method not in methods:
            continue
        start = time.perf_counter()
        try:
            if method == "svd":
                student, _ = bisect_ratio(
                    lambda k: truncated_svd(teacher_m, shape, k), shape, target, 0.0, 1.0, False
                )
            else:
                glob = method == "tp-l1-global"
                student, _ = bisect_ratio(
                    lambda r, g=glob: torch_pruning(teacher_m, shape, r, g),
                    shape,
                    target,
                    0.0,
                    0.99,
                    True,
                )
        except (
            Exception
        ) as exc:  # a peer that cannot handle the architecture is recorded, not fatal
            print(f"  {method}: failed ({type(exc).__name__}: {str(exc)[:120]})", file=sys.stderr)
            continue
        recalibrate_batchnorm(student, recal_x)
        out[method] = (student, time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="quarter-width VGG-19, 2 budgets, no fine-tuning"
    )
    parser.add_argument("--models", default="vgg19,resnet20")
    parser.add_argument(
        "--budgets", default=None, help="FLOPs reduction factors, e.g. 1.7,2.6,4,8,16"
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--finetune",
        action="store_true",
        help="also one epoch of the same fine-tuning for every method",
    )
    parser.add_argument("--epochs", type=int, default=None, help="teacher training epochs")
    parser.add_argument("--repeats", type=int, default=10, help="interleaved latency repetitions")
    parser.add_argument("--vgg-width-div", type=int, default=1, help="VGG-19 channels divided by this")
    parser.add_argument(
        "--fit-samples", type=int, default=None, help="odekit's fitting images [512; quick 256]"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    budgets = (
        [float(b) for b in args.budgets.split(",")]
        if args.budgets
        else ([2.6, 8.0] if args.quick else list(BUDGETS))
    )
    methods = set(args.methods.split(","))
    epochs = args.epochs or (3 if args.quick else 6)
    for name in args.models.split(","):
        teacher_m, data, shape, info = teacher(name, args.quick, epochs, args.vgg_width_div)
        t_acc = accuracy(teacher_m, data.test)
        print(f"{name}: teacher {100 * t_acc:.2f}% ({info})", file=sys.stderr)
        t_flops = model_cost(teacher_m, shape).flops
        cache: dict[str, Any] = {}
        for budget in budgets:
            try:
                students = odekit_students(
                    teacher_m,
                    data,
                    shape,
                    budget,
                    cache,
                    args.fit_samples or (256 if args.quick else 512),
                    methods,
                )
            except UsageError as exc:  # e.g. a budget beyond the reducible groups (the ViT past 1.76x)
                print(f"  {budget:>5}x skipped: {exc}", file=sys.stderr)
                emit_line(RESULTS, json.dumps({"model": name, "budget": budget, "skipped": str(exc)}))
                continue
            target = model_cost(students["odekit"][0], shape).flops
            students.update(peer_students(teacher_m, data, shape, target, methods))
            for method, (student, seconds) in students.items():
                if method not in methods:
                    continue
                record = {"model": name, "budget": budget, "method": method, "teacher_accuracy": t_acc,
                          "threads": torch.get_num_threads(),
                          "candidates": cache.get("candidates") if method == "odekit" else None,
                          "teacher_flops": t_flops, "quick": args.quick, "compress_seconds": seconds,
                          "no_finetune": measure(teacher_m, student, data, shape, args.repeats)}  # fmt: skip
                if args.finetune:
                    record["finetune_1_epoch"] = finetuned(
                        teacher_m, student, data, shape, args.repeats
                    )
                emit_line(RESULTS, json.dumps(record))
                nf = record["no_finetune"]
                print(f"  {budget:>5}x {method:<14} acc {100 * nf['accuracy']:.2f}% agree {100 * nf['agreement']:.2f}% "
                      f"kl {nf['mean_kl']:.4f} flops {nf['flop_reduction']:.2f}x params {nf['param_reduction']:.2f}x "
                      f"lat {nf['latency_speedup']:.2f}x {seconds:.1f}s", file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main()
