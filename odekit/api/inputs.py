"""What the Python API accepts, turned into what the methods take.

A model is an ``nn.Module`` or a checkpoint path (any format `odekit.io.checkpoints.load_model`
reads); data is a data set name (``"digits"``, a ``.npz`` path), ``(x, y)`` tensors, a
``torch.utils.data.Dataset``, a ``DataLoader`` or an odekit `Dataset`; layers are module
objects, module names or the CLI's strings (``"7-16"``, ``"conv7-conv16"``).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from odekit.errors import DataError, LayerSelectionError, UsageError
from odekit.io.checkpoints import load_model
from odekit.io.datasets import SPLIT_SEED, Dataset, Split, dataset_for_model
from odekit.io.integrity import tensor_digest
from odekit.io.model_meta import LoadedModel, ModelMeta
from odekit.io.user_arch import parse_arch_args
from odekit.models.layers import LayerInfo, layer_table

ModelLike = nn.Module | str | Path | LoadedModel
# checkpoints `load` read, by module: reduce/asnet of such a module keep its architecture and metadata
_LOADED: weakref.WeakKeyDictionary[nn.Module, LoadedModel] = weakref.WeakKeyDictionary()
TEST_FRACTION = 0.2  # (x, y) without a test set: a seeded 80/20 split, as for .npz files


def load(path: str | Path, **how: Any) -> nn.Module:
    """Load any checkpoint odekit reads as an ``nn.Module`` in eval mode (on the CPU).

    ``how``: ``arch`` (zoo name, ``torchvision:NAME``, ``module:Name``, ``FILE.py:Name``),
    ``arch_args`` (a dict, or the CLI's ``key=value,...`` text), ``num_classes``,
    ``trust_checkpoint``. odekit's functions given the module later reuse its metadata
    (architecture, data set, normalisation).
    """
    return load_checkpoint(path, **how).model


def load_checkpoint(path: str | Path, **how: Any) -> LoadedModel:
    """`load` with the checkpoint's metadata, path and hash (`LoadedModel`)."""
    args = how.pop("arch_args", None)
    unknown = set(how) - {"arch", "num_classes", "trust_checkpoint"}
    if unknown:
        raise UsageError(f"load() takes no `{sorted(unknown)[0]}`", "give arch, arch_args, num_classes or trust_checkpoint")
    if isinstance(args, str):
        args = parse_arch_args(args)
    loaded = load_model(Path(path), arch_args=args, **how)
    _LOADED[loaded.model] = loaded
    return loaded


def as_loaded(model: ModelLike, input_shape: Sequence[int] | None = None) -> LoadedModel:
    """A `LoadedModel` for a path, a module `load` returned, or any other module (its class
    names its architecture, which no registry entry rebuilds: students are saved as ``.pt2``)."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, str | Path):
        return load_checkpoint(model)
    if not isinstance(model, nn.Module):
        raise UsageError(f"`model` must be an nn.Module or a checkpoint path, got {type(model).__name__}")
    known = _LOADED.get(model)
    if known is not None:
        return known
    cls = type(model)
    meta = ModelMeta(arch=f"{cls.__module__}:{cls.__qualname__}", input_shape=list(input_shape) if input_shape else None)
    digest = tensor_digest({k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)})
    return LoadedModel(model=model.eval(), meta=meta, path=Path(cls.__name__), sha256=digest, format="module")


def _tensors(data: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, integer labels) from tensors, a torch Dataset or a DataLoader."""
    if isinstance(data, tuple | list) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
    elif isinstance(data, torch.utils.data.DataLoader):
        batches = list(data)
        x, y = _stack([b[0] for b in batches], what, cat=True), _stack([b[1] for b in batches], what, cat=True)
    elif isinstance(data, torch.utils.data.Dataset):
        items = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
        x, y = _stack([item[0] for item in items], what), _stack([item[1] for item in items], what)
    else:
        raise UsageError(
            f"`{what}` must be (x, y) tensors, a torch Dataset, a DataLoader or a data set name; got {type(data).__name__}",
            "e.g. data=(x, y) with x of shape (N, C, H, W) and y of N integer labels",
        )
    if x.shape[0] != y.shape[0]:
        raise DataError(f"`{what}` holds {x.shape[0]} inputs and {y.shape[0]} labels", "give one label per input")
    return x.detach().float().cpu(), y.detach().long().cpu().reshape(-1)


def _stack(values: Iterable[Any], what: str, cat: bool = False) -> torch.Tensor:
    tensors = [v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for v in values]
    if not tensors:
        raise DataError(f"`{what}` is empty", "give at least one sample")
    return torch.cat(tensors) if cat else torch.stack(tensors)


def as_dataset(
    data: Any,
    model: LoadedModel | None = None,
    *,
    test: Any = None,
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
    num_classes: int | None = None,
) -> Dataset:
    """An odekit `Dataset` (train and test splits, in model-input units) from what the user gave.

    ``normalization=(mean, std)``: the tensors are ``(pixels - mean) / std`` (attack budgets and
    the valid box are in pixels); without it the tensors are the pixels themselves, in [0, 1]."""
    if isinstance(data, Dataset):
        return data
    if data is None or isinstance(data, str | Path):
        meta = model.meta if model is not None else ModelMeta(arch="")
        return dataset_for_model(meta.input_shape, meta.normalization, meta.dataset, str(data) if data else None)
    x, y = _tensors(data, "data")
    if test is not None:
        x_test, y_test = _tensors(test, "test")
    else:
        if len(y) < 2:
            raise DataError(f"`data` holds {len(y)} sample(s); a train/test split needs at least 2", "pass test=(x, y) too")
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
        cut = max(1, round((1 - TEST_FRACTION) * len(y)))
        x, y, x_test, y_test = x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]
    mean, std = ([0.0], [1.0]) if normalization is None else (list(normalization[0]), list(normalization[1]))
    classes = num_classes or int(max(int(y.max()), int(y_test.max()) if len(y_test) else 0)) + 1
    return Dataset("tensors", Split(x, y), Split(x_test, y_test), classes, tuple(x.shape[1:]), mean, std,
                   {"source": "in-memory tensors"})  # fmt: skip


