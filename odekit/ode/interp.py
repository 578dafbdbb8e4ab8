"""Barycentric Chebyshev interpolation of z(t) for irdm (thesis eq. 2.7), with error control.

Nodes and weights must be a matching pair. We use the Chebyshev points of the second kind
(Lobatto: both ends included, tau_0 = t0, tau_N = t1) with weights (-1)^j, halved at both
ends (Berrut & Trefethen 2004). The thesis formula pairs first-kind weights
sin((2n+1)pi/(2N+2)) with this end-point grid, which is not the polynomial interpolant.

The interpolation error is measured, not assumed: the Lobatto grid of degree 2N holds the
grid of degree N at its even points, and its odd points sit where the node polynomial of
the degree-N grid peaks. Comparing the degree-N interpolant with the forward solver's dense
output there gives an estimate of the largest interpolation error (times a safety factor
`ESTIMATE_SAFETY`). The estimate is an error ratio in the solver's own weighted RMS norm,
scale atol + rtol |z|: at most 1 means "within tolerance".

`cheb_nodes='auto'` builds a piecewise interpolant from the accepted forward steps
(`AdaptiveChebyshevBuilder`): consecutive steps are grouped into segments, each segment
gets the lowest nested degree (1, 2, 4, ..., MAX_AUTO_DEGREE) whose estimate is within
tolerance, and a segment that no degree resolves with fewer nodes than its steps would need
one by one is split. A single step is a polynomial of the solver's dense-output degree
(dopri5: 4), stored exactly at that degree (its estimate is a rounding bound, 8 eps / rtol),
so splitting always ends. Where multi-step pieces keep failing (dense output that bends at
every step boundary by about the tolerance), the builder waits ever longer before trying one.
The estimate is of the distance to the dense output, the only z(t) irdm knows; the dense
output's own error is the forward solve's, controlled by the forward tolerances.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from odekit.ode.tableau import StepCoefficients

ESTIMATE_SAFETY = 2.0  # measured at the peaks of the node polynomial, not at its maximum
MAX_AUTO_DEGREE = 16
MAX_SEGMENT_STEPS = 16  # forward steps buffered (dense-output stages) before a segment closes


class InterpolationWarning(UserWarning):
    """irdm's interpolant of z(t) misses the adjoint tolerance (see `SolveStats.interp_error`)."""

    def __init__(self, message: str, error: float, tol: float) -> None:
        super().__init__(message)
        self.error = error
        self.tol = tol


