"""Active-subspace analysis and ASNet compression (thesis ch. 6.2-6.3, Algorithms 2-3).

For a cut at compute layer l the teacher splits into pre-model (layers 1..l with the
normalisation/activation/pooling that follows layer l) and post-model. c_l(x) = CE(post(x), label)
is differentiated per sample with respect to the pre-model output x (model in eval mode,
log-softmax loss); every gradient enters a frequent-directions sketch (exact shrink), whose
right singular vectors V_1 span the active subspace. ASNet = pre-model + AS layer (V_1^T,
scaled so that z is standardised) + PCE layer (orthonormal Hermite basis, least squares on the
teacher's logits), optionally fine-tuned with distillation and L1 proximal steps (ASNet-s).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from odekit.distributed import Distributed
from odekit.errors import LayerSelectionError, NumericalError, UnsupportedModelError, UsageError
from odekit.io.datasets import Dataset, Split
from odekit.linalg import FrequentDirections, active_count, energy_rank
from odekit.linalg.sketch import merge_across_ranks
from odekit.methods.evaluation import accuracy, measure_latency_ms, model_cost
from odekit.methods.pce import MAX_BASIS, PCEFit, PCELayer, basis_size, fit_pce
from odekit.methods.training import TrainHistory, TrainSettings, train_classifier
from odekit.models.graph import runnable
from odekit.models.layers import COMPUTE_TYPES, LayerInfo, ModelSummary, layer_table, resolve_layers
from odekit.models.registry import ARCHITECTURES, build_model, register_arch
from odekit.models.split import GraphCut, GraphSplitter
from odekit.progress import Progress, silent_if_none
from odekit.streaming import per_sample_activation_grads

THESIS_RANK = 50  # default r of thesis ch. 6.5.1
DEFAULT_SKETCH = 100
LOGREG_MAX_SAMPLES = 5000  # the LR-on-all-features baseline holds samples x n_l floats


# ----------------------------------------------------------------------------- model slicing


def _chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaves in registration order, opening the root and every nn.Sequential (other modules
    with children, e.g. residual blocks, stay whole)."""
    out: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module, is_root: bool) -> None:
        children = list(module.named_children())
        if children and (is_root or isinstance(module, nn.Sequential)):
            for name, child in children:
                walk(f"{prefix}.{name}" if prefix else name, child, False)
        else:
            out.append((prefix, module))

    walk("", model, True)
    return out


def _has_compute(module: nn.Module) -> bool:
    return any(isinstance(m, COMPUTE_TYPES) for m in module.modules())


def _cut_layer(spec: str | int, summary: ModelSummary) -> LayerInfo:
    """The one compute layer a --cut names; the last layer leaves nothing to replace."""
    chosen = resolve_layers(str(spec), summary)
    if len(chosen) != 1:
        raise LayerSelectionError(f"--cut must name one layer, '{spec}' gives {len(chosen)}", "e.g. --cut 5")
    layer = chosen[0]
    if layer.index == len(summary.layers):
        raise LayerSelectionError(
            f"layer {layer.index} is the last compute layer: nothing would be left to replace",
            f"cut at a layer before {layer.index}",
        )
    return layer


@dataclass(frozen=True)
class Cut:
    """Where the teacher is split: compute layer ``index`` (1-based) ends the pre-model at
    chain position ``end`` (exclusive); ``features`` = n_l, the flattened pre-model output size."""

    index: int
    name: str
    alias: str
    end: int
    features: int
    out_shape: list[int]
    node: str | None = None  # a graph cut: the traced graph's node that ends the pre-model
    frontier: list[str] | None = None  # a graph cut: the tensors the post-model reads

    def to_dict(self) -> dict[str, Any]:
        out = {"index": self.index, "name": self.name, "alias": self.alias, "n_l": self.features,
               "out_shape": self.out_shape}  # fmt: skip
        if self.node is not None:
            out.update(node=self.node, frontier=self.frontier)
        return out


