"""Read and write model checkpoints.

Formats: ``.safetensors`` (weights + odekit JSON metadata), ``.pt``/``.pth`` state dicts
(``torch.load(weights_only=True)``), TorchScript archives, and whole pickled modules (only with
``trust_checkpoint=True``, because unpickling runs arbitrary code).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from odekit import __version__
from odekit.errors import CheckpointError, InputFileError, OdekitError, UsageError
from odekit.io.integrity import DIGEST_KEY, tensor_digest, verify_tensor_digest, verify_zip_crc
from odekit.io.meta_schema import check_against_tensors, validate_meta_fields
from odekit.models.registry import architecture, build_model, require_num_classes
from odekit.writers.atomic import atomic_write_bytes, atomic_write_with
from odekit.writers.guards import require_finite

META_KEY = "odekit"
TORCHSCRIPT_META_FILE = "odekit_meta.json"


@dataclass
class ModelMeta:
    """What odekit knows about a model: how to rebuild it and where it came from."""

    arch: str
    args: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    input_shape: list[int] | None = None
    normalization: dict[str, list[float]] | None = None
    dataset: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    source_sha256: str | None = None
    odekit_version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelMeta:
        try:
            raw = validate_meta_fields(json.loads(text))
            known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
            return cls(**known)
        except (json.JSONDecodeError, TypeError, RecursionError) as exc:
            raise CheckpointError(
                f"checkpoint metadata is not valid odekit JSON: {exc}",
                "the file was not written by odekit; pass --arch and --num-classes",
            ) from exc

    def derived(self, arch: str, args: dict[str, Any], step: dict[str, Any], source: str) -> ModelMeta:
        """Metadata for a model made from this one (a student, an ASNet...)."""
        return ModelMeta(
            arch=arch,
            args=args,
            num_classes=self.num_classes,
            input_shape=self.input_shape,
            normalization=self.normalization,
            dataset=self.dataset,
            history=[*self.history, step],
            source_sha256=source,
            extra={},
        )


@dataclass
class LoadedModel:
    model: nn.Module
    meta: ModelMeta
    path: Path
    sha256: str
    format: str

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        return tuple(self.meta.input_shape) if self.meta.input_shape else None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def detect_format(path: Path) -> str:
    """'safetensors', 'torchscript' or 'pickle' from the file's first bytes, not its name."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if len(head) >= 9 and not head.startswith(b"PK"):
        header_len = int.from_bytes(head[:8], "little")
        if head[8:9] == b"{" and 0 < header_len < 100_000_000:
            return "safetensors"
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                verify_zip_crc(archive, path)
        except OdekitError:
            raise
        except Exception as exc:  # a damaged zip raises BadZipFile, UnicodeDecodeError, OSError...
            raise CheckpointError(
                f"'{path}' looks like a zip archive but cannot be read ({exc})",
                "the file may be truncated; copy it again",
            ) from exc
        if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
            return "torchscript"
        return "pickle"
    if head[:1] == b"\x80":
        return "pickle"
    raise CheckpointError(
        f"'{path}' is not a checkpoint odekit can read",
        "expected .safetensors, a torch.save state dict (.pt/.pth) or a TorchScript archive",
    )


def _state_dict_from_object(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], ModelMeta | None]:
    meta = None
    if isinstance(obj, dict) and isinstance(obj.get("odekit_meta"), str):
        meta = ModelMeta.from_json(obj["odekit_meta"])
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net", "weights"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(
            f"'{path}' does not hold a state dict", "save the model with torch.save(model.state_dict(), path)"
        )
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"'{path}' holds no tensors", "is this really a model checkpoint?")
    # DataParallel / DistributedDataParallel prefix every key with 'module.'
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors, meta


