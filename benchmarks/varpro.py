"""VarPro training vs Adam on separable networks: work units to reach Adam's final test error.

Cases (the slides' setting: odenet_antisym, RK4 on d steps, tanh, multilevel d -> 2d -> 4d):
  cdr            steady CDR surrogate (y in R^55 -> c in R^72, standardised targets), 1,600/400
                 samples, width 16, depth 1 -> 2 -> 4, alpha_theta = alpha_W = 1e-3
  cdr-transient  the paper's regime: time-dependent CDR, 400 train / 200 test (200 validation
                 held out), raw targets, width 8, depth 2 -> 4 -> 8, alpha = 1e-10
  digits         8x8 digits, cross-entropy, metric: test error rate (1 - accuracy)

Per seed every optimizer starts from the same network and runs the same multilevel schedule
with the same budget per level (``--level-units`` passes of that level's network; a pass of a
shallower network counts steps / final steps units, so the total is level_units x 1.75 for
three levels): Adam (theta and W jointly, batch 64, best lr of 1e-3, 3e-3, 1e-2 -- cdr-transient:
3e-3, 1e-2, 3e-2 -- by final test error, per seed), GNvpro (Steihaug-CG, r = 10, radius0 0.1), GNvpro with the paper's step
(gmres-subspace, m = 20, radius0 = the full GN step), L-BFGS on the reduced objective
(2 units per evaluation) and slimtrain (least squares only). The default level budget,
220 = 10 outer GNvpro iterations x (2 + 2r), is the paper's practice of 10 iterations per level.
Goal (per seed): GNvpro reaches Adam's final test error within <= 1/3 of Adam's work units.
``--plot-from FILE[,FILE] --plot PNG`` recomputes the summaries from recorded lines and plots.
One JSON line per (case, seed, optimizer) plus a summary per seed and case, printed and
appended to benchmarks/results/varpro.jsonl.

    python benchmarks/varpro.py --quick
    python benchmarks/varpro.py --cases cdr,cdr-transient --seeds 3
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

from odekit.io.cdr import load_regression
from odekit.io.datasets import load_dataset
from odekit.methods.varpro.diagnosis import diagnose
from odekit.methods.varpro.task import SeparableTask
from odekit.methods.varpro.training import VarProSettings, train_separable
from odekit.models.antisym import ODENetAntisym

RESULTS = results_path("varpro")
LRS = {"cdr-transient": (3e-3, 1e-2, 3e-2)}  # Adam's lr grid per case (else 1e-3, 3e-3, 1e-2)
PEERS = ("gnvpro", "gnvpro-gmres", "lbfgs", "slimtrain")
# width, first depth, alpha (theta and W), regression samples (None: the data set's default)
CASES: dict[str, tuple[int, int, float, int | None]] = {
    "cdr": (16, 1, 1e-3, 2000), "cdr-transient": (8, 2, 1e-10, None), "digits": (16, 1, 1e-3, None),
}


def _task(case: str, samples: int | None) -> SeparableTask:
    if case == "digits":
        ds = load_dataset("digits")
        return SeparableTask("ce", ds.train.x.flatten(1), ds.train.y, ds.test.x.flatten(1), ds.test.y, ds.num_classes)
    d = load_regression(case, samples=samples)
    tm, ts = torch.tensor(d.target_mean), torch.tensor(d.target_std)
    return SeparableTask("ls", d.x_train, (d.c_train - tm) / ts, d.x_test, (d.c_test - tm) / ts, d.num_outputs)


def _error(rec: dict[str, float]) -> float:
    return rec["test_rel_error"] if "test_rel_error" in rec else 1.0 - rec["test_accuracy"]


def _curve_error_at(curve: list[list[float]], x: float, col: int) -> float:
    """The test error of the last curve point at or before ``x`` (col 0: work units, 2: seconds)."""
    before = [c for c in curve if c[col] <= x + 1e-9]
    return before[-1][1] if before else math.nan


def _settings(case: str, task: SeparableTask, seed: int, args: argparse.Namespace, alpha: float) -> dict[str, VarProSettings]:
    """One schedule for all: ``levels`` levels, ``level_units`` per level (iteration caps far above it)."""
    common = {"loss": task.loss, "max_work_units": args.units, "level_units": args.level_units, "levels": args.levels,
              "seed": seed, "float64": True, "alpha_theta": alpha, "alpha_w": max(alpha, 1e-10)}  # fmt: skip
    big = 100_000
    out = {f"adam@{lr:g}": VarProSettings(optimizer="adam", epochs=big, lr=lr, **common) for lr in LRS.get(case, (1e-3, 3e-3, 1e-2))}
    wanted = args.optimizers.split(",")
    if "gnvpro" in wanted:
        out["gnvpro"] = VarProSettings(optimizer="gnvpro", iters=big, krylov_rank=args.rank, radius=0.1, **common)
    if "gnvpro-gmres" in wanted:
        out["gnvpro-gmres"] = VarProSettings(optimizer="gnvpro", tr_solver="gmres-subspace", iters=big, krylov_rank=args.gmres_rank, **common)
    if "lbfgs" in wanted:
        out["lbfgs"] = VarProSettings(optimizer="lbfgs", iters=big, **common)
    if "slimtrain" in wanted and task.loss == "ls":
        out["slimtrain"] = VarProSettings(optimizer="slimtrain", epochs=big, lr=3e-3, **common)
    return out


def run_case(case: str, seed: int, args: argparse.Namespace, task: SeparableTask) -> list[dict[str, Any]]:
    """Every optimizer from the same initial network; one row (with its curve) per optimizer."""
    width, depth, alpha, _ = CASES[case]
    torch.manual_seed(seed)
    net = ODENetAntisym(int(task.x_train.shape[1]), task.num_outputs, width=args.width or width, depth=args.depth or depth)
    runs = {name: train_separable(copy.deepcopy(net), task, s, torch.device("cpu"))[1]
            for name, s in _settings(case, task, seed, args, alpha).items()}  # fmt: skip
    best_adam = min((k for k in runs if k.startswith("adam")), key=lambda k: _error(runs[k].history[-1]))
    rows = []
    for name, res in runs.items():
        last = res.history[-1]
        row = {"case": case, "seed": seed, "optimizer": name, "best_adam": name == best_adam,
               "final_test_error": _error(last), "final_train_loss": last["train_loss"], "work_units": last["work_units"],
               "seconds": last["seconds"], "curve": [[h["work_units"], round(_error(h), 6), h["seconds"]] for h in res.history]}  # fmt: skip
        if name.startswith("gnvpro"):
            row["diagnosis"] = diagnose(res.history).to_dict()
        rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (case, seed): work units each peer needs to reach the best Adam's final test error."""
    by = {r["optimizer"]: r for r in rows}
    case, seed = rows[0]["case"], rows[0]["seed"]
    best = next(r for r in rows if r["best_adam"])
    adam = best["curve"]
    adam_err, adam_units, adam_secs = adam[-1][1], adam[-1][0], adam[-1][2]
    out: dict[str, Any] = {"case": case, "seed": seed, "summary": True, "best_adam": best["optimizer"],
                           "adam_final_error": adam_err, "adam_work_units": adam_units, "adam_seconds": adam_secs}  # fmt: skip
    for name in PEERS:
        if name not in by:
            continue
        curve = by[name]["curve"]
        hit = next((c for c in curve if c[1] <= adam_err), None)
        out[name] = {"final_error": curve[-1][1], "work_units": curve[-1][0], "seconds": curve[-1][2],
                     "units_to_adam_error": hit[0] if hit else None, "units_ratio": hit[0] / adam_units if hit else None,
                     "error_ratio_at_equal_units": _curve_error_at(adam, curve[-1][0], 0) / max(curve[-1][1], 1e-300),
                     "error_ratio_at_equal_seconds": _curve_error_at(adam, curve[-1][2], 2) / max(curve[-1][1], 1e-300)}  # fmt: skip
        if "diagnosis" in by[name]:
            out[name]["diagnosis"] = by[name]["diagnosis"]
    gn = out.get("gnvpro", {})
    out["G1_met"] = gn.get("units_ratio") is not None and gn["units_ratio"] <= 1 / 3
    return out


