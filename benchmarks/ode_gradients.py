"""ODE gradient methods side by side: odekit (irdm, rdm, anode, backprop) vs torchdiffeq
(odeint_adjoint, odeint), same model, data, tolerances and process.

Cases: a 2-D CNF toy (three concatsquash layers 2-64-64-2, exact trace, moons data,
thesis 2.5.1.2) and an ODENet-style conv block on 8x8 digits (sklearn load_digits).

Per training iteration (forward + loss + gradient, same parameters each repetition):
  wall_s       median wall time (torch.set_num_threads(1) by default: shared CPU cores)
  nfe_f/nfe_b  f evaluations counted by a wrapper around the dynamics, forward / backward
  peak_mb      CPU: peak bytes of tensors held by autograd over forward+backward, counted with
               torch.autograd.graph.saved_tensors_hooks (deduplicated by storage, parameters
               excluded), measured in a separate untimed iteration; CUDA: max_memory_allocated
  grad_rel_err ||g - g_ref|| / ||g_ref|| over all parameter gradients, g_ref from float64
               backprop (torchdiffeq odeint, dopri5, rtol = atol = 1e-10)
One JSON line per (case, method) plus one summary line per case with the goal ratios, to stdout
and to benchmarks/results/ode_gradients.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
import weakref
from pathlib import Path

import torch
import torchdiffeq
from torch import nn

from odekit.ode import odeint

RESULTS = Path(__file__).resolve().parent / "results" / "ode_gradients.jsonl"


# ------------------------------------------------------------------ models


class ConcatSquash(nn.Module):
    """(W z + b1) * sigmoid(t c + b2) + t b3 (thesis eq. 2.20)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)
        self.gate = nn.Linear(1, d_out)
        self.hyper_bias = nn.Linear(1, d_out, bias=False)

    def forward(self, t, z):
        tt = t.reshape(1, 1).to(z)
        return self.lin(z) * torch.sigmoid(self.gate(tt)) + self.hyper_bias(tt)


class CNFFunc(nn.Module):
    """State [z (2), delta logp (1)]; d/dt = [g(t, z), -tr(dg/dz)] with the exact trace."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [ConcatSquash(2, hidden), ConcatSquash(hidden, hidden), ConcatSquash(hidden, 2)]
        )

    def forward(self, t, state):
        graph = torch.is_grad_enabled()
        with torch.enable_grad():
            z = state[:, :2]
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            h = z
            for i, layer in enumerate(self.layers):
                h = layer(t, h)
                if i < len(self.layers) - 1:
                    h = torch.tanh(h)
            trace = sum(
                torch.autograd.grad(h[:, i].sum(), z, create_graph=True)[0][:, i]
                for i in range(2)
            )
            out = torch.cat([h, -trace.unsqueeze(1)], dim=1)
        return out if graph else out.detach()


class ConvFunc(nn.Module):
    """ODENet block: conv -> tanh -> conv, each with a time channel (concat conv)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c + 1, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c + 1, c, 3, padding=1)

    def _cat(self, t, z):
        return torch.cat([z, t.to(z).expand(z.shape[0], 1, *z.shape[2:])], dim=1)

    def forward(self, t, z):
        h = torch.tanh(self.conv1(self._cat(t, z)))
        return self.conv2(self._cat(t, h))


class Counter(nn.Module):
    """Counts calls of the wrapped dynamics (the NFE every implementation is judged by)."""

    def __init__(self, func: nn.Module) -> None:
        super().__init__()
        self.func = func
        self.calls = 0

    def forward(self, t, z):
        self.calls += 1
        return self.func(t, z)


class CNF(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.odefunc = Counter(CNFFunc(64))

    def loss(self, x, integrate):
        state = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)
        out = integrate(self.odefunc, state)
        z, delta = out[:, :2], out[:, 2]
        logp = -0.5 * (z**2).sum(1) - math.log(2 * math.pi) - delta
        return -logp.mean()


class DigitsODENet(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.GroupNorm(4, c), nn.ReLU())
        self.odefunc = Counter(ConvFunc(c))
        self.head = nn.Linear(c, 10)

    def loss(self, xy, integrate):
        x, y = xy
        z = integrate(self.odefunc, self.stem(x))
        return nn.functional.cross_entropy(self.head(z.mean(dim=(2, 3))), y)


