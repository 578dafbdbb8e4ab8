"""Architectures odekit did not write: ``--arch module.path:Name``, ``FILE.py:Name``, ``torchvision:NAME``.

A user architecture is a class or factory that, called with ``--arch-args`` (JSON kwargs), returns
the ``nn.Module`` a state dict is loaded into. This module also makes a trusted pickle's code
importable (the checkpoint's folder and the working directory go on ``sys.path`` while it is
unpickled) and explains state-dict mismatches key by key.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from odekit.errors import CheckpointError, UsageError

USER_PREFIX = "user:"
TORCHVISION_PREFIX = "torchvision:"
MISMATCH_LINES = 10


@dataclass(frozen=True)
class ArchSpec:
    """A parsed ``--arch`` value: a zoo name, a torchvision builder, or a user module/file + attribute."""

    kind: str  # "zoo" | "torchvision" | "user"
    target: str  # zoo name, torchvision builder name, or module path / file path
    attribute: str = ""

    @property
    def meta_arch(self) -> str:
        """The ``meta.arch`` recorded for models built from this spec."""
        if self.kind == "zoo":
            return self.target.lower()
        if self.kind == "torchvision":
            return f"{TORCHVISION_PREFIX}{self.target}"
        return f"{USER_PREFIX}{self.target}:{self.attribute}"

    @property
    def is_file(self) -> bool:
        return self.kind == "user" and self.target.endswith(".py")


def parse_arch(value: str) -> ArchSpec:
    """``NAME`` (zoo), ``torchvision:NAME``, ``module.path:Name`` or ``path/file.py:Name``."""
    text = value.strip()
    if text.startswith(USER_PREFIX):  # meta.arch written back as --arch
        text = text[len(USER_PREFIX):]
    if ":" not in text:
        return ArchSpec("zoo", text)
    target, _, attribute = text.rpartition(":")
    if not target or not attribute.isidentifier():
        raise UsageError(
            f"cannot read `arch` '{value}'",
            "write a zoo name, torchvision:NAME, module.path:Name or path/to/file.py:Name",
        )
    if target == "torchvision":
        return ArchSpec("torchvision", attribute)
    return ArchSpec("user", target, attribute)


def parse_arch_args(text: str | None) -> dict[str, Any]:
    """``--arch-args`` JSON: an object of keyword arguments."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"`arch_args` is not valid JSON ({exc.msg} at column {exc.colno})", 'write a JSON object, e.g. \'{"num_classes": 10}\'') from exc
    if not isinstance(value, dict):
        raise UsageError("`arch_args` must be a JSON object of keyword arguments", 'e.g. \'{"num_classes": 10, "width": 2}\'')
    return value


