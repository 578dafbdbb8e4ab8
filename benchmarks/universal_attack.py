"""Universal attacks side by side: active subspace (ours, thesis Algorithm 4) vs our UAP vs
adversarial-robustness-toolbox's UniversalPerturbation (DeepFool attacker) vs random.

Same model, same fitting samples (a seeded draw from the training split), same l2 budget in
[0, 1] pixel units, one process; fooling rates are scored by the same code on the held-out test
split (prediction changed, x + v clipped to [0, 1]). Prints one JSON line per case and one
summary line per (model, delta), and appends them to benchmarks/results/universal_attack.jsonl.

    python benchmarks/universal_attack.py --quick
    python benchmarks/universal_attack.py --models lenet300,lenet5 --deltas 2,3,4 --seeds 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from measure import results_path  # benchmarks/measure.py (the script folder is on sys.path)

from odekit.io.checkpoints import load_model
from odekit.io.datasets import dataset_for_model
from odekit.methods.attacks import (
    ActiveSubspaceAttack,
    ActiveSubspaceSettings,
    RandomAttack,
    UAPAttack,
    UAPSettings,
    UniversalSettings,
    evaluate_universal,
    fooling_rate,
    lp_norm,
    pixel_model,
    predict_on,
    project,
    to_pixels,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = results_path("universal_attack")
METHODS = ("active-subspace", "uap", "art-uap", "random")


def art_uap(
    model: torch.nn.Module, x: torch.Tensor, delta: float, max_passes: int, seed: int
) -> torch.Tensor:
    """ART's UniversalPerturbation with its DeepFool attacker, settings matched to our UAP."""
    from art.attacks.evasion import UniversalPerturbation
    from art.estimators.classification import PyTorchClassifier

    np.random.seed(seed)  # ART shuffles with numpy's global generator
    clf = PyTorchClassifier(
        model,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=10,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )
    attack = UniversalPerturbation(
        clf,
        attacker="deepfool",
        attacker_params={"max_iter": 10, "epsilon": 0.02, "verbose": False},
        delta=0.2,
        max_iter=max_passes,
        eps=delta,
        norm=2,
        verbose=False,
    )
    attack.generate(x.numpy())
    v = torch.as_tensor(attack.noise, dtype=torch.float32).reshape(x.shape[1:])
    # ART projects before its own clipping; project again so every method obeys the same ball
    return project(v.unsqueeze(0), "2", delta).squeeze(0)


def run_case(
    name: str,
    model: torch.nn.Module,
    x_fit: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    method: str,
    delta: float,
    seed: int,
    max_passes: int,
) -> dict[str, object]:
    clean_fit = predict_on(model, x_fit)
    start = time.perf_counter()
    if method == "active-subspace":
        v = ActiveSubspaceAttack(ActiveSubspaceSettings(norm="2", delta=delta))(
            model, x_fit, seed=seed
        ).v
    elif method == "uap":
        v = UAPAttack(UAPSettings(norm="2", delta=delta, max_passes=max_passes))(
            model, x_fit, seed=seed
        ).v
    elif method == "art-uap":
        v = art_uap(model, x_fit, delta, max_passes, seed)
    else:
        v = RandomAttack(UniversalSettings(norm="2", delta=delta))(model, x_fit, seed=seed).v
    seconds = time.perf_counter() - start
    test = evaluate_universal(model, x_test, y_test, v)
    return {
        "bench": "universal_attack",
        "model": name,
        "method": method,
        "delta_pixel_l2": delta,
        "seed": seed,
        "fit_samples": len(x_fit),
        "test_samples": len(x_test),
        "norm_pixel": lp_norm(v, "2"),
        "fooling_rate_fit": fooling_rate(model, x_fit, v, clean_fit),
        "fooling_rate_test": test["fooling_rate"],
        "robust_accuracy_test": test["robust_accuracy"],
        "seconds": seconds,
    }


def summarise(cases: list[dict[str, object]], name: str, delta: float) -> dict[str, object]:
    out: dict[str, object] = {
        "bench": "universal_attack",
        "summary": True,
        "model": name,
        "delta_pixel_l2": delta,
        "fit_samples": cases[0]["fit_samples"] if cases else None,
    }
    means = {}
    for method in METHODS:
        rows = [c for c in cases if c["method"] == method]
        if not rows:
            continue
        test = [float(c["fooling_rate_test"]) for c in rows]
        fit = [float(c["fooling_rate_fit"]) for c in rows]
        secs = [float(c["seconds"]) for c in rows]
        means[method] = (statistics.mean(test), statistics.mean(secs))
        out[method] = {
            "fooling_rate_test_mean": statistics.mean(test),
            "fooling_rate_test_std": statistics.stdev(test) if len(test) > 1 else 0.0,
            "fooling_rate_fit_mean": statistics.mean(fit),
            "seconds_mean": statistics.mean(secs),
            "seeds": len(rows),
        }
    if "active-subspace" in means:
        as_rate, as_secs = means["active-subspace"]
        for peer in ("uap", "art-uap"):
            if peer in means:
                out[f"as_minus_{peer}_points"] = 100 * (as_rate - means[peer][0])
                out[f"speedup_vs_{peer}"] = means[peer][1] / max(as_secs, 1e-9)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="lenet300 only, deltas 2,4, 2 seeds, 100 fit samples"
    )
    parser.add_argument(
        "--models",
        default="lenet300,lenet5",
        help="shipped digits models (checkpoints/NAME_digits.safetensors)",
    )
    parser.add_argument(
        "--deltas", default="2,3,4", help="l2 budgets in [0,1] pixel units, weak to strong"
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--fit-samples", type=int, default=200)
    parser.add_argument(
        "--max-passes", type=int, default=10, help="UAP passes, ours and ART (thesis: 10)"
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)"
    )
    parser.add_argument(
        "--no-save", action="store_true", help="print only, do not append to the results file"
    )
    args = parser.parse_args()
    if args.quick:
        args.models, args.deltas, args.seeds, args.fit_samples = "lenet300", "2,4", 2, 100
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    deltas = [float(d) for d in args.deltas.split(",")]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    env = {
        "time": stamp,
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "quick": args.quick,
    }
    lines = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        loaded = load_model(ROOT / "checkpoints" / f"{name}_digits.safetensors")
        data = dataset_for_model(
            loaded.meta.input_shape, loaded.meta.normalization, loaded.meta.dataset
        )
        model = pixel_model(loaded.model, data)
        x_test, y_test = to_pixels(data.test.x, data), data.test.y
        for delta in deltas:
            cases = []
            for seed in range(args.seeds):
                x_fit = to_pixels(data.train.subset(args.fit_samples, seed=seed).x, data)
                for method in methods:
                    case = {
                        **run_case(
                            name, model, x_fit, x_test, y_test, method, delta, seed, args.max_passes
                        ),
                        **env,
                    }
                    print(json.dumps(case), flush=True)
                    cases.append(case)
                    lines.append(case)
            summary = {**summarise(cases, name, delta), **env}
            print(json.dumps(summary), flush=True)
            lines.append(summary)
            if not args.no_save:  # append as we go: a long run that is cut short keeps its results
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                with RESULTS.open("a") as handle:
                    handle.writelines(json.dumps(line) + "\n" for line in lines)
                lines = []


if __name__ == "__main__":
    main()