def moons(n: int, seed: int) -> torch.Tensor:
    from sklearn.datasets import make_moons

    x, _ = make_moons(n_samples=n, noise=0.05, random_state=seed)
    x = (x - x.mean(0)) / x.std(0)
    return torch.tensor(x, dtype=torch.float32)


def digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    return x, torch.tensor(d.target[:n])


# ------------------------------------------------------------------ memory accounting


class _Held:
    __slots__ = ("__weakref__", "t")

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class SavedBytes:
    """Live bytes of autograd-saved tensors, deduplicated by storage; tracks the peak."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.live: dict[int, list[int]] = {}
        self.cur = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        ent = self.live[key]
        ent[0] -= 1
        if ent[0] == 0:
            self.cur -= ent[1]
            del self.live[key]

    def pack(self, t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key in self.exclude or key == 0:
            return t
        held = _Held(t)
        ent = self.live.get(key)
        if ent is None:
            self.live[key] = [1, t.untyped_storage().nbytes()]
            self.cur += self.live[key][1]
            self.peak = max(self.peak, self.cur)
        else:
            ent[0] += 1
        weakref.finalize(held, self._release, key)
        return held

    @staticmethod
    def unpack(h):
        return h.t if isinstance(h, _Held) else h


# ------------------------------------------------------------------ methods


def make_methods(rtol: float, atol: float, cheb: int):
    t = torch.tensor([0.0, 1.0])
    out = {}
    for grad in ("irdm", "rdm", "anode", "backprop"):
        out[f"odekit-{grad}"] = (
            lambda f, z0, g=grad: odeint(f, z0, t, grad=g, rtol=rtol, atol=atol,
                                         cheb_nodes=cheb).z[-1]
        )
    out["odekit-irdm-seminorm"] = lambda f, z0: odeint(
        f, z0, t, grad="irdm", rtol=rtol, atol=atol, cheb_nodes=cheb, seminorm=True).z[-1]
    out["torchdiffeq-adjoint"] = lambda f, z0: torchdiffeq.odeint_adjoint(
        f, z0, t.to(z0), rtol=rtol, atol=atol, method="dopri5")[-1]
    out["torchdiffeq-odeint"] = lambda f, z0: torchdiffeq.odeint(
        f, z0, t.to(z0), rtol=rtol, atol=atol, method="dopri5")[-1]
    return out


def flat_grads(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([
        (g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params,
                                                                                   strict=True)
    ])


def pretrain(model: nn.Module, batch, iters: int, lr: float) -> float:
    """A few Adam steps (odekit backprop, rtol = atol = 1e-4) so the dynamics are not the
    near-trivial ones of a random initialisation; returns the last loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    t = torch.tensor([0.0, 1.0])
    loss = torch.tensor(float("nan"))
    for _ in range(iters):
        opt.zero_grad()
        loss = model.loss(batch, lambda f, z0: odeint(f, z0, t, rtol=1e-4, atol=1e-4).z[-1])
        loss.backward()
        opt.step()
    return float(loss.detach())