@contextlib.contextmanager
def importable(*folders: Path) -> Iterator[None]:
    """Put ``folders`` at the front of ``sys.path`` for the duration (imports of user code)."""
    added = [str(f.resolve()) for f in folders if str(f.resolve()) not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for entry in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(entry)


def load_user_file(path: Path) -> ModuleType:
    """Import ``path`` as a module named after its stem (so pickles naming that module resolve)."""
    if not path.is_file():
        raise UsageError(f"`arch` file '{path}' does not exist", "give the path of the .py file that defines the model")
    resolved = path.resolve()
    name = path.stem
    existing = sys.modules.get(name)
    if existing is not None and Path(getattr(existing, "__file__", "") or "").resolve() == resolved:
        return existing
    if existing is not None or not name.isidentifier():
        name = f"odekit_user_{abs(hash(str(resolved)))}"
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import '{path}' as Python code", "give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with importable(resolved.parent):
            spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise UsageError(
            f"importing '{path}' failed ({type(exc).__name__}: {_first_line(exc)})",
            "the file must import cleanly on its own; run `python FILE.py` to see the error",
        ) from exc
    return module


def _import_module(target: str) -> ModuleType:
    try:
        with importable(Path.cwd()):
            return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        raise UsageError(
            f"`arch` module '{target}' cannot be imported ({exc})",
            "add its folder to PYTHONPATH, or pass `arch` path/to/file.py:Name",
        ) from exc
    except Exception as exc:
        raise UsageError(f"importing '{target}' failed ({type(exc).__name__}: {_first_line(exc)})", "fix the module so it imports cleanly") from exc


def _torchvision_builder(name: str) -> Any:
    try:
        from torchvision import models
    except ImportError as exc:
        raise UsageError("`arch` torchvision:... needs torchvision", "pip install torchvision") from exc
    try:
        return models.get_model_builder(name)
    except ValueError as exc:
        cls = getattr(models, name, None)  # a model class for a custom configuration (VisionTransformer)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
        known = ", ".join(sorted(models.list_models(module=models))[:12])
        raise UsageError(
            f"torchvision has no model '{name}'",
            f"choose e.g. {known}, ..., or a class such as VisionTransformer with `arch_args`",
        ) from exc


def build_from_spec(spec: ArchSpec, args: dict[str, Any]) -> nn.Module:
    """Call the user's class/factory (or torchvision's builder) with ``args``."""
    if spec.kind == "torchvision":
        builder = _torchvision_builder(spec.target)
    else:
        module = load_user_file(Path(spec.target)) if spec.is_file else _import_module(spec.target)
        builder = getattr(module, spec.attribute, None)
        if builder is None or not callable(builder):
            names = sorted(n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, nn.Module))
            raise UsageError(
                f"'{spec.target}' defines no class or function '{spec.attribute}'",
                f"nn.Module classes there: {', '.join(names) or 'none'}",
            )
    try:
        model = builder(**args)
    except Exception as exc:
        raise UsageError(
            f"building {spec.meta_arch} with arguments {args} failed ({type(exc).__name__}: {_first_line(exc)})",
            "fix `arch_args` (a JSON object of the constructor's keyword arguments)",
        ) from exc
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec.meta_arch} returned {type(model).__name__}, not an nn.Module", "point `arch` at the model class or a factory returning one")
    return model


class StateDictMismatchError(CheckpointError):
    """A state dict that does not fit the architecture, with one line per differing key."""

    def __init__(self, message: str, hint: str, details: list[str]) -> None:
        super().__init__(message, hint)
        self.details = details

    def one_line(self) -> str:
        return "\n".join([super().one_line(), *self.details])


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape) or "scalar"


def check_state_dict(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    """Raise `StateDictMismatchError` listing missing/unexpected keys and shape mismatches (capped)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or wrong):
        return
    lines = [f"  missing in checkpoint: {k} ({_shape(expected[k])})" for k in missing]
    lines += [f"  unexpected in checkpoint: {k} ({_shape(state[k])})" for k in unexpected]
    lines += [f"  shape mismatch: {k}: checkpoint {_shape(state[k])}, model {_shape(expected[k])}" for k in wrong]
    if len(lines) > MISMATCH_LINES:
        lines = [*lines[:MISMATCH_LINES], f"  ... and {len(lines) - MISMATCH_LINES} more"]
    counts = ", ".join(
        f"{n} {what}" for n, what in ((len(missing), "missing"), (len(unexpected), "unexpected"), (len(wrong), "shape mismatches")) if n
    )
    raise StateDictMismatchError(
        f"'{path}' does not match architecture '{arch}' ({counts})",
        "pass the `arch` (and `arch_args`/`num_classes`) the weights were trained with; "
        "rename keys with a script if the class changed (see docs/own-models.md)",
        lines,
    )


def missing_module_hint(exc: BaseException) -> str:
    """The hint for a pickle whose class's module cannot be imported."""
    name = getattr(exc, "name", None) or str(exc)
    return (
        f"make module '{name}' importable: put its folder on PYTHONPATH (the checkpoint's folder and the "
        f"working directory already are), or pass `arch` path/to/{name.split('.')[-1]}.py:ClassName"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
