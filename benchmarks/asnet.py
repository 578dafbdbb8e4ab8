"""ASNet benchmark on the shipped digits checkpoints (thesis ch. 6.5.1, tables 6.1-6.2, fig. 6.5).

    .venv/bin/python benchmarks/asnet.py --quick      # a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/asnet.py              # all cuts and ranks

Cases, each one JSON line (stdout and benchmarks/results/asnet.jsonl):
- "compress": ASNet at cut L and rank r (VGG-11 and LeNet-5): storage / FLOP reduction, accuracy
  before and after distillation fine-tuning, and at the same r without fine-tuning
  AS+PCE vs PCA+PCE vs AS+LR vs PCA+LR vs LR on all features (thesis fig. 6.5b).
- "sketch": frequent directions (ours, Algorithm 3) vs the peer, exact SVD of the full gradient
  matrix, on the same streamed per-sample gradients: wall time, peak RSS increase (sampled),
  bytes held, top-r subspace error sin(theta) and spectrum error, certified covariance bound.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from measure import (  # benchmarks/measure.py (the script folder is on sys.path)
    PeakRSS,
    emit_line,
    results_path,
)

from odekit.io.checkpoints import load_model
from odekit.io.datasets import dataset_for_model
from odekit.linalg import FrequentDirections, subspace_sin_theta
from odekit.methods.asnet import (
    ASNetSettings,
    ChainModel,
    SubspaceSettings,
    build_asnet_from_teacher,
)
from odekit.streaming import per_sample_activation_grads

ROOT = Path(__file__).resolve().parent.parent
RESULTS = results_path("asnet")


def emit(record: dict[str, Any]) -> None:
    emit_line(RESULTS, json.dumps(record, sort_keys=True))


def compress_case(name: str, cut: int, rank: int, epochs: int, sparse: bool, l1: float) -> dict[str, Any]:
    loaded = load_model(ROOT / "checkpoints" / f"{name}.safetensors")
    data = dataset_for_model(loaded.meta.input_shape, loaded.meta.normalization, loaded.meta.dataset)
    settings = ASNetSettings(
        cut=str(cut), rank=rank, finetune_epochs=epochs, sparse=sparse, l1=l1,
        subspace=SubspaceSettings(sketch_size=max(100, 2 * rank)),
    )  # fmt: skip
    start = time.perf_counter()
    torch.manual_seed(0)
    res = build_asnet_from_teacher(
        loaded.model, loaded.meta.arch, loaded.meta.args, loaded.meta.input_shape, data, settings, torch.device("cpu")
    ).results
    base = res["baselines"]
    record = {
        "case": "compress",
        "model": name,
        "cut": cut,
        "n_l": res["cut"]["n_l"],
        "rank": rank,
        "active_neurons_eps0.05": res["cut"]["active_neurons"],
        "eps_at_rank": res["cut"]["eps_at_rank"],
        "finetune_epochs": epochs,
        "sparse": sparse,
        "teacher_accuracy": res["teacher"]["accuracy"],
        "accuracy_before_finetune": res["asnet"]["accuracy_before_finetune"],
        "accuracy_after_finetune": res["asnet"]["accuracy"],
        "drop_points_after": 100 * (res["teacher"]["accuracy"] - res["asnet"]["accuracy"]),
        "teacher_storage_mb": res["teacher"]["storage_mb"],
        "asnet_storage_mb": res["asnet"]["storage_mb"],
        "storage_reduction": res["storage_reduction"],
        "flop_reduction": res["flop_reduction"],
        "post_storage_reduction": res["split"]["post_storage_reduction"],
        "post_flop_reduction": res["split"]["post_flop_reduction"],
        "as_pce": base["as_pce"],
        "pca_pce": base["pca_pce"],
        "as_logreg": base["as_logreg"],
        "pca_logreg": base["pca_logreg"],
        "logreg_features": base["logreg_features"],
        "pce_samples_per_basis": res["pce"]["samples_per_basis_function"],
        "latency_ms": res["latency_ms"],
        "seconds": round(time.perf_counter() - start, 1),
    }
    if sparse:
        record.update(
            density=res["asnet"]["density"],
            storage_reduction_nonzero=res["teacher"]["storage_mb"] / res["asnet"]["storage_mb_nonzero"],
            flop_reduction_nonzero=res["teacher"]["flops"] / max(res["asnet"]["flops_nonzero"], 1),
        )
    return record


def sketch_case(name: str, cut: int, rank: int, samples: int | None) -> dict[str, Any]:
    """Same gradient stream into (a) our frequent-directions sketch, (b) the full matrix + SVD."""
    loaded = load_model(ROOT / "checkpoints" / f"{name}.safetensors")
    data = dataset_for_model(loaded.meta.input_shape, loaded.meta.normalization, loaded.meta.dataset)
    chain = ChainModel(loaded.model, loaded.meta.input_shape)
    c = chain.cut(cut)
    split = data.train.subset(samples)
    ell = max(100, 2 * rank)  # the CLI's default sketch size

    def stream():
        return per_sample_activation_grads(loaded.model, chain.last_pre_module(c), split.batches(128), target="label")

    t0 = time.perf_counter()
    for _ in stream():  # gradients alone (also warms up, so neither method pays first-call costs)
        pass
    t_grad = time.perf_counter() - t0
    with PeakRSS() as mem_fd:
        t0 = time.perf_counter()
        fd = FrequentDirections(c.features, ell)
        for g in stream():
            fd.update(g)
        s_fd, v_fd = fd.right_singular(rank)
        s_all_fd = fd.singular_values()
        t_fd = time.perf_counter() - t0
    fd_bytes = fd.state_nbytes()
    with PeakRSS() as mem_ex:
        t0 = time.perf_counter()
        G = torch.cat([g.double() for g in stream()])
        _, s_ex, vh = torch.linalg.svd(G, full_matrices=False)
        t_ex = time.perf_counter() - t0
    ex_bytes = G.numel() * G.element_size()
    v_ex = vh[:rank].T
    tail = float(s_ex[rank:].pow(2).sum())
    top = min(5, rank)
    # energy of G captured by the sketch's top-r directions vs by the exact top-r directions
    captured = float((G @ v_fd.double()).pow(2).sum()) / float(s_ex[:rank].pow(2).sum())
    return {
        "case": "sketch",
        "model": name,
        "cut": cut,
        "n_l": c.features,
        "samples": int(G.shape[0]),
        "rank": rank,
        "sketch_rows": ell,
        "gradient_stream_seconds": round(t_grad, 3),
        "fd_seconds": round(t_fd, 3),
        "exact_seconds": round(t_ex, 3),
        "fd_peak_rss_mb": round(mem_fd.mb, 1),
        "exact_peak_rss_mb": round(mem_ex.mb, 1),
        "fd_bytes_held": fd_bytes,
        "exact_bytes_held": ex_bytes,
        "memory_ratio_held": ex_bytes / fd_bytes,
        "subspace_sin_theta": subspace_sin_theta(v_ex, v_fd.double()),
        "subspace_sin_theta_top5": subspace_sin_theta(v_ex[:, :top], v_fd[:, :top].double()),
        "captured_energy_ratio": captured,
        "spectrum_max_rel_error": float(((s_ex[:rank] - s_fd.double()) / s_ex[:rank]).abs().max()),
        "covariance_error_certified": fd.covariance_error_bound(),
        "covariance_error_apriori_bound": tail / (ell - rank),
        "covariance_error_exact": float(torch.linalg.matrix_norm(G.T @ G - fd.sketch.T @ fd.sketch, ord=2)),
        "sigma1_sq": float(s_ex[0] ** 2),
        "fd_sketch_sigma_last": float(s_all_fd[-1]),
    }


def markdown(path: Path = RESULTS) -> str:
    """Markdown tables of the latest record per case in ``path`` (for docs/asnet.md)."""
    latest: dict[tuple, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        key = (r["case"], r["model"], r["cut"], r["rank"], r.get("sparse"), r.get("finetune_epochs"))
        latest[key] = r
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731

    def speed(lat: dict[str, float]) -> str:
        b = [k.split("_ms_")[1] for k in lat if k.startswith("teacher_ms_")]
        return " / ".join(f"{lat[f'teacher_ms_{x}'] / lat[f'asnet_ms_{x}']:.2f}" for x in b) or "-"
    out = [
        "| model | cut | n_l | r | active (eps 0.05) | teacher % | before FT % | after FT % | storage x | FLOPs x "
        "| latency x (b1 / b128) | AS+PCE % | PCA+PCE % | AS+LR % | PCA+LR % | LR(all) % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in latest.values() if r["case"] == "compress"):
        name = r["model"].replace("_digits", "") + (" (ASNet-s)" if r["sparse"] else "")
        storage = f"{r['storage_reduction']:.2f}"
        flops = f"{r['flop_reduction']:.2f}"
        if r["sparse"]:
            storage += f" ({r['storage_reduction_nonzero']:.2f} nnz)"
            flops += f" ({r['flop_reduction_nonzero']:.2f} nnz)"
        out.append(
            f"| {name} | {r['cut']} | {r['n_l']} | {r['rank']} | {r['active_neurons_eps0.05']} | {pct(r['teacher_accuracy'])} "
            f"| {pct(r['accuracy_before_finetune'])} | {pct(r['accuracy_after_finetune'])} ({r['finetune_epochs']} ep) "
            f"| {storage} | {flops} | {speed(r['latency_ms'])} | {pct(r['as_pce'])} | {pct(r['pca_pce'])} | {pct(r['as_logreg'])} "
            f"| {pct(r['pca_logreg'])} | {pct(r['logreg_features'])} |"
        )
    out += [
        "",
        "| model | cut | n_l | samples | r | sketch rows | gradients s | FD s | exact SVD s | FD peak RSS MB "
        "| exact peak RSS MB | bytes held exact/FD | sin theta top-r | sin theta top-5 | energy captured "
        "| cov. err exact / certified / a-priori (rel. to sigma_1^2) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in latest.values() if r["case"] == "sketch"):
        s1 = r["sigma1_sq"]
        out.append(
            f"| {r['model'].replace('_digits', '')} | {r['cut']} | {r['n_l']} | {r['samples']} | {r['rank']} "
            f"| {r['sketch_rows']} | {r['gradient_stream_seconds']:.1f} | {r['fd_seconds']:.1f} | {r['exact_seconds']:.1f} "
            f"| {r['fd_peak_rss_mb']:.0f} | {r['exact_peak_rss_mb']:.0f} | {r['memory_ratio_held']:.1f} "
            f"| {r['subspace_sin_theta']:.3f} | {r['subspace_sin_theta_top5']:.2e} | {r['captured_energy_ratio']:.4f} "
            f"| {r['covariance_error_exact'] / s1:.2e} / {r['covariance_error_certified'] / s1:.2e} "
            f"/ {r['covariance_error_apriori_bound'] / s1:.2e} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer cuts, ranks and epochs")
    parser.add_argument("--only", choices=("compress", "sketch"), help="run one family of cases")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", action="store_true", help="print tables of the recorded results and exit")
    args = parser.parse_args()
    if args.markdown:
        print(markdown())
        return
    torch.set_num_threads(args.threads)
    if args.quick:
        compress = [("vgg11_digits", 4, r, 2, False) for r in (4, 8)] + [("lenet5_digits", 2, r, 2, False) for r in (4, 8)]
        compress += [("lenet5_digits", 2, 8, 2, True)]
        sketches = [("vgg11_digits", 1, 20, None), ("vgg11_digits", 3, 20, None)]
    else:  # the informative cases first, so an interrupted run still records them
        compress = [("vgg11_digits", cut, 8, 3, False) for cut in (3, 5)]
        compress += [("vgg11_digits", 4, r, 3, False) for r in (16, 36)] + [("vgg11_digits", 4, 8, 3, True)]
        compress += [("lenet5_digits", 1, r, 3, False) for r in (4, 8)] + [("lenet5_digits", 2, 16, 3, False)]
        compress += [("vgg11_digits", cut, r, 3, False) for cut in (3, 5) for r in (4, 16, 36)]
        sketches = [("vgg11_digits", cut, 50, None) for cut in (1, 3, 5)] + [("vgg11_digits", 5, 10, None)]
    if args.only in (None, "sketch"):
        for name, cut, rank, samples in sketches:
            emit(sketch_case(name, cut, rank, samples))
    if args.only in (None, "compress"):
        for name, cut, rank, epochs, sparse in compress:
            emit(compress_case(name, cut, rank, epochs, sparse, l1=1.0))


if __name__ == "__main__":
    main()
