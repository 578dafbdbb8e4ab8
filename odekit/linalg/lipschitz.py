"""Spectral-norm bounds of single layers (the l2 Lipschitz constants `odekit certify` multiplies).

* Dense matrices: the exact norm (SVD) when small, else the Gram-iteration bound; power
  iteration gives a lower bound.
* Convolutions (1-3 spatial dims, any stride, padding, dilation and groups): the Gram-iteration
  bound of Delattre et al. (ICML 2023) on the FFT of the kernel, an upper bound, and power
  iteration on the operator itself (the convolution and its adjoint by autograd), a lower bound.

Gram iteration: for any matrix ``A`` with ``G_0 = A`` and ``G_{t+1} = G_t^H G_t``,
``||A||_2 <= ||G_t||_F^(1 / 2^t)``, and the bound converges superlinearly to ``||A||_2``
(the ratio is at most ``rank^(1/2^(t+1))``). Each ``G_t`` is rescaled by its Frobenius norm and
the scale kept as a logarithm, so nothing overflows.

Circular versus zero padding (`conv_upper_bound`): a circular convolution on an ``N_1 x ... x N_d``
grid is block-diagonalised by the FFT of the kernel zero-padded to that grid, so its norm is the
largest spectral norm over the ``N_1 ... N_d`` frequency blocks (Sedghi et al. 2019), and the Gram
bound of each block bounds it. A zero-padded convolution with padding ``p`` on an ``n``-sized input
equals ``S C P`` where ``P`` places the input in a zero canvas of size ``N = n + p_lo + p_hi``
(an isometry), ``C`` is the circular convolution on that canvas (every window used by the
zero-padded convolution fits inside the canvas, so no output we keep wraps around) and ``S``
keeps the strided outputs (a coordinate selection, norm <= 1). Hence
``||conv_zero|| <= ||C_N||``, whatever the stride. Reflect/replicate padding is ``P`` with
repeated entries: ``||P|| = sqrt(largest number of copies of one input entry)``, computed
exactly and multiplied in. Groups make the operator block-diagonal: the largest group norm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# the exact SVD is used for dense matrices whose smaller side is at most this, and (certify) for
# convolutions with at most this many inputs
EXACT_SVD_MAX = 2048
DENSE_ENTRIES_MAX = 1 << 24  # at most 128 MB for a dense float64 conv operator
# relative slack added to every upper bound for floating-point round-off (float64 arithmetic)
ROUNDOFF = 1e-6


@dataclass(frozen=True)
class Bound:
    """A Lipschitz (spectral-norm) interval ``[lower, upper]`` and how each end was obtained."""

    lower: float
    upper: float
    method: str

    def scaled(self, factor: float) -> Bound:
        return Bound(self.lower * factor, self.upper * factor, self.method)


def _frobenius(g: Tensor) -> Tensor:
    """Frobenius norms of a batch of (complex) matrices, in float64."""
    parts = torch.view_as_real(g.resolve_conj()) if g.is_complex() else g
    return torch.linalg.vector_norm(parts, dim=tuple(range(g.dim() - 2, parts.dim()))).double()


def gram_bound(a: Tensor, iters: int = 6) -> Tensor:
    """Upper bounds of the spectral norms of a batch of matrices ``a`` (..., m, n), by ``iters``
    Gram iterations with rescaling; real or complex input, one value per matrix."""
    if iters < 0:
        raise ValueError("iters must be >= 0")
    g = a if a.shape[-2] >= a.shape[-1] else a.mH.resolve_conj()  # the Gram matrices get the smaller side
    shape = g.shape[:-2]
    g = g.reshape(-1, *g.shape[-2:])
    zero = _frobenius(g) == 0
    g = torch.where(zero[:, None, None], torch.ones_like(g), g)  # zero matrices: norm 0, set below
    log_scale = torch.zeros(len(g), dtype=torch.float64, device=g.device)
    for t in range(iters):
        r = _frobenius(g)
        g = g / r.to(g.real.dtype)[:, None, None]
        log_scale = 2 * (log_scale + r.log())
        # G_1 = A^H A is Hermitian, and so is every later G_t: G_t^H G_t = G_t G_t
        g = g.mH.resolve_conj() @ g if t == 0 else g @ g
    out = torch.exp((log_scale + _frobenius(g).log()) / 2**iters)
    return torch.where(zero, torch.zeros_like(out), out).reshape(shape) * (1 + ROUNDOFF)


def matrix_bound(weight: Tensor, iters: int = 6, power_iters: int = 50) -> Bound:
    """Spectral norm of a dense matrix: exact (SVD, in float64) up to `EXACT_SVD_MAX`, else the
    Gram bound above and power iteration below."""
    w = weight.detach().to(torch.float64).reshape(weight.shape[0], -1)
    if min(w.shape) <= EXACT_SVD_MAX:
        s = float(torch.linalg.matrix_norm(w, 2)) if w.numel() else 0.0
        return Bound(s, s * (1 + ROUNDOFF), "svd")
    upper = float(gram_bound(w, iters + 4))
    lower = power_iteration(lambda v: w @ v, lambda u: w.T @ u, torch.ones(w.shape[1], dtype=w.dtype), power_iters)
    return Bound(lower, max(upper, lower), "gram")


def power_iteration(
    forward: object, adjoint: object, start: Tensor, iters: int = 50
) -> float:
    """A lower bound of ``||A||_2``: ``||A v||`` for the unit ``v`` reached by ``iters`` steps of
    ``v <- A^T A v / ||.||`` (every unit ``v`` gives one)."""
    fwd = forward  # callables, typed loosely so operators and matrices both fit
    adj = adjoint
    v = start / start.norm().clamp_min(1e-300)
    best = 0.0
    for _ in range(max(1, iters)):
        u = fwd(v)  # type: ignore[operator]
        best = max(best, float(u.norm()))
        w = adj(u)  # type: ignore[operator]
        n = w.norm()
        if float(n) == 0.0:
            break
        v = w / n
    return best


@dataclass(frozen=True)
class ConvSpec:
    """A convolution's geometry (per spatial dim) on a given input size."""

    input_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]  # (low, high) per spatial dim
    dilation: tuple[int, ...]
    groups: int = 1
    padding_mode: str = "zeros"

    @classmethod
    def of(
        cls,
        input_size: Sequence[int],
        stride: Sequence[int] | int = 1,
        padding: Sequence[int] | int = 0,
        dilation: Sequence[int] | int = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> ConvSpec:
        d = len(input_size)

        def per_dim(v: Sequence[int] | int) -> tuple[int, ...]:
            return (int(v),) * d if isinstance(v, int) else tuple(int(x) for x in v)

        pads = per_dim(padding)
        return cls(tuple(int(n) for n in input_size), per_dim(stride), tuple((p, p) for p in pads),
                   per_dim(dilation), groups, padding_mode)  # fmt: skip


def _copies(n: int, lo: int, hi: int, mode: str) -> int:
    """Most copies of one input entry in a 1-D padded signal (``||P||^2`` per dim)."""
    if mode in ("zeros", "circular") or (lo == 0 and hi == 0):
        return 1
    counts = [1] * n
    for j in range(-lo, n + hi):
        if 0 <= j < n:
            continue
        if mode == "replicate":
            src = min(max(j, 0), n - 1)
        else:  # reflect: torch requires pad < n
            period = 2 * (n - 1) if n > 1 else 1
            k = j % period
            src = k if k < n else period - k
        counts[src] += 1
    return max(counts)


def _fft_blocks(kernel: Tensor, grid: tuple[int, ...], groups: int) -> Tensor:
    """Frequency blocks (groups * prod(grid), c_out/g, c_in/g) of a kernel (c_out, c_in/g, k...)."""
    d = len(grid)
    c_out, c_in_g = kernel.shape[:2]
    # a real kernel: the blocks at -w are the conjugates of those at w (same norms), so rfft halves the work
    blocks = torch.fft.rfftn(kernel, s=grid, dim=tuple(range(2, 2 + d)))  # (c_out, c_in/g, *grid[:-1], grid[-1]//2+1)
    blocks = blocks.reshape(groups, c_out // groups, c_in_g, -1).permute(0, 3, 1, 2)
    return blocks.reshape(-1, c_out // groups, c_in_g)


def _dilated(kernel: Tensor, dilation: tuple[int, ...]) -> Tensor:
    """The kernel with ``dilation - 1`` zeros between taps (the same operator, dilation 1)."""
    if all(d == 1 for d in dilation):
        return kernel
    ks = kernel.shape[2:]
    size = [d * (k - 1) + 1 for k, d in zip(ks, dilation, strict=True)]
    out = kernel.new_zeros(*kernel.shape[:2], *size)
    index = (slice(None), slice(None), *(slice(None, None, d) for d in dilation))
    out[index] = kernel
    return out


def _polyphase(kernel: Tensor, stride: tuple[int, ...], groups: int) -> Tensor:
    """A stride-``s`` correlation as a stride-1 one on the ``prod(s)`` polyphase components of
    its input, stacked as channels: kernel (c_out, c_in/g, k...) -> (c_out, c_in/g * prod(s),
    ceil(k/s)...), with tap ``a*s + b`` of the original at tap ``a`` of phase ``b``."""
    d = len(stride)
    c_out, c_in_g = kernel.shape[:2]
    taps = [-(-k // s) for k, s in zip(kernel.shape[2:], stride, strict=True)]
    padded = kernel.new_zeros(c_out, c_in_g, *[t * s for t, s in zip(taps, stride, strict=True)])
    padded[(slice(None), slice(None), *(slice(0, k) for k in kernel.shape[2:]))] = kernel
    # split every spatial dim into (tap, phase), then move the phases next to the input channels
    shape = [c_out, c_in_g]
    for t, s in zip(taps, stride, strict=True):
        shape += [t, s]
    split = padded.reshape(shape)
    order = [0, 1, *[3 + 2 * i for i in range(d)], *[2 + 2 * i for i in range(d)]]
    return split.permute(order).reshape(c_out, c_in_g * math.prod(stride), *taps)


def circular_grid(kernel_size: Sequence[int], spec: ConvSpec) -> tuple[int, ...]:
    """The canvas size whose circular convolution bounds this convolution (module docstring)."""
    grid = []
    for n, (lo, hi), k, d in zip(spec.input_size, spec.padding, kernel_size, spec.dilation, strict=True):
        span = d * (k - 1) + 1
        canvas = n if spec.padding_mode == "circular" else n + lo + hi
        grid.append(max(canvas, span))
    return tuple(grid)


def conv_upper_bound(kernel: Tensor, spec: ConvSpec, iters: int = 6, *, dtype: torch.dtype = torch.float64) -> float:
    """Gram-iteration upper bound of the convolution's spectral norm (module docstring)."""
    k = _dilated(kernel.detach().to(dtype), spec.dilation)
    grid = circular_grid(kernel.shape[2:], spec)
    strided = any(s > 1 for s in spec.stride)
    if strided and (spec.padding_mode != "circular" or all(n % s == 0 for n, s in zip(grid, spec.stride, strict=True))):
        # a zero canvas may grow to a multiple of the stride (still an isometric embedding)
        grid = tuple(-(-n // s) for n, s in zip(grid, spec.stride, strict=True))
        k = _polyphase(k, spec.stride, spec.groups)
        grid = tuple(max(n, t) for n, t in zip(grid, k.shape[2:], strict=True))
    blocks = _fft_blocks(k, grid, spec.groups)
    if not blocks.numel():
        return 0.0
    bound = float(gram_bound(blocks, iters).max())
    copies = math.prod(_copies(n, lo, hi, spec.padding_mode) for n, (lo, hi) in zip(spec.input_size, spec.padding, strict=True))
    return bound * math.sqrt(copies)


def circular_conv_norm(kernel: Tensor, grid: tuple[int, ...], groups: int = 1, dilation: Sequence[int] | None = None) -> float:
    """Exact spectral norm of the circular convolution on ``grid`` (FFT, then every block's SVD)."""
    k = _dilated(kernel.detach(), tuple(dilation) if dilation else (1,) * len(grid))
    blocks = _fft_blocks(k, grid, groups)
    return float(torch.linalg.svdvals(blocks)[..., 0].max()) if blocks.numel() else 0.0


def conv_operator(kernel: Tensor, spec: ConvSpec) -> tuple[object, object]:
    """The bias-free convolution as a function of one input (no batch dim) and its adjoint."""
    d = len(spec.input_size)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[d]
    w = kernel.detach()
    pad_arg: list[int] = []
    for lo, hi in reversed(spec.padding):
        pad_arg += [lo, hi]
    mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode

    def forward(x: Tensor) -> Tensor:
        xp = F.pad(x[None], pad_arg, mode=mode) if any(pad_arg) else x[None]
        return conv(xp, w, None, spec.stride, 0, spec.dilation, spec.groups)[0]

    def adjoint(y: Tensor) -> Tensor:
        x = torch.zeros(w.shape[1] * spec.groups, *spec.input_size, dtype=w.dtype, device=w.device, requires_grad=True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(forward(x), x, grad_outputs=y)
        return g

    return forward, adjoint


def conv_bound(kernel: Tensor, spec: ConvSpec, iters: int = 6, power_iters: int = 30, seed: int = 0,
               dense_max: int = 0) -> Bound:  # fmt: skip
    """``[power iteration, Gram bound]`` of a convolution's spectral norm; the exact norm (SVD of
    the dense operator) instead when the layer has at most ``dense_max`` inputs and its dense
    matrix at most `DENSE_ENTRIES_MAX` entries (deep layers on 2x2 maps, where the canvas bound
    is loosest, cost one small SVD)."""
    w = kernel.detach().to(torch.float64)
    n_in = w.shape[1] * spec.groups * math.prod(spec.input_size)
    n_out = w.shape[0] * math.prod(n + lo + hi for n, (lo, hi) in zip(spec.input_size, spec.padding, strict=True))
    if 0 < n_in <= dense_max and n_in * n_out <= DENSE_ENTRIES_MAX:
        exact = float(torch.linalg.matrix_norm(dense_conv_matrix(w, spec), 2))
        return Bound(exact, exact * (1 + ROUNDOFF), "dense-svd")
    upper = conv_upper_bound(kernel, spec, iters)
    forward, adjoint = conv_operator(w, spec)
    start = torch.randn(w.shape[1] * spec.groups, *spec.input_size, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(seed)).to(w.device)  # fmt: skip
    lower = power_iteration(forward, adjoint, start, power_iters)
    return Bound(lower, max(upper, lower), "gram-fft")


def dense_conv_matrix(kernel: Tensor, spec: ConvSpec) -> Tensor:
    """The convolution as a dense matrix (outputs x inputs), by applying it to every unit input;
    for tests and exact references on small layers."""
    forward, _ = conv_operator(kernel, spec)
    c_in = kernel.shape[1] * spec.groups
    n_in = c_in * math.prod(spec.input_size)
    eye = torch.eye(n_in, dtype=kernel.dtype, device=kernel.device).reshape(n_in, c_in, *spec.input_size)
    d = len(spec.input_size)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[d]
    pad_arg: list[int] = []
    for lo, hi in reversed(spec.padding):
        pad_arg += [lo, hi]
    mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
    xp = F.pad(eye, pad_arg, mode=mode) if any(pad_arg) else eye
    cols = conv(xp, kernel, None, spec.stride, 0, spec.dilation, spec.groups)
    del forward
    return cols.reshape(n_in, -1).T


# Lipschitz constants of element-wise activations (sup |f'|, rounded up)
ACTIVATION_LIPSCHITZ: dict[str, float] = {
    "relu": 1.0,
    "relu6": 1.0,
    "hardtanh": 1.0,
    "tanh": 1.0,
    "softplus": 1.0,
    "identity": 1.0,
    "dropout": 1.0,
    "sigmoid": 0.25,
    "hardsigmoid": 1.0 / 6.0,
    "gelu": 1.1290,  # Phi(x) + x phi(x), largest at x = sqrt(2): 1.12897...
    "silu": 1.0999,  # sigma(x)(1 + x(1 - sigma(x))), largest near x = 2.40: 1.09984...
    "mish": 1.0890,  # largest derivative 1.08862...
    "hardswish": 1.5,  # (2x + 3) / 6 on [-3, 3]
    "softmax": 1.0,
}


def leaky_constant(slope: float) -> float:
    """LeakyReLU/PReLU/ELU-style piecewise slopes: the largest of 1 and |slope|."""
    return max(1.0, abs(float(slope)))


def pool_windows(size: int, kernel: int, stride: int, padding: int = 0, dilation: int = 1,
                 ceil_mode: bool = False) -> list[list[int]]:  # fmt: skip
    """The input indices (padding excluded) of every 1-D pooling window."""
    span = dilation * (kernel - 1) + 1
    length = size + 2 * padding - span
    count = (-(-length // stride) if ceil_mode else length // stride) + 1
    if ceil_mode and (count - 1) * stride >= size + padding:
        count -= 1
    out = []
    for i in range(max(count, 0)):
        start = i * stride - padding
        out.append([start + j * dilation for j in range(kernel) if 0 <= start + j * dilation < size])
    return out


def adaptive_windows(size: int, out: int) -> list[list[int]]:
    """The input indices of every 1-D adaptive pooling window (torch's start/end rule)."""
    return [list(range((i * size) // out, -(-((i + 1) * size) // out))) for i in range(out)]


def max_pool_constant(windows: Sequence[list[list[int]]]) -> float:
    """Max pooling: |max a - max b| <= ||a - b||_window, and an entry lies in at most ``c`` windows
    per dim, so the constant is sqrt(prod c) (1 for non-overlapping windows)."""
    return math.sqrt(math.prod(_overlap(w) for w in windows))


def avg_pool_constant(windows: Sequence[list[list[int]]], divisors: Sequence[Sequence[float]]) -> float:
    """Average pooling with per-window divisors (per dim): a window of ``m`` real entries divided by
    ``D`` has gain sqrt(m) / D; summing squares over overlapping windows gives
    sqrt(prod_d overlap_d * max_w m_w / D_w^2)."""
    total = 1.0
    for w, div in zip(windows, divisors, strict=True):
        total *= _overlap(w) * max((len(ix) / (dv * dv) for ix, dv in zip(w, div, strict=True) if ix), default=0.0)
    return math.sqrt(total)


def _overlap(windows: list[list[int]]) -> int:
    counts: dict[int, int] = {}
    for ix in windows:
        for i in ix:
            counts[i] = counts.get(i, 0) + 1
    return max(counts.values(), default=1)