def run_case(name: str, model: nn.Module, batch, rtol: float, atol: float, reps: int,
             cheb: int, device: torch.device, train_iters: int, lr: float) -> list[dict]:
    counter: Counter = model.odefunc  # type: ignore[assignment]
    train_loss = pretrain(model, batch, train_iters, lr)
    ref_model = copy.deepcopy(model).double()
    ref_batch = tuple(b.double() if b.is_floating_point() else b for b in batch) \
        if isinstance(batch, tuple) else batch.double()
    def ref_integrate(f, z0):
        t = torch.tensor([0.0, 1.0], dtype=z0.dtype, device=z0.device)
        return torchdiffeq.odeint(f, z0, t, rtol=1e-10, atol=1e-10, method="dopri5")[-1]

    g_ref = flat_grads(ref_model, ref_model.loss(ref_batch, ref_integrate)).float()
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    rows = []

    def one_iter(integrate):
        counter.calls = 0
        loss = model.loss(batch, integrate)
        nfe_f = counter.calls
        counter.calls = 0
        g = flat_grads(model, loss)
        return g, nfe_f, counter.calls

    methods = make_methods(rtol, atol, cheb)
    times: dict[str, list[float]] = {m: [] for m in methods}
    last: dict[str, tuple] = {m: one_iter(integ) for m, integ in methods.items()}  # warm-up
    for _ in range(reps):  # round-robin, so load changes on shared cores hit all methods alike
        for method, integrate in methods.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            last[method] = one_iter(integrate)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[method].append(time.perf_counter() - t0)
    for method, integrate in methods.items():
        g, nfe_f, nfe_b = last[method]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            one_iter(integrate)
            peak = torch.cuda.max_memory_allocated() - base
        else:
            acc = SavedBytes(exclude)
            with torch.autograd.graph.saved_tensors_hooks(acc.pack, acc.unpack):
                one_iter(integrate)
            peak = acc.peak
        rows.append({
            "case": name, "method": method, "wall_s": statistics.median(times[method]),
            "wall_min_s": min(times[method]), "nfe_f": nfe_f, "nfe_b": nfe_b,
            "peak_mb": peak / 2**20, "grad_rel_err": float((g - g_ref).norm() / g_ref.norm()),
            "rtol": rtol, "atol": atol, "reps": reps, "device": device.type,
        })

    # Forward only (no grad): our dopri5 vs torchdiffeq's at the same tolerances.
    for impl, integrate in (("odekit", make_methods(rtol, atol, cheb)["odekit-backprop"]),
                            ("torchdiffeq", make_methods(rtol, atol, cheb)["torchdiffeq-odeint"])):
        times = []
        with torch.no_grad():
            for i in range(reps + 1):
                counter.calls = 0
                t0 = time.perf_counter()
                model.loss(batch, integrate)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - t0)
        rows.append({"case": name, "method": f"{impl}-forward-only", "wall_s":
                     statistics.median(times), "nfe_f": counter.calls, "nfe_b": 0,
                     "rtol": rtol, "atol": atol, "reps": reps, "device": device.type})

    by = {r["method"]: r for r in rows}
    irdm, adj = by["odekit-irdm"], by["torchdiffeq-adjoint"]
    fo, fo_t = by["odekit-forward-only"], by["torchdiffeq-forward-only"]
    rows.append({
        "case": name, "method": "summary", "pretrain_iters": train_iters,
        "pretrain_loss": train_loss,
        "irdm_nfe_b_vs_tdq_adjoint": irdm["nfe_b"] / max(adj["nfe_b"], 1),
        "irdm_wall_vs_tdq_adjoint": irdm["wall_s"] / adj["wall_s"],
        "irdm_grad_rel_err": irdm["grad_rel_err"],
        "fwd_wall_vs_tdq": fo["wall_s"] / fo_t["wall_s"],
        "fwd_wall_per_nfe_vs_tdq": (fo["wall_s"] / max(fo["nfe_f"], 1))
        / (fo_t["wall_s"] / max(fo_t["nfe_f"], 1)),
        "goals": {"nfe_b<=0.5": irdm["nfe_b"] <= 0.5 * adj["nfe_b"],
                  "wall<=0.7": irdm["wall_s"] <= 0.7 * adj["wall_s"],
                  "grad_err<=1e-3": irdm["grad_rel_err"] <= 1e-3,
                  "fwd<=1.0": fo["wall_s"] <= fo_t["wall_s"]},
    })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, smaller batches")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tol", type=float, default=1e-5, help="rtol = atol for every solve")
    ap.add_argument("--cheb-nodes", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-iters", type=int, default=None,
                    help="Adam steps before measuring (default 100, --quick 30)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    reps = 3 if args.quick else 10
    iters = args.train_iters if args.train_iters is not None else (30 if args.quick else 100)
    torch.manual_seed(args.seed)
    cases = []
    cnf = CNF().to(device)
    cases.append(("cnf2d-moons", cnf, moons(100, args.seed).to(device), 1e-2))
    net = DigitsODENet(16).to(device)
    x, y = digits(64 if args.quick else 128)
    cases.append(("odenet-digits8x8", net, (x.to(device), y.to(device)), 1e-2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as fh:
        for name, model, batch, lr in cases:
            for row in run_case(name, model, batch, args.tol, args.tol, reps, args.cheb_nodes,
                                device, iters, lr):
                line = json.dumps(row)
                print(line, flush=True)
                fh.write(line + "\n")


if __name__ == "__main__":
    main()
