"""VarPro training vs Adam on separable networks: relative test error against work units.

Cases (the slides' setting: odenet_antisym, RK4 on d steps, tanh):
  cdr     the CDR surrogate (y in R^55 -> c in R^72), least squares, metric: relative test error
  digits  8x8 digits, cross-entropy, metric: test error rate (1 - accuracy)

Per seed, every optimizer starts from the same initial network. Adam trains theta and W
jointly (the baseline of the slides), best of an lr sweep (by final test error, per seed);
GNvpro runs full-batch Gauss-Newton-Krylov trust-region steps on theta with the exact W(theta);
slimtrain runs sampled-Tikhonov W + Adam on theta (CDR only). All stop at the same work-unit
budget (forward or backward pass over the training set = 1 unit). Goals, per case and seed:
  G1  GNvpro reaches Adam's final test error within <= 1/3 of Adam's work units
  G2  (cdr) GNvpro's test error at its final work units is >= 10x lower than Adam's at the same units
Also reported: the same error ratio at equal wall time, and slimtrain's at equal work units.
``--plot-from FILE[,FILE] --plot PNG`` recomputes the summaries from recorded lines and plots.
One JSON line per (case, seed, optimizer) plus a summary per case, printed and appended to
benchmarks/results/varpro.jsonl.

    python benchmarks/varpro.py --quick
    python benchmarks/varpro.py --cases cdr --seeds 3 --units 300
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

import torch
from measure import results_path  # benchmarks/measure.py (the script folder is on sys.path)

from odekit.io.cdr import load_cdr
from odekit.io.datasets import load_dataset
from odekit.methods.varpro.task import SeparableTask
from odekit.methods.varpro.training import VarProSettings, train_separable
from odekit.models.antisym import ODENetAntisym

RESULTS = results_path("varpro")
LRS = (1e-3, 3e-3, 1e-2)


def _task(case: str, samples: int) -> SeparableTask:
    if case == "cdr":
        d = load_cdr(samples)
        tm, ts = torch.tensor(d.target_mean), torch.tensor(d.target_std)
        return SeparableTask("ls", d.x_train, (d.c_train - tm) / ts, d.x_test, (d.c_test - tm) / ts, d.num_outputs)
    ds = load_dataset("digits")
    return SeparableTask("ce", ds.train.x.flatten(1), ds.train.y, ds.test.x.flatten(1), ds.test.y, ds.num_classes)


def _error(rec: dict[str, float]) -> float:
    return rec["test_rel_error"] if "test_rel_error" in rec else 1.0 - rec["test_accuracy"]


def _curve_error_at(curve: list[list[float]], x: float, col: int) -> float:
    """The test error of the last curve point at or before ``x`` (col 0: work units, 2: seconds)."""
    before = [c for c in curve if c[col] <= x + 1e-9]
    return before[-1][1] if before else math.nan


def run_case(case: str, seed: int, args: argparse.Namespace, task: SeparableTask) -> list[dict[str, Any]]:
    """Every optimizer from the same initial network; one row (with its curve) per optimizer."""
    torch.manual_seed(seed)
    net = ODENetAntisym(int(task.x_train.shape[1]), task.num_outputs, width=args.width, depth=args.depth)
    loss = task.loss
    epochs = max(1, round(args.units / 2))
    common = {"loss": loss, "max_work_units": args.units, "seed": seed, "float64": True}
    settings = {f"adam@{lr:g}": VarProSettings(optimizer="adam", epochs=epochs, lr=lr, **common) for lr in LRS}
    settings["gnvpro"] = VarProSettings(optimizer="gnvpro", iters=1000, krylov_rank=args.rank, **common)
    if loss == "ls":
        settings["slimtrain"] = VarProSettings(optimizer="slimtrain", epochs=epochs, lr=3e-3, **common)
    runs = {name: train_separable(copy.deepcopy(net), task, s, torch.device("cpu"))[1] for name, s in settings.items()}
    best_adam = min((k for k in runs if k.startswith("adam")), key=lambda k: _error(runs[k].history[-1]))
    rows = []
    for name, res in runs.items():
        last = res.history[-1]
        rows.append({"case": case, "seed": seed, "optimizer": name, "best_adam": name == best_adam,
                     "final_test_error": _error(last), "work_units": last["work_units"], "seconds": last["seconds"],
                     "curve": [[h["work_units"], round(_error(h), 6), h["seconds"]] for h in res.history]})  # fmt: skip
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Goals for one (case, seed) from its rows' curves (best Adam vs GNvpro, and slimtrain)."""
    by = {r["optimizer"]: r for r in rows}
    case, seed = rows[0]["case"], rows[0]["seed"]
    best = next(r for r in rows if r["best_adam"])
    adam, gn = best["curve"], by["gnvpro"]["curve"]
    adam_err, adam_units, adam_secs = adam[-1][1], adam[-1][0], adam[-1][2]
    hit = next((c for c in gn if c[1] <= adam_err), None)
    gn_err, gn_units, gn_secs = gn[-1][1], gn[-1][0], gn[-1][2]
    out: dict[str, Any] = {
        "case": case, "seed": seed, "summary": True, "best_adam": best["optimizer"], "adam_final_error": adam_err,
        "adam_work_units": adam_units, "adam_seconds": adam_secs, "gnvpro_final_error": gn_err,
        "gnvpro_work_units": gn_units, "gnvpro_seconds": gn_secs,
        "gnvpro_units_to_adam_error": hit[0] if hit else None, "gnvpro_seconds_to_adam_error": hit[2] if hit else None,
        "units_ratio": hit[0] / adam_units if hit else None,
        "error_ratio_at_equal_units": _curve_error_at(adam, gn_units, 0) / max(gn_err, 1e-300),
        "error_ratio_at_equal_seconds": _curve_error_at(adam, gn_secs, 2) / max(gn_err, 1e-300),
    }  # fmt: skip
    if "slimtrain" in by:
        slim = by["slimtrain"]["curve"]
        out["slimtrain_final_error"] = slim[-1][1]
        out["slimtrain_error_ratio_at_equal_units"] = _curve_error_at(adam, slim[-1][0], 0) / max(slim[-1][1], 1e-300)
    out["G1_met"] = out["units_ratio"] is not None and out["units_ratio"] <= 1 / 3
    if case == "cdr":
        out["G2_met"] = out["error_ratio_at_equal_units"] >= 10.0
    return out


