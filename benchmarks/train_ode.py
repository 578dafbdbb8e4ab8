"""Time to a target test metric when training neural ODEs: odekit irdm vs odekit rdm vs
torchdiffeq's odeint_adjoint (the RDM of Chen et al.), same model init, data order and process.

Cases (thesis table 2.1 is the published reference: IRDM N=16 beat RDM on every toy set):
  pinwheel  CNF, three concatsquash layers 2-H-H-2, exact trace, dopri5, Adam; target test NLL
  digits    ODENet4 (BN-LN) on 8x8 digits, dopri5, Adam; target test accuracy

Each method trains the same seeded model on the same batches with the same optimizer, all
methods in lockstep (one iteration each in turn, so machine load hits them alike);
the clock runs over training iterations only (evaluation is excluded). A method that does not
reach the target within the iteration cap reports reached=false and its time for all
iterations. NFE are counted by a wrapper around the dynamics (forward / during backward).
One JSON line per (case, method) plus a summary line per case with the time ratios versus
torchdiffeq's adjoint; all lines are printed and appended to benchmarks/results/train_ode.jsonl.

    python benchmarks/train_ode.py --quick
    python benchmarks/train_ode.py --cases pinwheel --threads 2
    python benchmarks/train_ode.py --quick --methods irdm,irdm@1e-2,torchdiffeq_adjoint
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torchdiffeq
from measure import results_path  # benchmarks/measure.py (the script folder is on sys.path)
from torch import nn

from odekit.io.datasets import load_dataset
from odekit.io.toy2d import load_toy
from odekit.methods.ode_train import evaluate_classifier, evaluate_cnf
from odekit.models import build_model
from odekit.models.ode_models import ode_blocks
from odekit.ode import SolverConfig

RESULTS = results_path("train_ode")
METHODS = ("irdm", "rdm", "torchdiffeq_adjoint")
# "+seminorm" variants (e.g. irdm+seminorm, torchdiffeq_adjoint+seminorm) leave dL/dtheta out of
# the backward step-size control (Kidger et al. 2021) for ours and torchdiffeq's alike.
SEMINORM = "+seminorm"
# "@TOL" (e.g. irdm@1e-2, torchdiffeq_adjoint@1e-2) sets rtol = atol of the backward solves.
ADJOINT_TOL = "@"


def _parse_method(method: str) -> tuple[str, bool, float | None]:
    """'irdm+seminorm@1e-2' -> ('irdm', True, 0.01)."""
    name, _, tol = method.partition(ADJOINT_TOL)
    try:
        adjoint_tol = float(tol) if tol else None
    except ValueError:
        raise SystemExit(f"cannot read the adjoint tolerance in '{method}'") from None
    return name.removesuffix(SEMINORM), name.endswith(SEMINORM), adjoint_tol


class Counted(nn.Module):
    """Counts calls of the dynamics (the parameters stay those of ``func``)."""

    def __init__(self, func: nn.Module) -> None:
        super().__init__()
        self.func = func
        self.calls = 0

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.func(t, z)


class TorchdiffeqBlock(nn.Module):
    """z0 -> z(t1) with torchdiffeq.odeint_adjoint (dopri5, same tolerances)."""

    def __init__(self, func: nn.Module, config: SolverConfig, seminorm: bool = False,
                 adjoint_tol: float | None = None) -> None:  # fmt: skip
        super().__init__()
        self.func = func
        self.config = config
        self.options = {"norm": "seminorm"} if seminorm else None
        self.adjoint = {"adjoint_rtol": adjoint_tol, "adjoint_atol": adjoint_tol} if adjoint_tol else {}

    def forward(self, z0: torch.Tensor) -> torch.Tensor:
        t = torch.tensor([0.0, self.config.t1], dtype=z0.dtype, device=z0.device)
        params = tuple(p for p in self.func.parameters() if p.requires_grad)
        out = torchdiffeq.odeint_adjoint(
            self.func, z0, t, rtol=self.config.rtol, atol=self.config.atol, method="dopri5",
            adjoint_params=params, adjoint_options=self.options, **self.adjoint,
        )  # fmt: skip
        return out[-1]


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[SolverConfig], nn.Module]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    evaluate: Callable[[nn.Module], float]
    batches: Callable[[int], list[Any]]
    target: float
    lower_is_better: bool
    config: SolverConfig
    max_iters: int
    eval_every: int


def _swap_solver(model: nn.Module, method: str) -> Counted:
    """Wrap the dynamics in a counter; torchdiffeq replaces the ODE block itself."""
    block = ode_blocks(model)[0]
    counted = Counted(block.func)
    base, seminorm, adjoint_tol = _parse_method(method)
    if base == "torchdiffeq_adjoint":
        parent = next(m for m in model.modules() if any(c is block for c in m.children()))
        name = next(n for n, c in parent.named_children() if c is block)
        setattr(parent, name, TorchdiffeqBlock(counted, block.config, seminorm, adjoint_tol))
    elif base in ("irdm", "rdm", "anode", "backprop"):
        block.func = counted
        block.config = block.config.replace(grad=base, seminorm=seminorm, adjoint_rtol=adjoint_tol,
                                            adjoint_atol=adjoint_tol)  # fmt: skip
    else:
        raise SystemExit(
            f"unknown method '{method}'; choose from {', '.join(METHODS)} (optionally {SEMINORM}, {ADJOINT_TOL}TOL)"
        )
    return counted


def pinwheel_case(quick: bool, seed: int) -> Case:
    hidden = [32, 32] if quick else [64, 64]
    tol = 1e-4 if quick else 1e-5
    toy = load_toy("pinwheel", 5000, 1000 if quick else 2000, seed)
    config = SolverConfig(solver="dopri5", rtol=tol, atol=tol)

    def build(cfg: SolverConfig) -> nn.Module:
        torch.manual_seed(seed)
        return build_model("cnf", {"hidden": hidden, "solver": cfg.to_dict()})

    def batches(n: int) -> list[Any]:
        g = torch.Generator().manual_seed(seed)
        return [toy.train[torch.randint(0, len(toy.train), (100,), generator=g)] for _ in range(n)]

    def evaluate(model: nn.Module) -> float:
        blocks = ode_blocks(model)
        if blocks:
            return evaluate_cnf(model, toy.test, torch.device("cpu"))["test_nll"]  # type: ignore[arg-type]
        with torch.no_grad():  # torchdiffeq block: same formula as CNF.log_prob
            return float(-model.log_prob(toy.test).mean())  # type: ignore[operator]

    return Case("pinwheel", build, lambda m, x: -m.log_prob(x).mean(), evaluate, batches,
                target=3.0 if quick else 2.85, lower_is_better=True, config=config,
                max_iters=300 if quick else 1500, eval_every=10 if quick else 25)  # fmt: skip


def digits_case(quick: bool, seed: int) -> Case:
    data = load_dataset("digits")
    config = SolverConfig(solver="dopri5", rtol=1e-3, atol=1e-3)
    width = 8 if quick else 16

    def build(cfg: SolverConfig) -> nn.Module:
        torch.manual_seed(seed)
        return build_model("odenet4", {"num_classes": 10, "in_channels": 1, "width": width, "pool": 2,
                                       "solver": cfg.to_dict()})  # fmt: skip

    def batches(n: int) -> list[Any]:
        g = torch.Generator().manual_seed(seed)
        out = []
        while len(out) < n:
            order = torch.randperm(len(data.train), generator=g)
            out += [(data.train.x[order[i : i + 64]], data.train.y[order[i : i + 64]]) for i in range(0, len(order), 64)]
        return out[:n]

    def evaluate(model: nn.Module) -> float:
        return evaluate_classifier(model, data.test, torch.device("cpu"))["test_accuracy"]

    return Case("digits", build, lambda m, b: F.cross_entropy(m(b[0]), b[1]), evaluate, batches,
                target=0.8 if quick else 0.9, lower_is_better=False, config=config,
                max_iters=200 if quick else 600, eval_every=10 if quick else 23)  # fmt: skip


@dataclass
class Run:
    """One method's model, optimizer and running totals."""

    method: str
    model: nn.Module
    counter: Counted
    optimizer: torch.optim.Optimizer
    seconds: float = 0.0
    nfe_f: int = 0
    nfe_b: int = 0
    iters: int = 0
    metric: float = float("nan")
    reached_at: tuple[int, float] | None = None
    done: bool = False