def _meta_from_options(arch: str | None, num_classes: int | None, path: Path) -> ModelMeta:
    if arch is None:
        raise UsageError(
            f"'{path}' carries no odekit metadata, so its architecture is unknown",
            "pass --arch NAME --num-classes K (odekit info --help lists the architectures)",
        )
    spec = architecture(arch)
    args: dict[str, Any] = {}
    if num_classes is not None:
        args["num_classes"] = require_num_classes(num_classes, arch)
    shape = list(spec.default_input_shape) if spec.default_input_shape else None
    return ModelMeta(arch=arch.lower(), args=args, num_classes=num_classes, input_shape=shape)


def _override(meta: ModelMeta, arch: str | None, num_classes: int | None) -> ModelMeta:
    if arch is not None and arch.lower() != meta.arch:
        raise UsageError(
            f"--arch {arch} contradicts the checkpoint's own architecture '{meta.arch}'",
            "drop --arch; odekit checkpoints describe themselves",
        )
    if num_classes is not None and meta.num_classes not in (None, num_classes):
        raise UsageError(
            f"--num-classes {num_classes} contradicts the checkpoint ({meta.num_classes} classes)",
            "drop --num-classes",
        )
    return meta


def _build_and_fill(meta: ModelMeta, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    check_against_tensors(meta.arch, meta.args, state, path)  # before anything is allocated
    model = build_model(meta.arch, meta.args)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(
            f"'{path}' does not match architecture '{meta.arch}': {'; '.join(parts)}",
            "check --arch/--num-classes or the checkpoint's metadata",
        )
    for key, tensor in state.items():
        if tuple(expected[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"'{path}' does not match architecture '{meta.arch}': tensor '{key}' has shape "
                f"{tuple(tensor.shape)}, the architecture expects {tuple(expected[key].shape)}",
                "check --arch/--num-classes (and width or input-size arguments)",
            )
    model.load_state_dict(state, strict=True)
    return model


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    trust_checkpoint: bool = False,
) -> LoadedModel:
    """Load any supported checkpoint as an ``nn.Module`` in eval mode on the CPU."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"checkpoint '{path}' does not exist", "check the path")
    if not path.is_file():
        raise InputFileError(f"checkpoint '{path}' is not a file", "give the path of a checkpoint file")
    fmt = detect_format(path)
    sha = file_sha256(path)
    loader = {"safetensors": _load_safetensors, "torchscript": _load_torchscript, "pickle": _load_pickle}[fmt]
    try:
        model, meta = loader(path, arch, num_classes, trust_checkpoint)
    except OdekitError:
        raise
    except Exception as exc:  # damaged bytes can fail deep inside torch or safetensors
        raise CheckpointError(
            f"'{path}' is damaged and cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})",
            "the file may be truncated or corrupted; copy or export it again",
        ) from exc
    model.eval()
    return LoadedModel(model=model, meta=meta, path=path, sha256=sha, format=fmt)


def _load_safetensors(
    path: Path, arch: str | None, num_classes: int | None, trust: bool
) -> tuple[nn.Module, ModelMeta]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = path.read_bytes()
    try:
        state = load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
    except (SafetensorError, ValueError, RuntimeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"'{path}' is not a valid safetensors file ({exc})", "the file may be truncated; copy it again"
        ) from exc
    verify_tensor_digest(state, (header.get("__metadata__") or {}).get(DIGEST_KEY), path)
    raw_meta = (header.get("__metadata__") or {}).get(META_KEY)
    meta = ModelMeta.from_json(raw_meta) if raw_meta else _meta_from_options(arch, num_classes, path)
    meta = _override(meta, arch if raw_meta else None, num_classes if raw_meta else None)
    return _build_and_fill(meta, state, path), meta


def _torch_load(source: Any, weights_only: bool) -> Any:
    return torch.load(source, map_location="cpu", weights_only=weights_only)


def _load_pickle(
    path: Path, arch: str | None, num_classes: int | None, trust: bool
) -> tuple[nn.Module, ModelMeta]:
    try:
        obj = _torch_load(path, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            if not trust:
                raise CheckpointError(
                    f"'{path}' contains pickled code (a whole model object), which odekit does not run by default",
                    "save a state dict instead, or pass --trust-checkpoint if you trust its source",
                ) from exc
            return _load_trusted_module(path, num_classes)
        raise CheckpointError(
            f"'{path}' cannot be read as a torch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})",
            "the file may be truncated or not a checkpoint",
        ) from exc
    if isinstance(obj, nn.Module):  # only reachable for allow-listed classes
        return obj, ModelMeta(arch=f"pickled:{type(obj).__name__}", num_classes=num_classes)
    state, meta = _state_dict_from_object(obj, path)
    meta = _override(meta, arch, num_classes) if meta else _meta_from_options(arch, num_classes, path)
    return _build_and_fill(meta, state, path), meta


def _load_trusted_module(path: Path, num_classes: int | None) -> tuple[nn.Module, ModelMeta]:
    try:
        obj = _torch_load(path, weights_only=False)
    except Exception as exc:
        raise CheckpointError(
            f"'{path}' could not be unpickled ({type(exc).__name__}: {exc})",
            "the class definitions it needs must be importable",
        ) from exc
    if not isinstance(obj, nn.Module):
        raise CheckpointError(f"'{path}' holds a state dict, not a module", "pass --arch instead of --trust-checkpoint")
    return obj, ModelMeta(arch=f"pickled:{type(obj).__name__}", num_classes=num_classes)


def _load_torchscript(
    path: Path, arch: str | None, num_classes: int | None, trust: bool
) -> tuple[nn.Module, ModelMeta]:
    extra = {TORCHSCRIPT_META_FILE: ""}
    try:
        scripted = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:
        raise CheckpointError(
            f"'{path}' is not a loadable TorchScript archive ({type(exc).__name__})",
            "the file may be truncated; export it again with torch.jit.save",
        ) from exc
    meta = ModelMeta.from_json(extra[TORCHSCRIPT_META_FILE]) if extra[TORCHSCRIPT_META_FILE] else None
    if meta is None and arch is None:
        # Without an architecture we keep the scripted module itself: it runs, but forward
        # hooks (layer tables, activation streaming) are not available on it.
        return scripted, ModelMeta(arch="torchscript", num_classes=num_classes)
    meta = _override(meta, arch, num_classes) if meta else _meta_from_options(arch, num_classes, path)
    state = {k: v.detach().clone() for k, v in scripted.state_dict().items()}
    return _build_and_fill(meta, state, path), meta


def state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies, with tensors that share storage split apart (safetensors forbids sharing)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        t = tensor.detach().cpu()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[key] = t.contiguous()
    return out


def save_model(path: str | Path, model: nn.Module, meta: ModelMeta, *, force: bool = False) -> Path:
    """Write weights + metadata as safetensors, atomically."""
    from safetensors.torch import save_file

    state = state_dict_for_saving(model)
    metadata = {META_KEY: meta.to_json(), "format": "pt", DIGEST_KEY: tensor_digest(state)}
    require_finite(state.items(), f"writing the model '{Path(path).name}'")
    return atomic_write_with(path, lambda tmp: save_file(state, str(tmp), metadata=metadata), force)


def save_state_dict_pt(path: str | Path, model: nn.Module, meta: ModelMeta | None, *, force: bool = False) -> Path:
    """Write a ``torch.save`` state dict that ``weights_only`` loading accepts."""
    payload: dict[str, Any] = dict(state_dict_for_saving(model))
    if meta is not None:
        payload["odekit_meta"] = meta.to_json()
    return atomic_write_with(path, lambda tmp: torch.save(payload, tmp), force)


def save_torchscript(
    path: str | Path, model: nn.Module, meta: ModelMeta | None, example: torch.Tensor, *, force: bool = False
) -> Path:
    """Trace ``model`` and write a TorchScript archive carrying the odekit metadata."""
    traced = torch.jit.trace(model.eval(), example)
    extra = {TORCHSCRIPT_META_FILE: meta.to_json()} if meta is not None else {}
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files=extra)
    return atomic_write_bytes(path, buffer.getvalue(), force)