class ChainModel:
    """A teacher that is a plain chain of modules, verified against its own forward pass."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> None:
        if isinstance(model, torch.jit.ScriptModule):
            raise UnsupportedModelError(
                "ASNet needs the model's modules, not a TorchScript archive", "pass --arch NAME to rebuild it"
            )
        self.model = model
        self.input_shape = tuple(input_shape)
        self.chain = _chain(model)
        was_training = model.training
        model.eval()  # layer_table's FLOP count runs a forward pass: keep BatchNorm statistics frozen
        try:
            self.summary = layer_table(model, self.input_shape)
        finally:
            model.train(was_training)
        self._verify()
        # chain position of every compute layer that is itself a chain element
        names = {name: pos for pos, (name, _) in enumerate(self.chain)}
        self.position = {layer.index: names[layer.name] for layer in self.summary.layers if layer.name in names}

    def _verify(self) -> None:
        was_training = self.model.training
        self.model.eval()
        device = next(iter(self.model.parameters()), torch.zeros(())).device
        x = torch.randn(2, *self.input_shape, generator=torch.Generator().manual_seed(0)).to(device)
        try:
            with torch.no_grad():
                want = self.model(x)
                got = x
                for _, module in self.chain:
                    got = module(got)
            same = got.shape == want.shape and bool(
                torch.allclose(got, want, rtol=1e-4, atol=1e-5 * (1.0 + float(want.abs().max())))
            )
        except (RuntimeError, TypeError, ValueError):
            same = False
        finally:
            self.model.train(was_training)
        if not same:
            raise UnsupportedModelError(
                f"the model ({type(self.model).__name__}) is not a plain chain of modules, so it cannot be "
                "cut into pre-model and post-model (residual connections or a custom forward)",
                "ASNet supports Sequential-style models such as lenet300, lenet5, mlp and vgg*",
            )

    def cut(self, spec: str | int) -> Cut:
        """Resolve a cut layer (index, alias or module name) to a `Cut`."""
        layer = _cut_layer(spec, self.summary)
        if layer.index not in self.position:
            raise UnsupportedModelError(
                f"layer {layer.index} ('{layer.name}') sits inside a composite module that ASNet cannot split",
                "cut at a layer that is a direct element of the model's Sequential containers",
            )
        end = self.position[layer.index] + 1
        # Keep the parameter-free / normalisation modules after the layer (BN, activation,
        # pooling, flatten): the thesis counts VGG-19 layer 4 as 8192 = 128 x 8 x 8 neurons.
        while end < len(self.chain) and not _has_compute(self.chain[end][1]):
            end += 1
        if end >= len(self.chain):
            raise LayerSelectionError(f"nothing follows layer {layer.index}", "cut at an earlier layer")
        shape = self.pre_output_shape(end)
        return Cut(layer.index, layer.name, layer.alias, end, int(math.prod(shape)), shape)

    def pre_output_shape(self, end: int) -> list[int]:
        device = next(iter(self.model.parameters()), torch.zeros(())).device
        x = torch.zeros(1, *self.input_shape, device=device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for _, module in self.chain[:end]:
                    x = module(x)
        finally:
            self.model.train(was_training)
        return list(x.shape[1:])

    def pre_model(self, cut: Cut) -> nn.Sequential:
        """Layers 1..l (shared with the teacher, not copied)."""
        return nn.Sequential(*(module for _, module in self.chain[: cut.end]))

    def post_model(self, cut: Cut) -> nn.Sequential:
        return nn.Sequential(*(module for _, module in self.chain[cut.end :]))

    def last_pre_module(self, cut: Cut) -> nn.Module:
        return self.chain[cut.end - 1][1]

    def analysable_layers(self) -> list[int]:
        """Compute layers that can be cut at (direct chain elements, not the last layer)."""
        last = len(self.summary.layers)
        return [i for i in sorted(self.position) if i < last]

    def gradient_model(self, cut: Cut) -> tuple[nn.Module, nn.Module]:
        """(model, module whose output is the cut activation) for per-sample gradients."""
        return self.model, self.last_pre_module(cut)


class GraphModel:
    """A teacher of any traceable architecture (residual blocks, custom forward, ``.pt2``
    graphs), cut by splitting its graph after a compute layer (``odekit.models.split``)."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> None:
        self.input_shape = tuple(input_shape)
        self.splitter = GraphSplitter(model, self.input_shape, what="ASNet")
        self.model = self.splitter.gm
        self.summary = self.splitter.summary
        self._cuts: dict[str, GraphCut] = {}

    def cut(self, spec: str | int) -> Cut:
        layer = _cut_layer(spec, self.summary)
        if layer.calls != 1:
            raise UnsupportedModelError(
                f"layer {layer.index} ('{layer.name}') runs {layer.calls} times per forward pass",
                "cut at a layer that runs once",
            )
        gcut = self.splitter.cut_at(layer)
        self._cuts[gcut.end] = gcut
        end = self.splitter.order[self.splitter.by_name[gcut.end]] + 1
        return Cut(layer.index, layer.name, layer.alias, end, gcut.features, gcut.out_shape, gcut.end, gcut.frontier)

    def _graph_cut(self, cut: Cut) -> GraphCut:
        assert cut.node is not None
        return self._cuts[cut.node]

    def pre_model(self, cut: Cut) -> nn.Module:
        return self.splitter.pre_model(self._graph_cut(cut))

    def post_model(self, cut: Cut) -> nn.Module:
        return self.splitter.post_model(self._graph_cut(cut))

    def analysable_layers(self) -> list[int]:
        last = len(self.summary.layers)
        return [layer.index for layer in self.summary.layers if layer.index < last and layer.calls == 1]

    def gradient_model(self, cut: Cut) -> tuple[nn.Module, nn.Module]:
        pre = self.pre_model(cut)
        return nn.Sequential(pre, self.post_model(cut)).eval(), pre


CutModel = ChainModel | GraphModel