def run_case(case: Case, methods: list[str], cheb_nodes: int, lr: float) -> list[dict[str, Any]]:
    """Train every method in lockstep (one iteration each, in turn), so that the load of a
    shared machine hits all of them alike; each method's clock counts only its own steps."""
    runs = []
    for method in methods:
        model = case.build(case.config.replace(cheb_nodes=cheb_nodes))
        counter = _swap_solver(model, method)
        runs.append(Run(method, model, counter, torch.optim.Adam(model.parameters(), lr=lr)))
    for i, batch in enumerate(case.batches(case.max_iters), start=1):
        active = [r for r in runs if not r.done]
        if not active:
            break
        for r in active:
            r.model.train()
            start = time.perf_counter()
            before = r.counter.calls
            loss = case.loss(r.model, batch)
            mid = r.counter.calls
            r.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            r.optimizer.step()
            r.seconds += time.perf_counter() - start
            r.nfe_f += mid - before
            r.nfe_b += r.counter.calls - mid
            r.iters = i
            if not math.isfinite(float(loss.detach())):
                r.done = True
                continue
            if i % case.eval_every == 0:
                r.model.eval()
                calls = r.counter.calls
                r.metric = case.evaluate(r.model)
                r.counter.calls = calls  # evaluation NFE are not training NFE
                if (r.metric <= case.target) if case.lower_is_better else (r.metric >= case.target):
                    r.reached_at, r.done = (i, r.seconds), True
    return [_row(case, r, cheb_nodes) for r in runs]