def chebyshev_lobatto(t0: float, t1: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """N+1 = n+1 nodes from t0 to t1 (in that order) and their barycentric weights."""
    if n < 1:
        raise ValueError("need at least 2 Chebyshev nodes (n >= 1)")
    j = np.arange(n + 1, dtype=np.float64)
    x = -np.cos(np.pi * j / n)  # increasing in [-1, 1]
    x[0], x[-1] = -1.0, 1.0
    nodes = 0.5 * (t0 + t1) + 0.5 * (t1 - t0) * x
    nodes[0], nodes[-1] = t0, t1  # exact end hits
    return nodes, lobatto_weights(n)


def lobatto_weights(n: int) -> np.ndarray:
    w = (-1.0) ** np.arange(n + 1, dtype=np.float64)
    w[0] *= 0.5
    w[-1] *= 0.5
    return w


def barycentric_coefficients(t: float, nodes: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Lagrange basis values l_j(t) (sum to 1); one-hot on an exact node hit."""
    d = t - nodes
    hit = np.flatnonzero(d == 0.0)
    if hit.size:
        out = np.zeros_like(nodes)
        out[hit[0]] = 1.0
        return out
    r = weights / d
    return r / r.sum()


def _basis_matrix(ts: Sequence[float] | np.ndarray, nodes: np.ndarray, weights: np.ndarray,
                  like: Tensor) -> Tensor:
    """(len(ts), N+1) Lagrange basis values, rows one-hot on exact node hits."""
    d = np.asarray(ts, dtype=np.float64)[:, None] - nodes[None, :]
    hit = d == 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        r = weights / d
        lam = r / r.sum(axis=1, keepdims=True)
    rows = hit.any(axis=1)
    if rows.any():
        lam[rows] = (np.cumsum(hit[rows], axis=1) == 1) & hit[rows]
    return torch.from_numpy(lam).to(dtype=like.dtype, device=like.device)


class BarycentricInterpolant:
    """z(t) from values stored at the Chebyshev nodes: one (1 x N+1) @ (N+1 x numel) matmul."""

    def __init__(self, nodes: np.ndarray, weights: np.ndarray, values: Tensor) -> None:
        self.nodes = nodes
        self.weights = weights
        self.shape = values.shape[1:]
        self.flat = values.reshape(values.shape[0], -1)

    def coefficients(self, t: float) -> Tensor:
        lam = barycentric_coefficients(t, self.nodes, self.weights)
        return torch.from_numpy(lam).to(dtype=self.flat.dtype, device=self.flat.device,
                                        non_blocking=True)

    def __call__(self, t: float) -> Tensor:
        return (self.coefficients(t) @ self.flat).reshape(self.shape)

    def many(self, ts: Sequence[float]) -> Tensor:
        """Values at several times at once: (len(ts), *shape)."""
        lam = _basis_matrix(ts, self.nodes, self.weights, self.flat)
        return (lam @ self.flat).reshape(len(ts), *self.shape)


def weighted_rms(approx: Tensor, ref: Tensor, rtol: float, atol: float) -> Tensor:
    """RMS of (approx - ref) / (atol + rtol |ref|) per row (leading axis), as a tensor."""
    scaled = (approx - ref) / (atol + rtol * ref.abs())
    return scaled.reshape(scaled.shape[0], -1).square().mean(dim=1).sqrt()


class PiecewiseChebyshev:
    """Barycentric Chebyshev interpolants on consecutive segments, continuous at the breaks.

    `values` stacks the node values of all segments; neighbouring segments share their break
    value, so segment k reads rows offsets[k] .. offsets[k] + degrees[k].
    """

    def __init__(self, breaks: Sequence[float], degrees: Sequence[int], values: Tensor) -> None:
        if len(breaks) != len(degrees) + 1 or values.shape[0] != sum(degrees) + 1:
            raise ValueError("breaks, degrees and values of a piecewise interpolant disagree")
        self.breaks, self.values = list(breaks), values
        self.direction = 1.0 if breaks[-1] > breaks[0] else -1.0
        self.keys = [self.direction * b for b in breaks]
        self.grids = [chebyshev_lobatto(a, b, q) for a, b, q in
                      zip(breaks[:-1], breaks[1:], degrees, strict=True)]
        self.offsets = np.concatenate([[0], np.cumsum(degrees)]).tolist()
        self.degrees = [int(q) for q in degrees]
        self.shape = values.shape[1:]
        self.flat = values.reshape(values.shape[0], -1)

    def segment(self, t: float) -> int:
        k = bisect.bisect_right(self.keys, self.direction * t) - 1
        return min(max(k, 0), len(self.grids) - 1)

    def __call__(self, t: float) -> Tensor:
        k = self.segment(t)
        nodes, weights = self.grids[k]
        lam = torch.from_numpy(barycentric_coefficients(t, nodes, weights)).to(
            dtype=self.flat.dtype, device=self.flat.device, non_blocking=True)
        off = self.offsets[k]
        return (lam @ self.flat[off: off + self.degrees[k] + 1]).reshape(self.shape)

    def many(self, ts: Sequence[float]) -> Tensor:
        return torch.stack([self(float(t)) for t in ts])


def fixed_grid(t0: float, t1: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Degree-n nodes on [t0, t1] and the n probe times (odd points of the degree-2n grid)."""
    nodes, _ = chebyshev_lobatto(t0, t1, n)
    fine, _ = chebyshev_lobatto(t0, t1, 2 * n)
    return nodes, fine[1::2]


def fixed_estimate(nodes: np.ndarray, node_values: Tensor, probes: np.ndarray,
                   probe_values: Tensor, rtol: float, atol: float) -> float:
    """Error ratio of the degree-N interpolant against the dense output at the probe times."""
    interp = BarycentricInterpolant(nodes, lobatto_weights(len(nodes) - 1), node_values)
    rms = weighted_rms(interp.many(probes.tolist()), probe_values, rtol, atol)
    return ESTIMATE_SAFETY * float(rms.max())


@dataclass
class _Step:
    t_old: float
    t_new: float
    h: float
    y_old: Tensor
    k: Tensor  # (stages, *shape)


class AdaptiveChebyshevBuilder:
    """Consumes accepted forward steps (`add_step`), returns the piecewise interpolant of their
    dense output with every segment's estimate within (rtol, atol) where a step allows it."""

    def __init__(self, co: StepCoefficients, rtol: float, atol: float,
                 max_degree: int = MAX_AUTO_DEGREE, max_steps: int = MAX_SEGMENT_STEPS) -> None:
        if max_degree < 1 or max_degree & (max_degree - 1):
            raise ValueError("max_degree must be a power of two")
        self.co, self.rtol, self.atol = co, rtol, atol
        self.max_degree, self.max_steps = max_degree, max_steps
        self.degrees_tried = [max_degree >> s for s in range(max_degree.bit_length())][::-1]
        # Lowest nested degree that holds one step's dense-output polynomial exactly.
        dense_degree = (co.dense.shape[1] if isinstance(co.dense, Tensor)
                        else max(len(row) for row in co.dense))
        self.single_degree = next((q for q in self.degrees_tried if q >= dense_degree),
                                  max_degree)
        self.buffer: list[_Step] = []
        self.target = min(4, max_steps)  # steps per segment, adapted like a step size
        self.backoff = self.cooldown = 0  # single steps to take before trying to grow again
        self._single_w: Tensor | None = None
        self._probes: dict[tuple, tuple[Tensor, Tensor, list[int]]] = {}
        self.breaks: list[float] = []
        self.degrees: list[int] = []
        self.chunks: list[Tensor] = []
        self.worst = 0.0

    def add_step(self, t_old: float, t_new: float, h: float, y_old: Tensor,
                 ks: list[Tensor]) -> None:
        self.buffer.append(_Step(t_old, t_new, h, y_old, torch.stack(ks)))
        if len(self.buffer) >= self.target:
            self._flush()

    def finish(self) -> tuple[PiecewiseChebyshev, float]:
        """The interpolant and its worst segment's error ratio."""
        if self.buffer:
            self._flush()
        if not self.chunks:
            raise ValueError("no accepted steps to interpolate")
        values = torch.cat(self.chunks)
        return PiecewiseChebyshev(self.breaks, self.degrees, values), self.worst

    def _dense(self, steps: list[_Step], ts: np.ndarray) -> Tensor:
        """Dense output of the buffered steps at times ts (sorted from the first step on)."""
        direction = 1.0 if steps[0].h > 0 else -1.0
        starts = np.array([direction * s.t_old for s in steps])
        idx = np.clip(np.searchsorted(starts, direction * ts, side="right") - 1, 0,
                      len(steps) - 1)
        t_old = np.array([s.t_old for s in steps])[idx]
        h = np.array([s.h for s in steps])[idx]
        like = steps[0].k
        w = self.co.dense_weights(np.clip((ts - t_old) / h, 0.0, 1.0), like)
        w = w * torch.from_numpy(h).to(w)[:, None]  # (n, stages), step size folded in
        rows = torch.from_numpy(idx).to(like.device)
        n, shape = len(ts), like.shape[1:]
        ks = torch.stack([s.k for s in steps]).index_select(0, rows)  # (n, stages, *shape)
        y0 = torch.stack([s.y_old for s in steps]).index_select(0, rows)
        return torch.baddbmm(y0.reshape(n, 1, -1), w.unsqueeze(1),
                             ks.reshape(n, w.shape[1], -1)).reshape(n, *shape)

    def _fit(self, steps: list[_Step]) -> tuple[int, Tensor, float] | None:
        """(degree, node values, error ratio) of the lowest degree within tolerance, or None
        when no degree does it with fewer nodes than single-step pieces would need. A single
        step is a polynomial of degree <= `single_degree`, kept at that degree unmeasured."""
        a, b = steps[0].t_old, steps[-1].t_new
        if len(steps) == 1:
            # Exact up to rounding (barycentric weights on <= 9 Lobatto points are
            # well-conditioned): bound the ratio by a few units of rounding over rtol.
            s = steps[0]
            if self._single_w is None:  # the nodes sit at fixed fractions of any step
                frac, _ = chebyshev_lobatto(0.0, 1.0, self.single_degree)
                self._single_w = self.co.dense_weights(frac, s.k)
            vals = torch.tensordot(self._single_w * s.h, s.k, dims=1) + s.y_old
            return self.single_degree, vals, 8 * torch.finfo(vals.dtype).eps / self.rtol
        budget = self.single_degree * len(steps)
        tried = [q for q in self.degrees_tried if q <= budget]
        p = tried[-1]  # the degree-2p grid holds every tried grid and its probes
        fine, _ = chebyshev_lobatto(a, b, 2 * p)
        vals = self._dense(steps, fine)
        probe_rows, probe_cols, owner = self._probe_matrix(p, tried, vals)
        flat = vals.reshape(vals.shape[0], -1)
        rms = weighted_rms(probe_rows @ flat, flat[probe_cols], self.rtol,
                           self.atol).tolist()  # one host read per segment
        ratio_list = [ESTIMATE_SAFETY * max(r for r, o in zip(rms, owner, strict=True) if o == q)
                      for q in tried]
        for q, r in zip(tried, ratio_list, strict=True):
            if r <= 1.0:
                return q, vals[:: 2 * p // q], r
        return None

    def _probe_matrix(self, p: int, tried: list[int],
                      like: Tensor) -> tuple[Tensor, Tensor, list[int]]:
        """For the degree-2p grid: the rows that evaluate each tried degree's interpolant at
        its probes, the probes' grid indices, and the degree owning each row. Barycentric
        weights are invariant under affine maps, so this is built once per (p, degrees)."""
        key = (p, tuple(tried), like.dtype, like.device)
        if key not in self._probes:
            fine, _ = chebyshev_lobatto(-1.0, 1.0, 2 * p)
            rows, cols, owner = [], [], []
            for q in tried:
                stride = 2 * p // q
                idx = np.arange(stride // 2, 2 * p, stride)
                lam = _basis_matrix(fine[idx], fine[::stride], lobatto_weights(q), like)
                full = torch.zeros(len(idx), 2 * p + 1, dtype=like.dtype, device=like.device)
                full[:, ::stride] = lam
                rows.append(full)
                cols += idx.tolist()
                owner += [q] * len(idx)
            self._probes[key] = (torch.cat(rows), torch.tensor(cols, device=like.device),
                                 owner)
        return self._probes[key]

    def _flush(self) -> None:
        steps, self.buffer = self.buffer, []
        i, whole = 0, True
        while i < len(steps):
            j = len(steps)
            fit = self._fit(steps[i:j])
            while fit is None:
                whole = False
                j = i + (j - i + 1) // 2
                fit = self._fit(steps[i:j])
            q, vals, ratio = fit
            if not self.breaks:
                self.breaks.append(steps[i].t_old)
                self.chunks.append(vals)
            else:
                self.chunks.append(vals[1:])  # the break value is the previous segment's end
            self.breaks.append(steps[j - 1].t_new)
            self.degrees.append(q)
            self.worst = max(self.worst, ratio)
            if not whole:
                self.target = max(1, j - i)
            i = j
        if not whole and self.target == 1:
            # Multi-step pieces do not pay here (kinks of the dense output at the tolerance):
            # wait ever longer before measuring another.
            self.backoff = min(2 * self.backoff or 2, 64)
            self.cooldown = self.backoff
        elif whole and self.cooldown:
            self.cooldown -= 1
        elif whole:
            self.backoff = 0 if self.target > 1 else self.backoff
            self.target = min(self.max_steps, 2 * self.target)