def cut_model(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> CutModel:
    """A plain chain of modules is cut between its modules (as the thesis' VGGs); any other
    traceable model by splitting its graph."""
    model = runnable(model, input_shape)
    try:
        return ChainModel(model, input_shape)
    except UnsupportedModelError:
        return GraphModel(model, input_shape)


class ASNet(nn.Sequential):
    """pre-model -> flatten -> AS layer (Linear n_l -> r) -> PCE layer (r -> classes)."""

    pre: nn.Module
    active: nn.Linear
    pce: PCELayer

    def __init__(self, pre: nn.Module, features: int, rank: int, degree: int, num_classes: int) -> None:
        super().__init__(
            OrderedDict(
                pre=pre,
                flatten=nn.Flatten(),
                active=nn.Linear(features, rank),
                pce=PCELayer(rank, degree, num_classes),
            )
        )


@register_arch("asnet", "ASNet (thesis ch. 6.3): teacher pre-model + active-subspace layer + PCE layer", None, "asnet")
def build_asnet(
    teacher_arch: str,
    teacher_args: dict[str, Any],
    cut: int,
    end: int,
    features: int,
    rank: int,
    degree: int,
    num_classes: int,
    node: str | None = None,
    input_shape: list[int] | None = None,
) -> ASNet:
    """Rebuild an ASNet from its JSON args (weights come from the checkpoint). ``node`` and
    ``input_shape`` describe a graph cut (a teacher that is not a plain chain)."""
    if teacher_arch.lower() == "asnet":
        raise ValueError("an ASNet's teacher cannot itself be recorded as an ASNet")
    teacher = build_model(teacher_arch, teacher_args).eval()
    if node is not None:
        if input_shape is None:
            raise ValueError("a graph cut needs the teacher's input_shape")
        graph = GraphModel(teacher, input_shape)
        graph_cut = graph.cut(cut)
        if graph_cut.node != node:
            raise ValueError(f"cut {cut} of the rebuilt teacher ends at '{graph_cut.node}', the checkpoint at '{node}'")
        return ASNet(graph.pre_model(graph_cut), features, rank, degree, num_classes)
    chain = _chain(teacher)
    if not 0 < end <= len(chain):
        raise ValueError(f"cut end {end} is outside the teacher's {len(chain)} modules")
    return ASNet(nn.Sequential(*(m for _, m in chain[:end])), features, rank, degree, num_classes)


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SubspaceSettings:
    """How the active subspace of one layer is estimated (Algorithm 3)."""

    eps: float = 0.05
    sketch_size: int = DEFAULT_SKETCH
    samples: int | None = None  # training samples streamed (None: all)
    batch_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.eps < 1.0:
            raise UsageError(f"--eps must lie in (0, 1), got {self.eps}", "the thesis uses 0.05")
        if self.sketch_size < 2:
            raise UsageError(f"--sketch-size must be >= 2, got {self.sketch_size}", "try 100")
        if self.samples is not None and self.samples < 2:
            raise UsageError(f"--samples must be >= 2, got {self.samples}", "omit it to use the whole training split")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class ASNetSettings:
    """Algorithm 2: cut, rank, PCE degree, fine-tuning and sparsity."""

    cut: str
    rank: int | str | None = None  # None: min(50, what the PCE sample rule allows); "auto": eq. 6.17
    degree: int = 2
    ridge: float = 0.0
    finetune_epochs: int = 0
    lr: float = 1e-4
    head_lr: float | None = None  # AS + PCE layers (thesis: 1e-5); None: lr
    beta: float = 0.1
    sparse: bool = False
    l1: float = 1.0
    baselines: bool = True
    latency: bool = True
    subspace: SubspaceSettings = field(default_factory=SubspaceSettings)

    def __post_init__(self) -> None:
        if isinstance(self.rank, str) and self.rank != "auto":
            raise UsageError(f"--rank must be a positive integer or 'auto', got '{self.rank}'", "e.g. --rank 50")
        if isinstance(self.rank, int) and self.rank < 1:
            raise UsageError(f"--rank must be >= 1, got {self.rank}", "e.g. --rank 50")
        if not 1 <= self.degree <= 6:
            raise UsageError(f"--degree must lie in 1..6, got {self.degree}", "the thesis uses p = 2")
        if not self.ridge >= 0:  # also NaN
            raise UsageError(f"--ridge must be >= 0, got {self.ridge}", "e.g. --ridge 1e-6")
        if self.finetune_epochs < 0:
            raise UsageError(f"--finetune must be >= 0 epochs, got {self.finetune_epochs}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive, got {self.lr}", "try 1e-3")
        if self.head_lr is not None and not self.head_lr > 0:
            raise UsageError(f"--head-lr must be positive, got {self.head_lr}", "the thesis uses 1e-5")
        if not 0.0 <= self.beta <= 1.0:
            raise UsageError(f"--beta must lie in [0, 1], got {self.beta}", "the thesis uses 0.1")
        if self.l1 < 0:
            raise UsageError(f"--l1 must be >= 0, got {self.l1}")
        if self.sparse and self.finetune_epochs == 0:
            raise UsageError("--sparse needs fine-tuning epochs for its proximal steps", "add --finetune EPOCHS")
        if isinstance(self.rank, int) and self.rank > self.subspace.sketch_size:
            raise UsageError(
                f"--rank {self.rank} exceeds --sketch-size {self.subspace.sketch_size}",
                f"use --sketch-size {2 * self.rank} or more",
            )


def parse_rank(text: str | None) -> int | str | None:
    """CLI text -> rank setting: None, 'auto' or a positive int."""
    if text is None:
        return None
    text = text.strip().lower()
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--rank must be a positive integer or 'auto', got '{text}'", "e.g. --rank 50") from None


def default_sketch_size(rank: int | str | None) -> int:
    return max(DEFAULT_SKETCH, 2 * rank) if isinstance(rank, int) else DEFAULT_SKETCH


# ----------------------------------------------------------------------------- active subspace


@dataclass
class ActiveSubspace:
    """Sketch of G = [grad c_l(x^1), ..., grad c_l(x^m)]^T and what it says (eq. 6.15-6.17)."""

    singular_values: Tensor  # all sketch singular values, descending
    V: Tensor  # (n_l, k) leading right singular vectors of the sketch
    total_energy: float  # ||G||_F^2 = trace(m C), exact
    covariance_error: float  # certified ||G^T G - S^T S||_2 of the sketch
    n_samples: int
    mean_activation: Tensor  # (n_l,) mean pre-model output, for the PCA baseline
    seconds: float

    def active_neurons(self, eps: float) -> int:
        """Eq. 6.17 on the sketch's singular values."""
        return active_count(self.singular_values, eps, form="eq6.17")

    def active_neurons_eq612(self, eps: float) -> int:
        """Eq. 6.12 with the exact total energy in the denominator (saturates at the sketch size)."""
        return energy_rank(self.singular_values, 1.0 - eps, total_energy=self.total_energy)

    def eps_at_rank(self, rank: int) -> float:
        """(lambda_{r+1} + ... + lambda_n) / (lambda_1 + ... + lambda_n), as in table 6.1. The sketch
        under-estimates every leading eigenvalue, so this is an upper bound on the exact value."""
        if self.total_energy <= 0:
            return 0.0
        kept = float(self.singular_values[:rank].double().pow(2).sum())
        return max(0.0, 1.0 - kept / self.total_energy)


def _train_batches(split: Split, settings: SubspaceSettings) -> tuple[Split, int]:
    sub = split.subset(settings.samples, seed=settings.seed)
    return sub, sub.num_batches(settings.batch_size)


def active_subspace(
    chain: CutModel,
    cut: Cut,
    split: Split,
    settings: SubspaceSettings,
    device: torch.device,
    keep: int | None = None,
    progress: Progress | None = None,
    on_batch: Callable[[Tensor, Tensor], None] | None = None,
    dist: Distributed | None = None,
) -> ActiveSubspace:
    """Algorithm 3: stream per-sample gradients of c_l through a frequent-directions sketch.

    ``keep`` right singular vectors are returned (default: as many as the sketch holds);
    ``on_batch(activations, labels)`` sees every batch's pre-model output (for baselines).
    ``dist`` (several ranks): each rank streams its shard of the samples, the sketches are
    merged on rank 0, whose singular vectors (and the summed statistics) every rank receives.
    """
    start = time.perf_counter()
    sub, total = _train_batches(split, settings)
    if dist is not None and dist.world_size > 1:
        part = dist.shard(len(sub))
        sub = Split(sub.x[part.start : part.stop], sub.y[part.start : part.stop])
        total = sub.num_batches(settings.batch_size)
    fd = FrequentDirections(cut.features, settings.sketch_size, device=device)
    act_sum = torch.zeros(cut.features, dtype=torch.float64, device=device)
    labels = iter(sub.batches(settings.batch_size))
    grad_model, cut_module = chain.gradient_model(cut)
    grads = per_sample_activation_grads(
        grad_model, cut_module, sub.batches(settings.batch_size, device),
        loss="cross_entropy", target="label", return_activations=True, progress=progress, total=total,
    )  # fmt: skip
    for g, a in grads:  # type: ignore[misc]
        fd.update(g)
        act_sum += a.double().sum(0)
        if on_batch is not None:
            on_batch(a, next(labels)[1])
    if dist is not None and dist.world_size > 1:
        return _merged_subspace(fd, act_sum, cut.features, keep, dist, start)
    if fd.n_rows == 0:
        raise NumericalError("no samples reached the gradient sketch", "use a non-empty training split")
    limit = min(fd.sketch_size, cut.features)
    k = min(keep or limit, limit)
    s_all = fd.singular_values()
    _, v = fd.right_singular(k)
    return ActiveSubspace(
        singular_values=s_all.cpu(),
        V=v,
        total_energy=fd.frobenius_sq,
        covariance_error=fd.covariance_error_bound(),
        n_samples=fd.n_rows,
        mean_activation=act_sum / fd.n_rows,
        seconds=time.perf_counter() - start,
    )


def _merged_subspace(
    fd: FrequentDirections, act_sum: Tensor, features: int, keep: int | None, dist: Distributed, start: float
) -> ActiveSubspace:
    """Merge the ranks' gradient sketches on rank 0; every rank gets its singular structure."""
    act_sum = dist.all_reduce_sum(act_sum)
    merged, merge = merge_across_ranks(fd, dist)
    if merge.n_rows == 0:
        raise NumericalError("no samples reached the gradient sketch", "use a non-empty training split")
    limit = min(fd.sketch_size, features)
    k = min(keep or limit, limit)
    found: dict[str, Tensor] = {}
    if merged is not None:
        _, v = merged.right_singular(k)
        found = {"s": merged.singular_values(), "v": v, "energy": torch.tensor([merged.frobenius_sq])}
    got = dist.broadcast_tensors(found)
    return ActiveSubspace(
        singular_values=got["s"].cpu(),
        V=got["v"],
        total_energy=float(got["energy"][0]),
        covariance_error=merge.covariance_error_bound,
        n_samples=merge.n_rows,
        mean_activation=act_sum / merge.n_rows,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def stream_features(pre: nn.Module, split: Split, batch_size: int, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """(pre-model output, labels) per batch, model in eval mode (restored afterwards)."""
    was_training = pre.training
    pre.eval()
    try:
        for x, y in split.batches(batch_size, device):
            yield pre(x), y
    finally:
        pre.train(was_training)


def _logreg_accuracy(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, seed: int
) -> float:
    """Multinomial logistic regression on standardised features (thesis fig. 6.5b 'LR')."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y_train)) < 2:
        raise NumericalError("logistic regression needs at least two classes in the training samples", "use more --samples")
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(max_iter=500, C=1.0, random_state=seed)
    with warnings.catch_warnings():
        # a not-quite-converged baseline is still a fair baseline; the report says max_iter
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(scaler.transform(x_train), y_train)
    return float((clf.predict(scaler.transform(x_test)) == y_test).mean())


# ----------------------------------------------------------------------------- layer analysis


@dataclass
class LayerAnalysis:
    cut: Cut
    subspace: ActiveSubspace
    eps: float
    logreg_accuracy: float | None
    logreg_samples: int

    def to_dict(self, max_values: int = 200) -> dict[str, Any]:
        s = self.subspace
        return {
            **self.cut.to_dict(),
            "active_neurons": s.active_neurons(self.eps),
            "active_neurons_eq612": s.active_neurons_eq612(self.eps),
            "eps": self.eps,
            "samples": s.n_samples,
            "sketch_size": int(s.singular_values.shape[0]),
            "sketch_covariance_error_rel": s.covariance_error / max(float(s.singular_values[0]) ** 2, 1e-300),
            "singular_values": [float(v) for v in s.singular_values[:max_values]],
            "logreg_accuracy": self.logreg_accuracy,
            "logreg_train_samples": self.logreg_samples,
            "seconds": round(s.seconds, 3),
        }


def _collect(split: Split, pre: nn.Module, batch_size: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for f, y in stream_features(pre, split.subset(LOGREG_MAX_SAMPLES), batch_size, device):
        xs.append(f.flatten(1).float().cpu().numpy())
        ys.append(y.cpu().numpy())
    return np.concatenate(xs), np.concatenate(ys)


def analyze_layers(
    chain: CutModel,
    layers: str | None,
    data: Dataset,
    settings: SubspaceSettings,
    device: torch.device,
    logreg: bool = True,
    progress: Progress | None = None,
    dist: Distributed | None = None,
) -> list[LayerAnalysis]:
    """Active-neuron count, spectrum and LR-on-features accuracy for each chosen layer.
    ``dist`` (several ranks): sharded gradient sketches; the logistic regression (scikit-learn,
    all features in one process) is skipped."""
    progress = silent_if_none(progress)
    logreg = logreg and (dist is None or dist.world_size == 1)
    indices = chain.analysable_layers()
    if layers:
        indices = [layer.index for layer in resolve_layers(layers, chain.summary)]
    out = []
    for index in progress.track(indices, len(indices), "layers"):
        cut = chain.cut(index)
        train_feats: list[np.ndarray] = []
        train_labels: list[np.ndarray] = []

        def keep(a: Tensor, y: Tensor, feats: list[np.ndarray] = train_feats, labs: list[np.ndarray] = train_labels) -> None:
            if sum(len(f) for f in feats) < LOGREG_MAX_SAMPLES:
                feats.append(a.float().cpu().numpy())
                labs.append(y.cpu().numpy())

        sub = active_subspace(chain, cut, data.train, settings, device, keep=1, progress=progress,
                              on_batch=keep if logreg else None, dist=dist)  # fmt: skip
        acc, n_lr = None, 0
        if logreg:
            xt, yt = _collect(data.test, chain.pre_model(cut), settings.batch_size, device)
            x_tr = np.concatenate(train_feats)
            n_lr = len(x_tr)
            acc = _logreg_accuracy(x_tr, np.concatenate(train_labels), xt, yt, settings.seed)
        out.append(LayerAnalysis(cut, sub, settings.eps, acc, n_lr))
        progress.update(layer=index, active=sub.active_neurons(settings.eps))
    return out


# ----------------------------------------------------------------------------- ASNet build


def max_rank_for_samples(samples: int, degree: int) -> int:
    """Largest r with 2 C(r + p, p) <= samples (thesis ch. 6.3.5), at least 1."""
    r = 1
    while 2 * basis_size(r + 1, degree) <= samples and basis_size(r + 1, degree) <= MAX_BASIS:
        r += 1
    return r


@torch.no_grad()
def _standardise_into(linear: nn.Linear, V: Tensor, z_mean: Tensor, z_std: Tensor) -> None:
    """AS layer = diag(1/sigma) V_1^T x - mu/sigma: z is standardised, which is the measure
    the orthonormal Hermite basis is orthonormal under."""
    linear.weight.copy_((V / z_std.unsqueeze(0)).T.to(linear.weight.dtype))
    linear.bias.copy_((-z_mean / z_std).to(linear.bias.dtype))


@dataclass
class Projection:
    """Small per-sample matrices from one streamed pass: z = (x - center) W for each
    projection, teacher logits, labels, and (capped) raw features for the LR baseline."""

    z: dict[str, Tensor]
    logits: Tensor | None
    labels: Tensor
    features: np.ndarray | None


@torch.no_grad()
def project(
    pre: nn.Module,
    split: Split,
    maps: dict[str, tuple[Tensor, Tensor | None]],
    batch_size: int,
    device: torch.device,
    post: nn.Module | None = None,
    sketch: FrequentDirections | None = None,
    center: Tensor | None = None,
    keep_features: int = 0,
) -> Projection:
    """One pass of the pre-model over ``split``. ``maps`` name -> (W (n_l, r), center or None);
    ``post`` adds the teacher's logits; ``sketch`` receives the rows x - ``center`` (PCA)."""
    zs: dict[str, list[Tensor]] = {name: [] for name in maps}
    logits, labels, feats, kept = [], [], [], 0
    if post is not None:
        post.eval()
    for f, y in stream_features(pre, split, batch_size, device):
        flat = f.flatten(1).double()
        for name, (W, c) in maps.items():
            zs[name].append(((flat - c if c is not None else flat) @ W).cpu())
        if post is not None:
            logits.append(post(f).double().cpu())
        if sketch is not None:
            sketch.update(flat - center if center is not None else flat)
        if kept < keep_features:
            feats.append(flat[: keep_features - kept].float().cpu().numpy())
            kept += len(feats[-1])
        labels.append(y.cpu())
    return Projection(
        {name: torch.cat(v) for name, v in zs.items()},
        torch.cat(logits) if logits else None,
        torch.cat(labels),
        np.concatenate(feats) if feats else None,
    )


def _chunks(a: Tensor, b: Tensor, size: int = 4096) -> Iterator[tuple[Tensor, Tensor]]:
    for i in range(0, a.shape[0], size):
        yield a[i : i + size], b[i : i + size]


@dataclass
class Head:
    """Standardisation (mu, sigma) of z and a PCE fitted on the standardised z."""

    mu: Tensor
    sigma: Tensor
    pce: PCELayer
    fit: PCEFit

    def standardise(self, z: Tensor) -> Tensor:
        return (z - self.mu) / self.sigma

    @torch.no_grad()
    def accuracy(self, z: Tensor, labels: Tensor) -> float:
        pred = self.pce(self.standardise(z).to(self.pce.linear.weight.dtype)).argmax(1)
        return float((pred == labels).float().mean())


def fit_head(z: Tensor, logits: Tensor, degree: int, ridge: float, dist: Distributed | None = None) -> Head:
    """Standardise z with its own statistics and fit a degree-p PCE to the logits (eq. 6.20).
    ``dist``: z and logits are this rank's shard; statistics and normal equations are summed."""
    if dist is not None and dist.world_size > 1:
        n = dist.sum_numbers(z.shape[0])[0]
        mu = dist.all_reduce_sum(z.sum(0)) / n
        sigma = (dist.all_reduce_sum((z - mu).pow(2).sum(0)) / n).sqrt().clamp_min(1e-8)
    else:
        mu = z.mean(0)
        sigma = z.std(0, unbiased=False).clamp_min(1e-8)
    pce = PCELayer(z.shape[1], degree, logits.shape[1]).double()
    fit = fit_pce(pce, _chunks((z - mu) / sigma, logits), ridge=ridge, dist=dist)
    return Head(mu, sigma, pce, fit)


def _l1_prox(l1: float) -> Callable[[nn.Module, Callable[[Tensor], float]], None]:
    """Soft-thresholding S_{lr * lambda} (eq. 6.29) on every conv/linear weight after each
    step, with each weight's own current learning rate."""

    @torch.no_grad()
    def step(model: nn.Module, lr_of: Callable[[Tensor], float]) -> None:
        for module in model.modules():
            if isinstance(module, COMPUTE_TYPES):
                w = module.weight
                assert isinstance(w, Tensor)
                t = lr_of(w) * l1
                w.copy_(w.sign() * (w.abs() - t).clamp_min(0.0))

    return step


def sparse_cost(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> dict[str, float | int]:
    """Non-zero weights, their float32 storage (values only, as thesis ASNet-s) and FLOPs
    scaled by each layer's weight density."""
    summary = layer_table(model, input_shape)
    modules = dict(model.named_modules())
    flops = 0.0
    for layer in summary.layers:
        w = modules[layer.name].weight
        flops += layer.flops * float((w != 0).float().mean())
    nonzero = sum(int((t != 0).sum()) for t in model.state_dict().values() if t.is_floating_point())
    total = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    return {"nonzero_params": nonzero, "density": nonzero / max(total, 1), "storage_mb_nonzero": nonzero * 4 / 2**20,
            "flops_nonzero": round(flops)}  # fmt: skip


@dataclass
class ASNetResult:
    model: ASNet
    args: dict[str, Any]
    results: dict[str, Any]
    cut_analysis: LayerAnalysis
    warnings: list[str]
    history: TrainHistory | None
    registered: bool = True  # load_model rebuilds it from args; otherwise write it as a .pt2 program


def _cost(model: nn.Module, shape: tuple[int, ...] | list[int]) -> dict[str, Any]:
    return model_cost(model, shape).to_dict()


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def is_registered_teacher(arch: str) -> bool:
    """True when ``load_model`` can rebuild an ASNet of this teacher from its JSON args."""
    return arch.lower() in ARCHITECTURES and arch.lower() != "asnet"


def build_asnet_from_teacher(
    teacher: nn.Module,
    teacher_arch: str,
    teacher_args: dict[str, Any],
    input_shape: tuple[int, ...] | list[int],
    data: Dataset,
    settings: ASNetSettings,
    device: torch.device,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    dist: Distributed | None = None,
) -> ASNetResult:
    """Algorithm 2 end to end, with the thesis fig. 6.5b baselines at the same r.

    ``dist`` (several ranks): gradients, projections, the PCE fit, evaluation and fine-tuning
    are sharded over the ranks (sums all-reduced, sketches merged); the baselines, which fit
    scikit-learn models on all features at once, are skipped."""
    progress = silent_if_none(progress)
    say = log or (lambda _m: None)
    registered = is_registered_teacher(teacher_arch)
    teacher = runnable(teacher, input_shape).to(device).eval()
    chain = cut_model(teacher, input_shape)
    cut = chain.cut(settings.cut)
    sub_settings = settings.subspace
    n_train = len(data.train.subset(sub_settings.samples, seed=sub_settings.seed))
    notes: list[str] = []

    requested = settings.rank
    if isinstance(requested, int) and requested > cut.features:
        raise UsageError(
            f"--rank {requested} exceeds the {cut.features} neurons of layer {cut.index}",
            f"use --rank <= {cut.features}",
        )
    say(f"cut at layer {cut.index} ({cut.name}): n_l = {cut.features}; streaming per-sample gradients")
    subspace = active_subspace(chain, cut, data.train, sub_settings, device, progress=progress, dist=dist)
    n_active = subspace.active_neurons(sub_settings.eps)
    limit = min(sub_settings.sketch_size, cut.features, subspace.n_samples)
    if requested is None:
        rank = min(THESIS_RANK, max_rank_for_samples(n_train, settings.degree), limit)
        rank_rule = f"min(50, largest r with 2 C(r+{settings.degree},{settings.degree}) <= {n_train} samples)"
    elif requested == "auto":
        rank = min(n_active, limit)
        rank_rule = f"active neurons at eps = {sub_settings.eps} (eq. 6.17)"
    else:
        rank = int(requested)
        rank_rule = "--rank"
    if rank > limit:
        raise NumericalError(
            f"rank {rank} needs {rank} samples and sketch rows; {subspace.n_samples} samples were streamed",
            "use more --samples or a lower --rank",
        )
    V = subspace.V[:, :rank].double()
    analysis = LayerAnalysis(cut, subspace, sub_settings.eps, None, 0)

    pre = chain.pre_model(cut)
    post = chain.post_model(cut)
    fit_split = data.train.subset(sub_settings.samples, seed=sub_settings.seed)
    parallel = dist is not None and dist.world_size > 1
    if parallel and dist is not None:
        part = dist.shard(len(fit_split))
        fit_split = Split(fit_split.x[part.start : part.stop], fit_split.y[part.start : part.stop])
        if settings.baselines:
            notes.append(f"baselines skipped: they fit scikit-learn models on all features in one process ({dist.world_size} ranks)")
    bs = sub_settings.batch_size
    say(f"rank r = {rank} ({rank_rule}); fitting the degree-{settings.degree} PCE ({basis_size(rank, settings.degree)} basis functions)")
    pca_fd = FrequentDirections(cut.features, sub_settings.sketch_size, device=device) if settings.baselines and not parallel else None
    mean = subspace.mean_activation.to(device)
    keep = LOGREG_MAX_SAMPLES if pca_fd is not None else 0
    train = project(pre, fit_split, {"as": (V, None)}, bs, device, post=post, sketch=pca_fd, center=mean, keep_features=keep)
    assert train.logits is not None
    num_classes = int(train.logits.shape[1])  # the teacher's outputs, which may exceed the data's classes
    head = fit_head(train.z["as"], train.logits, settings.degree, settings.ridge, dist=dist)
    notes += head.fit.warnings

    asnet = ASNet(copy.deepcopy(pre), cut.features, rank, settings.degree, num_classes).to(device)
    _standardise_into(asnet.active, V, head.mu.to(device), head.sigma.to(device))
    with torch.no_grad():
        asnet.pce.linear.weight.copy_(head.pce.linear.weight)
    asnet.eval()
    acc_before = accuracy(asnet, data.test, device=device, dist=dist)

    teacher_acc = accuracy(teacher, data.test, device=device, dist=dist)
    baselines: dict[str, Any] = {"as_pce": acc_before}
    if pca_fd is not None:
        say("baselines: PCA+PCE, AS+LR, PCA+LR and LR on all n_l features")
        baselines.update(_baselines(pre, fit_split, data, train, pca_fd, V, mean, rank, settings, device))

    history = None
    if settings.finetune_epochs > 0:
        say(f"fine-tuning {settings.finetune_epochs} epochs (beta = {settings.beta}{', L1 ' + str(settings.l1) if settings.sparse else ''})")
        train_settings = TrainSettings(
            epochs=settings.finetune_epochs, lr=settings.lr, batch_size=sub_settings.batch_size, beta=settings.beta,
            seed=sub_settings.seed,
        )  # fmt: skip
        history = train_classifier(
            asnet, data, train_settings, device, teacher=teacher, after_step=_l1_prox(settings.l1) if settings.sparse else None,
            progress=progress,
            lr_overrides={asnet.active: settings.head_lr, asnet.pce: settings.head_lr} if settings.head_lr else None,
            dist=dist,
        )  # fmt: skip
    asnet.eval()
    acc_after = accuracy(asnet, data.test, device=device, dist=dist) if history is not None else acc_before

    teacher_cost = _cost(teacher, input_shape)
    asnet_cost = _cost(asnet, input_shape)
    pre_cost = _cost(asnet.pre, input_shape)
    head_module = nn.Sequential(asnet.active, asnet.pce)
    head_cost = _cost(head_module, (cut.features,))
    post_cost = _cost(post, tuple(cut.out_shape))
    latency: dict[str, float] = {}
    if settings.latency:  # median wall-clock ms per forward pass on this device
        for label, x, repeats in (("batch1", data.test.x[:1], 20), (f"batch{min(len(data.test), bs)}", data.test.x[:bs], 5)):
            latency[f"teacher_ms_{label}"] = measure_latency_ms(teacher, x, device, warmup=2, repeats=repeats)
            latency[f"asnet_ms_{label}"] = measure_latency_ms(asnet, x, device, warmup=2, repeats=repeats)
    asnet_entry = {"accuracy": acc_after, "accuracy_before_finetune": acc_before, **asnet_cost}
    if settings.sparse:
        asnet_entry.update(sparse_cost(asnet, input_shape))
    results: dict[str, Any] = {
        "teacher": {"accuracy": teacher_acc, **teacher_cost},
        "asnet": asnet_entry,
        "storage_reduction": _ratio(teacher_cost["storage_mb"], asnet_cost["storage_mb"]),
        "flop_reduction": _ratio(teacher_cost["flops"], asnet_cost["flops"]),
        "accuracy_drop_points": 100 * (teacher_acc - acc_after),
        "cut": {
            **cut.to_dict(),
            "rank": rank,
            "rank_rule": rank_rule,
            "degree": settings.degree,
            "n_basis": basis_size(rank, settings.degree),
            "eps": sub_settings.eps,
            "active_neurons": n_active,
            "active_neurons_eq612": subspace.active_neurons_eq612(sub_settings.eps),
            "eps_at_rank": subspace.eps_at_rank(rank),
            "sketch_size": sub_settings.sketch_size,
            "gradient_samples": subspace.n_samples,
            "sketch_covariance_error_rel": subspace.covariance_error / max(float(subspace.singular_values[0]) ** 2, 1e-300),
        },
        "split": {
            "pre_model": pre_cost,
            "as_pce": head_cost,
            "teacher_post_model": post_cost,
            "post_storage_reduction": _ratio(post_cost["storage_mb"], head_cost["storage_mb"]),
            "post_flop_reduction": _ratio(post_cost["flops"], head_cost["flops"]),
        },
        "pce": head.fit.to_dict(),
        "baselines": baselines,
        "latency_ms": latency,
        "finetune": {
            "epochs": settings.finetune_epochs,
            "beta": settings.beta,
            "lr": settings.lr,
            "head_lr": settings.head_lr if settings.head_lr is not None else settings.lr,
            "sparse": settings.sparse,
            "l1": settings.l1 if settings.sparse else None,
            "history": history.epochs if history else [],
        },
        "flops_convention": "2 x multiply-adds per sample (torch FlopCounterMode); PCE basis products not counted",
        "warnings": notes,
    }
    args = {
        "teacher_arch": teacher_arch.lower(),
        "teacher_args": dict(teacher_args),
        "cut": cut.index,
        "end": cut.end,
        "features": cut.features,
        "rank": rank,
        "degree": settings.degree,
        "num_classes": num_classes,
    }
    if cut.node is not None:
        args.update(node=cut.node, input_shape=[int(v) for v in input_shape])
    return ASNetResult(asnet.cpu(), args, results, analysis, notes, history, registered)


def _baselines(
    pre: nn.Module,
    fit_split: Split,
    data: Dataset,
    train: Projection,
    pca_fd: FrequentDirections,
    V: Tensor,
    mean: Tensor,
    rank: int,
    settings: ASNetSettings,
    device: torch.device,
) -> dict[str, Any]:
    """Thesis fig. 6.5b at the same r, no fine-tuning: PCA+PCE, AS+LR, PCA+LR, LR(all features).
    PCA = top-r right singular vectors of the centred pre-model outputs (same sketch)."""
    bs, seed = settings.subspace.batch_size, settings.subspace.seed
    _, W_pca = pca_fd.right_singular(rank)
    W_pca = W_pca.double()
    z_pca = project(pre, fit_split, {"pca": (W_pca, mean)}, bs, device).z["pca"]
    pca_head = fit_head(z_pca, train.logits if train.logits is not None else torch.empty(0), settings.degree, settings.ridge)
    test = project(pre, data.test, {"as": (V, None), "pca": (W_pca, mean)}, bs, device, keep_features=LOGREG_MAX_SAMPLES)
    assert train.features is not None and test.features is not None
    y_tr, y_te = train.labels.numpy(), test.labels.numpy()

    def lr(z_tr: Tensor, z_te: Tensor) -> float:
        return _logreg_accuracy(z_tr.float().numpy(), y_tr, z_te.float().numpy(), y_te, seed)

    return {
        "pca_pce": pca_head.accuracy(test.z["pca"], test.labels),
        "as_logreg": lr(train.z["as"], test.z["as"]),
        "pca_logreg": lr(z_pca, test.z["pca"]),
        "logreg_features": _logreg_accuracy(
            train.features, y_tr[: len(train.features)], test.features, y_te[: len(test.features)], seed
        ),
        "rank": rank,
        "pca_pce_fit": pca_head.fit.to_dict(),
    }