def layer_spec(layers: Any, model: nn.Module, input_shape: Sequence[int], what: str = "layers") -> str | None:
    """The CLI's layer string for module objects, module names or CLI strings (None stays None).

    A module becomes its 1-based compute-layer index; a tuple ``(first, last)`` is a range and a
    list names several layers."""
    if layers is None or isinstance(layers, str):
        return layers
    if isinstance(layers, int):
        return str(layers)
    items = [layers] if isinstance(layers, nn.Module) else list(layers)
    if not items:
        raise LayerSelectionError(f"`{what}` is empty", "give a module, its name or a range such as '3-8'")
    table = None
    tokens: list[str] = []
    for item in items:
        if isinstance(item, nn.Module):
            table = table or layer_table(model, tuple(input_shape)).layers
            tokens.append(_layer_index(item, model, table, what))
        else:
            tokens.append(str(item))
    if isinstance(layers, tuple) and len(tokens) == 2:
        return f"{tokens[0]}-{tokens[1]}"
    return ",".join(tokens)


def _layer_index(module: nn.Module, model: nn.Module, table: list[LayerInfo], what: str) -> str:
    """The compute-layer index of ``module`` in ``model``'s layer table."""
    names = [name for name, candidate in model.named_modules() if candidate is module and name]
    for layer in table:
        if layer.name in names:
            return str(layer.index)
    raise LayerSelectionError(
        f"the module given as `{what}` ({type(module).__name__}) is not a conv or linear layer of the model",
        "pass a conv/linear submodule of this model (e.g. model.features[3]), its name or its index",
    )
