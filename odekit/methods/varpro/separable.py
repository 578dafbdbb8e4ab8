"""A network x = W F(y, theta) + b split at its last ``nn.Linear``: theta, W and F(y, theta).

The features F are what the last linear layer receives (a forward hook reads them), so any
model whose output *is* its last ``nn.Linear`` applied to something is separable; the
constructor checks that on a probe input. `Linearization` holds one forward pass with its
graph and gives J_theta F v (double-backward trick: the vjp is linear in its cotangent, so
differentiating it again in the cotangent gives the jvp) and J_theta F^T U.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector

from odekit.errors import UnsupportedModelError


def last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UnsupportedModelError(
            f"the model ({type(model).__name__}) has no nn.Linear layer to eliminate",
            "VarPro needs a network whose last layer is nn.Linear (e.g. odenet_antisym, odenet4)",
        )
    return linears[-1]


class Separable:
    """theta = every trainable parameter except the head's; W = [head.weight, head.bias]."""

    def __init__(self, model: nn.Module, probe: Tensor | None = None) -> None:
        self.model = model
        self.head = last_linear(model)
        head_ids = {id(p) for p in self.head.parameters()}
        self.theta = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
        if not self.theta:
            raise UnsupportedModelError("the model has no parameters before its last linear layer", "VarPro needs a feature extractor to train")
        self.has_bias = self.head.bias is not None
        if probe is not None:
            self.check(probe)

    @property
    def num_outputs(self) -> int:
        return int(self.head.out_features)

    def _run(self, x: Tensor) -> tuple[Tensor, Tensor]:
        captured: list[Tensor] = []
        handle = self.head.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0]))
        try:
            out = self.model(x)
        finally:
            handle.remove()
        if not captured:
            raise UnsupportedModelError("the last nn.Linear layer is never called", "VarPro needs the linear head in the forward pass")
        return captured[-1], out

    def check(self, probe: Tensor) -> None:
        """The model's output must be head(features): nothing may follow the head."""
        with torch.no_grad():
            feats, out = self._run(probe)
            if feats.ndim != 2 or out.shape != (probe.shape[0], self.num_outputs) \
                    or not torch.allclose(self.head(feats), out, rtol=1e-5, atol=1e-6):  # fmt: skip
                raise UnsupportedModelError(
                    f"the output of {type(self.model).__name__} is not its last linear layer applied to flat features",
                    "VarPro needs x = W F(y, theta) + b: a model that ends in nn.Linear",
                )

    def features(self, x: Tensor) -> Tensor:
        """F(x, theta) (n, m), differentiable in theta when grad mode is on."""
        return self._run(x)[0]

    def theta_vector(self) -> Tensor:
        return parameters_to_vector(self.theta).detach().clone()

    @torch.no_grad()
    def set_theta(self, vec: Tensor) -> None:
        # Swap .data (no version bump): a retained graph of a rejected trust-region point stays
        # usable once theta is restored, which an in-place copy_ would forbid.
        start = 0
        for p in self.theta:
            p.data = vec[start : start + p.numel()].view_as(p).to(p.dtype).clone()
            start += p.numel()

    def get_W(self) -> Tensor:
        """[weight, bias] as one (t, m + 1) matrix (just the weight without a bias)."""
        w = self.head.weight.detach()
        if self.head.bias is None:
            return w.clone()
        return torch.cat([w, self.head.bias.detach()[:, None]], dim=1)

    @torch.no_grad()
    def set_W(self, W: Tensor) -> None:
        m = self.head.in_features
        self.head.weight.copy_(W[:, :m].to(self.head.weight))
        if self.head.bias is not None:
            self.head.bias.copy_(W[:, m].to(self.head.bias))

    def augment(self, features: Tensor) -> Tensor:
        if not self.has_bias:
            return features
        ones = torch.ones(features.shape[0], 1, dtype=features.dtype, device=features.device)
        return torch.cat([features, ones], dim=1)


@dataclass
class Linearization:
    """One forward pass F(x, theta) with its graph; jvp/vjp against theta as flat vectors."""

    sep: Separable
    F: Tensor
    _cotangent: Tensor | None = None
    _vjp_graph: tuple[Tensor, ...] | None = None

    @classmethod
    def at(cls, sep: Separable, x: Tensor) -> Linearization:
        with torch.enable_grad():
            return cls(sep, sep.features(x))

    def _grads(self, out: tuple[Tensor, ...] | Tensor, inputs, grad_outputs, create_graph: bool = False) -> tuple[Tensor | None, ...]:
        return torch.autograd.grad(out, inputs, grad_outputs, retain_graph=True, create_graph=create_graph, allow_unused=True)

    def _flat(self, grads: tuple[Tensor | None, ...]) -> Tensor:
        return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, self.sep.theta, strict=True)])

    def gradient(self, dF: Tensor) -> Tensor:
        """J^T dF, recording the graph that later jvps differentiate (one backward pass)."""
        with torch.enable_grad():
            self._cotangent = dF.detach().to(self.F.dtype).requires_grad_(True)
            grads = self._grads(self.F, self.sep.theta, self._cotangent, create_graph=True)
            self._vjp_graph = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.sep.theta, strict=True))
        return torch.cat([g.detach().reshape(-1) for g in self._vjp_graph])

    def vjp(self, U: Tensor) -> Tensor:
        """J_theta F^T U as a flat vector."""
        return self._flat(self._grads(self.F, self.sep.theta, U.to(self.F.dtype)))

    def jvp(self, v: Tensor) -> Tensor:
        """J_theta F v (n, m); needs `gradient` to have run (it records the vjp graph)."""
        if self._vjp_graph is None or self._cotangent is None:
            raise RuntimeError("call gradient() before jvp()")
        pieces, start = [], 0
        for p in self.sep.theta:
            pieces.append(v[start : start + p.numel()].view_as(p).to(p.dtype))
            start += p.numel()
        needs = [g.requires_grad for g in self._vjp_graph]
        outs = tuple(g for g, k in zip(self._vjp_graph, needs, strict=True) if k)
        vs = tuple(pc for pc, k in zip(pieces, needs, strict=True) if k)
        if not outs:
            return torch.zeros_like(self.F)
        (jv,) = torch.autograd.grad(outs, self._cotangent, vs, retain_graph=True, allow_unused=True)
        return torch.zeros_like(self.F) if jv is None else jv.detach()
