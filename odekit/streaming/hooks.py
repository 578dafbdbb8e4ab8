"""Stream chosen modules' outputs (or inputs) batch by batch with forward hooks.

``LayerStream`` runs the model in eval mode under ``torch.no_grad()`` over an iterable of
batches and yields, per batch, a dict ``{name: Tensor(B, D)}`` of flattened captures on the
chosen device. Nothing is kept beyond the current batch: the dict is emptied before the next
forward pass, and the forward pass stops as soon as every requested module has fired.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from odekit.errors import UsageError
from odekit.progress import Progress, silent_if_none

__all__ = ["LayerStream", "batch_inputs", "model_device", "stream_layer_outputs"]


class _StopForward(Exception):
    """Raised inside a hook once every requested capture is in: skips the rest of the model."""


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def batch_inputs(batch: Any) -> tuple[Tensor, Tensor | None]:
    """Split a batch that is ``x`` or ``(x, y, ...)`` into ``(x, y or None)``."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], y
    raise UsageError("batches must be tensors or (inputs, labels) tuples")


def _named(
    modules: Mapping[str, nn.Module] | Sequence[nn.Module] | nn.Module,
) -> dict[str, nn.Module]:
    if isinstance(modules, nn.Module):
        return {"0": modules}
    if isinstance(modules, Mapping):
        return dict(modules)
    return {str(i): m for i, m in enumerate(modules)}


class LayerStream:
    """Forward hooks on ``modules`` (dict name -> module, a list, or one module).

    ``capture``: ``"output"`` (default) or ``"input"`` (the first positional input).
    ``flatten``: reshape each capture to (B, D). ``device``: where captures are delivered
    (defaults to the model's device). ``dtype``: optional cast of the captures.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Mapping[str, nn.Module] | Sequence[nn.Module] | nn.Module,
        capture: str = "output",
        device: torch.device | str | None = None,
        flatten: bool = True,
        dtype: torch.dtype | None = None,
        stop_early: bool = True,
    ) -> None:
        if capture not in ("output", "input"):
            raise UsageError(f"capture must be 'output' or 'input', got '{capture}'")
        self.model = model
        self.modules = _named(modules)
        if not self.modules:
            raise UsageError("choose at least one module to stream")
        owned = {id(m) for m in model.modules()}
        for name, m in self.modules.items():
            if id(m) not in owned:
                raise UsageError(f"module '{name}' is not part of the model")
        self.capture = capture
        self.model_device = model_device(model)
        self.device = torch.device(device) if device is not None else self.model_device
        self.flatten = flatten
        self.dtype = dtype
        self.stop_early = stop_early
        self._held: dict[str, Tensor] = {}
        self.max_rows_held = 0  # largest number of rows ever held at once (per module)

    def held_rows(self) -> int:
        """Rows currently held per module (0 between batches)."""
        return max((t.shape[0] for t in self._held.values()), default=0)

    def _hook(self, name: str):
        def hook(_module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            value = inputs[0] if self.capture == "input" else output
            if not isinstance(value, Tensor):
                raise UsageError(f"module '{name}' does not produce a single tensor to stream")
            value = value.detach()
            if self.flatten:
                value = value.reshape(value.shape[0], -1)
            value = value.to(device=self.device, dtype=self.dtype or value.dtype)
            self._held[name] = value
            self.max_rows_held = max(self.max_rows_held, value.shape[0])
            if self.stop_early and len(self._held) == len(self.modules):
                raise _StopForward

        return hook

    def run_batch(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        """One forward pass; returns the captures and the model output (None if stopped early)."""
        handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        out: Tensor | None = None
        self._held = {}
        try:
            with torch.no_grad():
                try:
                    out = self.model(x.to(self.model_device))
                except _StopForward:
                    out = None
        finally:
            for h in handles:
                h.remove()
        missing = set(self.modules) - set(self._held)
        if missing:
            raise UsageError(
                f"module(s) {', '.join(sorted(missing))} never ran in the forward pass",
                "choose modules that the model's forward() calls",
            )
        held, self._held = self._held, {}
        return held, out

    def stream(
        self,
        batches: Iterable[Any],
        progress: Progress | None = None,
        total: int | None = None,
        description: str = "streaming layer outputs",
    ) -> Iterator[dict[str, Tensor]]:
        """Yield ``{name: (B, D)}`` per batch; the model is put in eval mode and restored."""
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in silent_if_none(progress).track(batches, total, description):
                x, _ = batch_inputs(batch)
                held, _ = self.run_batch(x)
                yield held
                del held
        finally:
            self.model.train(was_training)


def stream_layer_outputs(
    model: nn.Module,
    modules: Mapping[str, nn.Module] | Sequence[nn.Module] | nn.Module,
    batches: Iterable[Any],
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    total: int | None = None,
    capture: str = "output",
    dtype: torch.dtype | None = None,
) -> Iterator[dict[str, Tensor]]:
    """Functional form of ``LayerStream(...).stream(batches)``."""
    yield from LayerStream(model, modules, capture=capture, device=device, dtype=dtype).stream(
        batches, progress=progress, total=total
    )