def overall(case: str, summaries: list[dict[str, Any]], units: float) -> dict[str, Any]:
    ratios = [s["units_ratio"] for s in summaries if s["units_ratio"] is not None]
    out = {"case": case, "overall": True, "seeds": len(summaries), "units_budget": units,
           "G1_met_seeds": sum(s["G1_met"] for s in summaries),
           "gnvpro_reached_adam_error_seeds": len(ratios),
           "median_units_ratio": statistics.median(ratios) if ratios else None,
           "median_error_ratio_at_equal_units": statistics.median(s["error_ratio_at_equal_units"] for s in summaries),
           "median_error_ratio_at_equal_seconds": statistics.median(s["error_ratio_at_equal_seconds"] for s in summaries),
           "loadavg_end": [round(v, 2) for v in os.getloadavg()]}  # fmt: skip
    if case == "cdr":
        out["G2_met_seeds"] = sum(s["G2_met"] for s in summaries)
    return out


def plot(lines: list[dict[str, Any]], path: str) -> None:
    """Test error vs work units and vs seconds, one panel pair per case, every seed's curve."""
    from odekit.writers.plots import new_figure, save_figure

    cases = sorted({r["case"] for r in lines if "curve" in r})
    fig, axes = new_figure(2, len(cases), (5.0, 3.4))
    for row, case in enumerate(cases):
        for r in (r for r in lines if r.get("case") == case and "curve" in r):
            name = r["optimizer"]
            if name.startswith("adam") and not r["best_adam"]:
                continue
            color = {"gnvpro": "tab:red", "slimtrain": "tab:purple"}.get(name, "tab:blue")
            label = ("adam (best lr)" if name.startswith("adam") else name) if r["seed"] == 0 else None
            curve = r["curve"]
            for col, idx in ((0, 0), (1, 2)):
                axes[row][col].semilogy([c[idx] for c in curve], [c[1] for c in curve], "-", color=color, alpha=0.8, label=label)
        for col, xlabel in ((0, "work units"), (1, "seconds (evaluation excluded)")):
            ax = axes[row][col]
            ax.set_xlabel(xlabel)
            ax.set_ylabel("relative test error" if case == "cdr" else "test error rate")
            ax.set_title(case)
            ax.grid(alpha=0.3)
            ax.legend()
    save_figure(fig, path, force=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="cdr,digits")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--units", type=float, default=300.0, help="work-unit budget per optimizer")
    parser.add_argument("--samples", type=int, default=2000, help="CDR samples (80%% train)")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--rank", type=int, default=10, help="GNvpro Krylov rank r")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="1 seed, 40 work units, 600 CDR samples")
    parser.add_argument("--plot-from", default=None, help="only plot: read these JSON lines (comma-separated files)")
    parser.add_argument("--plot", default=None, help="write the convergence plot (PNG) here")
    args = parser.parse_args()
    if args.plot_from:
        rows = [json.loads(line) for f in args.plot_from.split(",") for line in Path(f).read_text().splitlines()]
        rows = [r for r in rows if "curve" in r]
        for case in sorted({r["case"] for r in rows}):
            seeds = sorted({r["seed"] for r in rows if r["case"] == case})
            summaries = [summarize([r for r in rows if r["case"] == case and r["seed"] == s]) for s in seeds]
            for line in [*summaries, overall(case, summaries, max(r["work_units"] for r in rows if r["case"] == case and r["best_adam"]))]:
                print(json.dumps(line))
        plot(rows, args.plot or "varpro.png")
        return
    if args.quick:
        args.seeds, args.units, args.samples = 1, min(args.units, 40.0), min(args.samples, 600)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    lines: list[dict[str, Any]] = []
    for case in args.cases.split(","):
        task = _task(case, args.samples)
        summaries = []
        for seed in range(args.seeds):
            rows = run_case(case, seed, args, task)
            summary = summarize(rows)
            summaries.append(summary)
            for row in [*rows, summary]:
                row["loadavg"] = [round(v, 2) for v in load]
                print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
                lines.append(row)
        lines.append(overall(case, summaries, args.units))
        print(json.dumps(lines[-1]), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as handle:
        for line in lines:
            handle.write(json.dumps(line) + "\n")
    if args.plot:
        plot(lines, args.plot)


if __name__ == "__main__":
    main()