def overall(case: str, summaries: list[dict[str, Any]], level_units: float) -> dict[str, Any]:
    out: dict[str, Any] = {"case": case, "overall": True, "seeds": len(summaries), "level_units": level_units,
                           "G1_met_seeds": sum(s["G1_met"] for s in summaries),
                           "adam_final_error_median": statistics.median(s["adam_final_error"] for s in summaries),
                           "loadavg_end": [round(v, 2) for v in os.getloadavg()]}  # fmt: skip
    for name in PEERS:
        got = [s[name] for s in summaries if name in s]
        if not got:
            continue
        ratios = [g["units_ratio"] for g in got if g["units_ratio"] is not None]
        out[name] = {"reached_seeds": len(ratios), "median_units_ratio": statistics.median(ratios) if ratios else None,
                     "median_final_error": statistics.median(g["final_error"] for g in got)}  # fmt: skip
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
            color = {"gnvpro": "tab:red", "gnvpro-gmres": "tab:orange", "lbfgs": "tab:green", "slimtrain": "tab:purple"}.get(name, "tab:blue")
            label = ("adam (best lr)" if name.startswith("adam") else name) if r["seed"] == 0 else None
            curve = r["curve"]
            for col, idx in ((0, 0), (1, 2)):
                axes[row][col].semilogy([c[idx] for c in curve], [c[1] for c in curve], "-", color=color, alpha=0.8, label=label)
        for col, xlabel in ((0, "work units"), (1, "seconds (evaluation excluded)")):
            ax = axes[row][col]
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test error rate" if case == "digits" else "relative test error")
            ax.set_title(case)
            ax.grid(alpha=0.3)
            ax.legend()
    save_figure(fig, path, force=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="cdr,cdr-transient")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--optimizers", default=",".join(PEERS), help="peers of Adam (comma-separated)")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--level-units", type=float, default=220.0, help="work units per level (passes of its network)")
    parser.add_argument("--units", type=float, default=None, help="optional cap on the total work units")
    parser.add_argument("--samples", type=int, default=None, help="regression samples [cdr 2000, cdr-transient 800]")
    parser.add_argument("--width", type=int, default=None, help="[per case]")
    parser.add_argument("--depth", type=int, default=None, help="first level's depth [per case]")
    parser.add_argument("--rank", type=int, default=10, help="GNvpro (Steihaug) Krylov rank r")
    parser.add_argument("--gmres-rank", type=int, default=20, help="GNvpro (gmres-subspace) basis size m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 levels of 24 work units, 600 CDR samples")
    parser.add_argument("--plot-from", default=None, help="only plot: read these JSON lines (comma-separated files)")
    parser.add_argument("--plot", default=None, help="write the convergence plot (PNG) here")
    args = parser.parse_args()
    if args.plot_from:
        rows = [json.loads(line) for f in args.plot_from.split(",") for line in Path(f).read_text().splitlines()]
        rows = [r for r in rows if "curve" in r]
        for case in sorted({r["case"] for r in rows}):
            seeds = sorted({r["seed"] for r in rows if r["case"] == case})
            summaries = [summarize([r for r in rows if r["case"] == case and r["seed"] == s]) for s in seeds]
            for line in [*summaries, overall(case, summaries, args.level_units)]:
                print(json.dumps(line))
        plot(rows, args.plot or "varpro.png")
        return
    if args.quick:
        args.seeds, args.levels, args.level_units = 1, 2, min(args.level_units, 24.0)
        args.samples = min(args.samples or 600, 600)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    lines: list[dict[str, Any]] = []
    for case in args.cases.split(","):
        task = _task(case, args.samples if case == "cdr" or args.quick else CASES[case][3])
        summaries = []
        for seed in range(args.seeds):
            rows = run_case(case, seed, args, task)
            summary = summarize(rows)
            summaries.append(summary)
            for row in [*rows, summary]:
                row["loadavg"] = [round(v, 2) for v in load]
                print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
                lines.append(row)
        lines.append(overall(case, summaries, args.level_units))
        print(json.dumps(lines[-1]), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as handle:
        for line in lines:
            handle.write(json.dumps(line) + "\n")
    if args.plot:
        plot(lines, args.plot)


if __name__ == "__main__":
    main()
