"""RON construction (thesis Algorithm 1): settings, per-layer reports and ``build_student``."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any, cast

import torch
import torch.fx as fx
from torch import Tensor, nn

from odekit.distributed import Distributed
from odekit.errors import NumericalError, UsageError
from odekit.linalg.maxvol import rect_maxvol, rect_maxvol_error_factor
from odekit.linalg.rank import RankContext, select_rank
from odekit.linalg.sketch import FrequentDirections, SketchMerge, merge_across_ranks
from odekit.methods.ron.linear_maps import (
    _eval_affine,
    _pre_rows,
    _vjp_rows,
)
from odekit.methods.ron.memory import check_memory, region_bytes
from odekit.methods.ron.ops import (
    _modules,
    _run_node,
)
from odekit.methods.ron.regions import _Region, _State, analyse_region
from odekit.methods.ron.settings import RonLayerReport, RonResult, RonSettings
from odekit.models.graph import runnable
from odekit.models.layers import layer_table
from odekit.models.ron_student import (
    RONStudent,
)
from odekit.progress import Progress, silent_if_none
from odekit.streaming.throughput import ThroughputMeter, measure_matmul_peak

# ----------------------------------------------------------------------------- construction


def _state_name(st: _State) -> str:
    return st.out.name


def _default_sketch(dim: int, n: int, spec_rank: int | None, requested: int | None) -> int:
    """Sketch rows: --sketch-size, else max(128, 2R) for a known R, capped by D and N (with
    ell >= min(D, N) the frequent-directions sketch is exact)."""
    if requested is not None:
        return max(2, min(requested, dim))
    base = 128 if spec_rank is None else max(128, 2 * spec_rank)
    return max(2, min(dim, n, base))


def build_student(
    teacher: nn.Module,
    teacher_arch: str,
    teacher_args: dict[str, Any],
    input_shape: tuple[int, ...],
    samples: Iterable[Tensor] | Tensor,
    settings: RonSettings,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    n_samples: int | None = None,
    dist: Distributed | None = None,
) -> RonResult:
    """Algorithm 1: stream the region's activations, choose ranks, sample rows, build weights.

    ``samples``: a (N, *input_shape) tensor or an iterable of input batches (model-input units).
    ``dist`` (several ranks): each rank streams its shard of a tensor ``samples`` (an iterable
    is taken as this rank's shard, ``n_samples`` as the total), the sketches are merged on rank
    0, which chooses ranks and maxvol rows and broadcasts them; every rank gets the same student.
    """
    progress = silent_if_none(progress)
    device = torch.device(device)
    teacher = runnable(teacher, input_shape).to(device).eval()
    if settings.layers is None:
        raise UsageError("the region mode needs `layers`", "e.g. `layers` 7-16, or use `mode` channel")
    region = analyse_region(teacher, tuple(input_shape), settings.layers, device)
    gm = region.gm
    mods = _modules(gm)
    if isinstance(samples, Tensor):
        data = samples
        if settings.samples is not None:
            data = data[: settings.samples]
        n_total = int(data.shape[0])
        if dist is not None:
            data = data[dist.shard(n_total).start : dist.shard(n_total).stop]
        batches: Iterable[Tensor] = (
            data[i : i + settings.batch_size] for i in range(0, data.shape[0], settings.batch_size)
        )
    else:
        batches = samples
        n_total = int(n_samples) if n_samples is not None else -1
    specs = settings.rank_specs
    if len(specs) not in (1, len(region.states)):
        names = ", ".join(f"{st.out.name} ({'+'.join(st.layers) or '-'})" for st in region.states)
        raise UsageError(
            f"`rank` lists {len(specs)} ranks but layers {region.first_layer}-{region.last_layer} have "
            f"{len(region.states)} reduced activations: {names}",
            "give one rank for all, or exactly one per reduced activation",
        )
    spec_of = {
        st.index: specs[0] if len(specs) == 1 else specs[i] for i, st in enumerate(region.states)
    }
    state_dims = {st.index: math.prod(region.shapes[st.out]) for st in region.states}
    # integer ranks can be checked before any data is streamed
    for st in region.states:
        spec = spec_of[st.index]
        if spec.name != "fixed":
            continue
        r, d = int(spec.value or 0), state_dims[st.index]
        where = f"layer output '{_state_name(st)}' (layers {', '.join(st.layers) or '-'}, D={d})"
        if r > d:
            hint = f"choose a rank <= {d}"
            if len(specs) == 1 and len(region.states) > 1:
                dims = ", ".join(f"{s.out.name}: D={state_dims[s.index]}" for s in region.states)
                hint += (
                    f"; or give one rank per reduced layer output ({dims}), e.g. `rank` 40,40,10"
                )
            raise NumericalError(f"{where}: rank {r} exceeds the layer dimension {d}", hint)
        if n_total > 0 and r > n_total:
            raise NumericalError(
                f"{where}: rank {r} needs at least {r} samples, only {n_total} are used",
                "pass more `fit_samples` or choose a smaller rank",
            )
    sketch_dtype = torch.float64 if settings.sketch_dtype == "float64" else torch.float32
    n_hint = n_total if n_total > 0 else 10**9
    sketches: dict[int, FrequentDirections] = {}
    ells: dict[int, int] = {}
    for st in region.states:
        d = state_dims[st.index]
        spec = spec_of[st.index]
        r_hint = int(spec.value) if spec.name == "fixed" and spec.value else None
        if spec.name == "factor" and spec.value:
            r_hint = math.ceil(d / spec.value)
        ells[st.index] = _default_sketch(d, n_hint, r_hint, settings.sketch_size)
    check_memory(
        region_bytes(state_dims, ells, math.prod(region.shapes[region.x_in]), settings, sketch_dtype.itemsize),
        "the region reduction", "use `mode` channel, or lower `sketch_size`, `batch_size` or `fit_samples`", device,
    )  # fmt: skip
    for st in region.states:
        sketches[st.index] = FrequentDirections(state_dims[st.index], ells[st.index], device=device, dtype=sketch_dtype)

    # ---- stream the teacher's region activations (one batch at a time)
    targets = {st.out: st.index for st in region.states}
    last = region.y_out
    seen = 0
    # the stage: streaming this rank's shard plus merging the sketches across ranks
    meter = ThroughputMeter("stream activations + merge sketches", device).start()
    with torch.no_grad():
        for xb in progress.track(
            batches,
            None if n_total < 0 else math.ceil(n_total / settings.batch_size),
            "streaming activations",
        ):
            env: dict[fx.Node, Any] = {}
            for node in gm.graph.nodes:
                if node.op == "placeholder":
                    env[node] = xb.to(device)
                elif node.op == "output":
                    break
                else:
                    env[node] = _run_node(node, env, gm, mods)
                if node in targets:
                    sketches[targets[node]].update(env[node].reshape(env[node].shape[0], -1))
                if node is last:
                    break
            seen += int(xb.shape[0])
    meter.add(seen)
    if dist is not None and dist.world_size > 1:
        seen = int(dist.sum_numbers(seen)[0])
    if seen == 0:
        raise NumericalError(
            "no samples were streamed", "pass training data with at least one sample"
        )

    # ---- ranks, bases, rows
    bases: dict[int, Tensor] = {}
    rows: dict[int, Tensor] = {}
    reports: list[RonLayerReport] = []
    merges: list[SketchMerge] = []
    for st in region.states:
        merged, merge = merge_across_ranks(sketches[st.index], dist) if dist else (None, None)
        if merge is not None:
            merges.append(merge)
            sketches[st.index] = merged  # type: ignore[assignment]  # None off rank 0
    meter.stop()
    # rank selection and maxvol run once (rank 0) on the merged sketch, then are broadcast
    for st in region.states if dist is None or dist.is_main else []:
        fd = sketches[st.index]
        d = state_dims[st.index]
        sv = fd.singular_values()
        ctx = RankContext(sv, n_samples=seen, dim=d, total_energy=fd.frobenius_sq)
        try:
            r = select_rank(spec_of[st.index], ctx, max_rank=min(fd.sketch_size, d))
        except NumericalError as exc:
            hint = exc.hint or ""
            if len(specs) == 1 and len(region.states) > 1:
                hint += (
                    "; or give one rank per reduced layer output ("
                    + ", ".join(f"{s.out.name}: D={state_dims[s.index]}" for s in region.states)
                    + "), e.g. `rank` 40,40,10"
                )
            raise NumericalError(
                f"layer output '{_state_name(st)}' (layers {', '.join(st.layers) or '-'}, D={d}): {exc.message}",
                hint,
            ) from None
        s_top, v = fd.right_singular(r)
        v = v.to(torch.float64)
        p = min(d, max(r, math.ceil(settings.oversample * r)))
        idx = cast(Tensor, rect_maxvol(v, min_rows=p, max_rows=p))
        bases[st.index] = v
        rows[st.index] = idx
        sv_np = (sv / sv[0]).tolist() if float(sv[0]) > 0 else sv.tolist()
        amp = float(1.0 / torch.linalg.svdvals(v[idx]).min())
        kept = float(s_top.double().pow(2).sum())
        reports.append(
            RonLayerReport(
                state=_state_name(st),
                layers=st.layers,
                dim=d,
                rank=r,
                rows=int(idx.numel()),
                pooled=st.pool is not None,
                sources=["input" if s is region.x_in else s.name for s in st.sources],
                singular_values=[float(x) for x in sv_np],
                decay=float(s_top[-1] / s_top[0]) if float(s_top[0]) > 0 else 0.0,
                error_factor=rect_maxvol_error_factor(d, int(idx.numel()), r),
                amplification=amp,
                covariance_error=fd.delta / max(float(sv[0]) ** 2, 1e-300),
                residual_energy=max(0.0, 1.0 - kept / max(fd.frobenius_sq, 1e-300)),
            )
        )

    if dist is not None and dist.world_size > 1:
        reports = dist.broadcast_object(reports)
        bases, rows = _broadcast_by_state(dist, bases), _broadcast_by_state(dist, rows)
    stream_rate = meter.result(
        _stream_flops(teacher, input_shape, region.last_layer),
        measure_matmul_peak(device, next(teacher.parameters()).dtype),
    )

    # ---- weights (float64, then the teacher's dtype)
    work = copy.deepcopy(gm).to(device=device, dtype=torch.float64).eval()
    wmods = _modules(work)
    wnodes = {n.name: n for n in work.graph.nodes}
    # map analysed nodes onto the float64 copy (same names)
    wregion = _Region(
        work,
        wnodes[region.x_in.name],
        wnodes[region.y_out.name],
        [wnodes[n.name] for n in region.nodes],
        [],
        {wnodes[n.name]: s for n, s in region.shapes.items() if n.name in wnodes},
        region.first_layer,
        region.last_layer,
    )
    for st in region.states:
        wregion.states.append(
            _State(
                st.index,
                wnodes[st.pre.name],
                st.act,
                wnodes[st.act_node.name] if st.act_node is not None else None,
                wnodes[st.pool.name] if st.pool is not None else None,
                wnodes[st.out.name],
                [wnodes[s.name] for s in st.sources],
                [wnodes[n.name] for n in st.affine_nodes],
                st.layers,
            )
        )
    like = torch.zeros((), dtype=torch.float64, device=device)
    out_index = {st.out: st.index for st in wregion.states}
    stage_cfgs: list[dict[str, Any]] = []
    stage_weights: list[list[Tensor]] = []
    stage_bias: list[Tensor] = []
    pinvs: dict[int, Tensor] = {}
    for st in wregion.states:
        v = bases[st.index]
        pinvs[st.index] = torch.linalg.pinv(v[rows[st.index]])  # (R x P)
    for st in wregion.states:
        pre_rows, group = _pre_rows(st, wregion, wmods, rows[st.index])
        pre_rows = pre_rows.to(device)
        with torch.no_grad():
            bias = _eval_affine(st, wregion, wmods, {}, 1, like).reshape(-1)[pre_rows]
        mats: list[Tensor] = []
        srcs: list[int] = []
        for src in st.sources:
            if src is wregion.x_in:
                in_shape = wregion.shapes[src]

                def f(x: Tensor, st: _State = st, src: fx.Node = src) -> Tensor:
                    zero = _eval_affine(st, wregion, wmods, {}, 1, like)
                    return _eval_affine(st, wregion, wmods, {src: x}, x.shape[0], like) - zero

                mats.append(_vjp_rows(f, in_shape, pre_rows, 128, like))
                srcs.append(-1)
            else:
                j = out_index[src]
                vj = bases[j]
                cols = vj.T.reshape(vj.shape[1], *wregion.shapes[src])
                with torch.no_grad():
                    lin = []
                    zero = _eval_affine(st, wregion, wmods, {}, 1, like).reshape(1, -1)
                    for c0 in range(0, cols.shape[0], 64):
                        block = cols[c0 : c0 + 64]
                        y = _eval_affine(st, wregion, wmods, {src: block}, block.shape[0], like)
                        lin.append((y.reshape(block.shape[0], -1) - zero)[:, pre_rows])
                    slv = torch.cat(lin).T  # (P_pre x R_j) = S_k L V_j
                mats.append(slv @ pinvs[j])  # (P_pre x P_j)
                srcs.append(j)
        stage_cfgs.append(
            {
                "rows": int(pre_rows.numel()),
                "sources": srcs,
                "act": st.act,
                "group": group,
                "state": st.out.name,
            }
        )
        stage_weights.append(mats)
        stage_bias.append(bias)

    last_state = wregion.states[-1]
    out_map = bases[last_state.index] @ pinvs[last_state.index]  # D_K x P_K
    d_out = out_map.shape[0]
    fold = (
        last_state.act.get("type") == "identity"
        and last_state.pool is None
        and d_out * sum(m.shape[1] for m in stage_weights[-1])
        <= stage_cfgs[-1]["rows"] * (sum(m.shape[1] for m in stage_weights[-1]) + d_out)
    )
    if fold:
        stage_weights[-1] = [out_map @ m for m in stage_weights[-1]]
        stage_bias[-1] = out_map @ stage_bias[-1]
        stage_cfgs[-1]["rows"] = d_out
    in_dim = math.prod(region.shapes[region.x_in])
    args = {
        "teacher_arch": teacher_arch,
        "teacher_args": teacher_args,
        "input_node": region.x_in.name,
        "output_node": region.y_out.name,
        "in_dim": in_dim,
        "out_shape": list(region.shapes[region.y_out]),
        "stages": [{k: v for k, v in c.items() if k != "state"} for c in stage_cfgs],
        "out_rows": int(rows[last_state.index].numel()),
        "fold_output": bool(fold),
        "input_shape": [int(v) for v in input_shape],
    }
    student = RONStudent(**args, graph=gm)  # type: ignore[arg-type]
    dtype = next(teacher.parameters()).dtype
    with torch.no_grad():
        student.pre.load_state_dict(_sub_state(gm, student.pre), strict=True)
        student.rest.load_state_dict(_sub_state(gm, student.rest), strict=True)
        stages: list[Any] = list(cast(nn.ModuleList, student.stages))
        for stage, mats, bias in zip(stages, stage_weights, stage_bias, strict=True):
            for lin, m in zip(stage.maps, mats, strict=True):
                lin.weight.copy_(m.to(lin.weight.dtype))
            stage.maps[0].bias.copy_(bias.to(stage.maps[0].bias.dtype))
        if not fold:
            out_linear = cast(nn.Linear, student.out_map)
            out_linear.weight.copy_(out_map.to(out_linear.weight.dtype))
    student = student.to(device=device, dtype=dtype).eval()
    return RonResult(
        student, args, reports, seen, region.first_layer, region.last_layer, stream_rate, merges
    )


def _broadcast_by_state(dist: Distributed, tensors: dict[int, Tensor]) -> dict[int, Tensor]:
    """Rank 0's per-state tensors (bases, maxvol rows) on every rank."""
    received = dist.broadcast_tensors({str(k): v for k, v in tensors.items()})
    return {int(k): v for k, v in received.items()}


def _stream_flops(teacher: nn.Module, input_shape: tuple[int, ...], last_layer: int) -> float:
    """FLOPs per sample of the teacher's compute layers up to the streamed region's end."""
    param = next(iter(teacher.parameters()), None)
    probe = (
        teacher if param is None or param.dtype == torch.float32 else copy.deepcopy(teacher).float()
    )
    table = layer_table(probe, tuple(input_shape))
    return float(sum(layer.flops for layer in table.layers if layer.index <= last_layer))


def _sub_state(gm: fx.GraphModule, sub: fx.GraphModule) -> dict[str, Tensor]:
    full = gm.state_dict()
    return {k: full[k].detach().clone() for k in sub.state_dict()}