def _row(case: Case, r: Run, cheb_nodes: int) -> dict[str, Any]:
    return {
        "case": case.name,
        "method": r.method,
        "cheb_nodes": cheb_nodes if r.method.startswith("irdm") else None,
        "target": case.target,
        "metric": "test_nll" if case.lower_is_better else "test_accuracy",
        "reached": r.reached_at is not None,
        "iters_to_target": r.reached_at[0] if r.reached_at else None,
        "seconds_to_target": round(r.reached_at[1], 3) if r.reached_at else None,
        "iterations": r.iters,
        "train_seconds": round(r.seconds, 3),
        "seconds_per_iter": round(r.seconds / max(r.iters, 1), 5),
        "nfe_forward_per_iter": round(r.nfe_f / max(r.iters, 1), 2),
        "nfe_backward_per_iter": round(r.nfe_b / max(r.iters, 1), 2),
        "final_metric": r.metric,
        "solver": f"dopri5 rtol={case.config.rtol:g} atol={case.config.atol:g}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller models, looser targets (minutes on CPU)")
    parser.add_argument("--cases", default="pinwheel,digits")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--cheb-nodes", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (shared cores: 1)")
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to results/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    builders = {"pinwheel": (pinwheel_case, 1e-2), "digits": (digits_case, 1e-2)}
    lines: list[dict[str, Any]] = []
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    for name in args.cases.split(","):
        build_case, lr = builders[name]
        case = build_case(args.quick, args.seed)
        rows = {}
        for row in run_case(case, args.methods.split(","), args.cheb_nodes, lr):
            row.update(quick=args.quick, seed=args.seed, threads=args.threads, timestamp=stamp)
            rows[row["method"]] = row
            lines.append(row)
            print(json.dumps(row), flush=True)
        summary: dict[str, Any] = {"case": name, "summary": True, "target": case.target, "quick": args.quick,
                                   "timestamp": stamp, "goal": "irdm time-to-target <= 0.7 x torchdiffeq adjoint"}  # fmt: skip
        for method in [m for m in rows if not m.startswith("torchdiffeq")]:
            row = rows[method]
            _, seminorm, adjoint_tol = _parse_method(method)
            # The peer with the same variant if it ran (same seminorm and adjoint tolerance),
            # else the closest one.
            suffix_tol = f"{ADJOINT_TOL}{method.partition(ADJOINT_TOL)[2]}" if adjoint_tol else ""
            suffix_semi = SEMINORM if seminorm else ""
            candidates = [f"torchdiffeq_adjoint{suffix_semi}{suffix_tol}", f"torchdiffeq_adjoint{suffix_tol}",
                          f"torchdiffeq_adjoint{suffix_semi}", "torchdiffeq_adjoint"]  # fmt: skip
            peer = next((rows[c] for c in candidates if c in rows), None)
            if peer is None:
                continue
            label = f"{method}_vs_{peer['method'].replace('torchdiffeq_', '')}"
            if row["reached"] and peer["reached"]:
                summary[f"{label}_time"] = round(row["seconds_to_target"] / peer["seconds_to_target"], 3)
            summary[f"{label}_seconds_per_iter"] = round(row["seconds_per_iter"] / max(peer["seconds_per_iter"], 1e-12), 3)
        if "irdm_vs_adjoint_time" in summary:
            summary["goal_met"] = summary["irdm_vs_adjoint_time"] <= 0.7
        lines.append(summary)
        print(json.dumps(summary), flush=True)
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as handle:
            for line in lines:
                handle.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
