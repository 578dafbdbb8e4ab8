"""Read and write model checkpoints.

Formats: ``.safetensors`` (weights + odekit JSON metadata), ``.pt``/``.pth`` state dicts
(``torch.load(weights_only=True)``), TorchScript archives, ``torch.export`` archives (``.pt2``),
and whole pickled modules (only with ``trust_checkpoint=True``, because unpickling runs arbitrary
code). A state dict is loaded into a zoo architecture or the user's own (``--arch FILE.py:Name``,
see `odekit.io.user_arch`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from odekit.errors import CheckpointError, InputFileError, OdekitError, UsageError
from odekit.io.exported import is_export_archive, load_exported
from odekit.io.integrity import DIGEST_KEY, tensor_digest, verify_tensor_digest, verify_zip_crc
from odekit.io.meta_schema import check_against_tensors
from odekit.io.model_meta import META_KEY, TORCHSCRIPT_META_FILE, LoadedModel, ModelMeta
from odekit.io.user_arch import (
    ArchSpec,
    build_from_spec,
    check_state_dict,
    importable,
    load_user_file,
    missing_module_hint,
    parse_arch,
)
from odekit.models.registry import architecture, build_model, require_num_classes
from odekit.writers.atomic import atomic_write_bytes, atomic_write_with
from odekit.writers.guards import require_finite
from odekit.writers.tensor_file import write_safetensors


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def detect_format(path: Path) -> str:
    """'safetensors', 'export', 'torchscript' or 'pickle' from the file's first bytes, not its name."""
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
        if is_export_archive(names):
            return "export"
        if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
            return "torchscript"
        return "pickle"
    if head[:1] == b"\x80":
        return "pickle"
    raise CheckpointError(
        f"'{path}' is not a checkpoint odekit can read",
        "expected .safetensors, a torch.save state dict (.pt/.pth), a TorchScript or a torch.export (.pt2) archive",
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


def _meta_from_options(
    arch: str | None, num_classes: int | None, path: Path, arch_args: dict[str, Any] | None = None
) -> ModelMeta:
    if arch is None:
        raise UsageError(
            f"'{path}' carries no odekit metadata, so its architecture is unknown",
            "pass `arch` NAME `num_classes` K, `arch` path/to/file.py:ClassName or `arch` torchvision:NAME "
            "(see docs/own-models.md)",
        )
    spec = parse_arch(arch)
    args: dict[str, Any] = dict(arch_args or {})
    if spec.kind != "zoo":
        if num_classes is not None and spec.kind == "torchvision":
            args.setdefault("num_classes", num_classes)
        return ModelMeta(arch=spec.meta_arch, args=args, num_classes=num_classes)
    entry = architecture(spec.target)
    if num_classes is not None:
        args["num_classes"] = require_num_classes(num_classes, arch)
    shape = list(entry.default_input_shape) if entry.default_input_shape else None
    return ModelMeta(arch=spec.meta_arch, args=args, num_classes=num_classes, input_shape=shape)


def _override(meta: ModelMeta, arch: str | None, num_classes: int | None) -> ModelMeta:
    if arch is not None and parse_arch(arch).meta_arch != meta.arch:
        raise UsageError(
            f"`arch` {arch} contradicts the checkpoint's own architecture '{meta.arch}'",
            "drop `arch`; odekit checkpoints describe themselves",
        )
    if num_classes is not None and meta.num_classes not in (None, num_classes):
        raise UsageError(
            f"`num_classes` {num_classes} contradicts the checkpoint ({meta.num_classes} classes)",
            "drop `num_classes`",
        )
    return meta


def _build_and_fill(meta: ModelMeta, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    spec = parse_arch(meta.arch)
    if spec.kind == "zoo":
        check_against_tensors(meta.arch, meta.args, state, path)  # before anything is allocated
    model = build_model(meta.arch, meta.args) if spec.kind == "zoo" else build_from_spec(spec, meta.args)
    check_state_dict(model.state_dict(), state, path, meta.arch)
    model.load_state_dict(state, strict=True)
    return model


def _rebuild_from_module(
    module: nn.Module | torch.jit.ScriptModule,
    path: Path,
    arch: str,
    num_classes: int | None,
    arch_args: dict[str, Any] | None,
) -> tuple[nn.Module, ModelMeta]:
    """Honour --arch for a file that holds a whole module: build the architecture, load its weights."""
    meta = _meta_from_options(arch, num_classes, path, arch_args)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return _build_and_fill(meta, state, path), meta


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    trust_checkpoint: bool = False,
    arch_args: dict[str, Any] | None = None,
) -> LoadedModel:
    """Load any supported checkpoint as an ``nn.Module`` in eval mode on the CPU.

    ``arch`` is a zoo name, ``torchvision:NAME``, ``module.path:Name`` or ``FILE.py:Name``
    (called with ``arch_args``); it is honoured for every format or refused, never ignored.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"checkpoint '{path}' does not exist", "check the path")
    if not path.is_file():
        raise InputFileError(f"checkpoint '{path}' is not a file", "give the path of a checkpoint file")
    fmt = detect_format(path)
    sha = file_sha256(path)
    if arch_args and arch is None:
        raise UsageError("`arch_args` was given without `arch`", "pass `arch` too, or drop `arch_args`")
    loader = {
        "safetensors": _load_safetensors,
        "torchscript": _load_torchscript,
        "pickle": _load_pickle,
        "export": _load_export,
    }[fmt]
    try:
        model, meta = loader(path, arch, num_classes, trust_checkpoint, arch_args)
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
    path: Path, arch: str | None, num_classes: int | None, trust: bool, arch_args: dict[str, Any] | None
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
    meta = ModelMeta.from_json(raw_meta) if raw_meta else _meta_from_options(arch, num_classes, path, arch_args)
    meta = _override(meta, arch if raw_meta else None, num_classes if raw_meta else None)
    return _build_and_fill(meta, state, path), meta


def _torch_load(source: Any, weights_only: bool) -> Any:
    return torch.load(source, map_location="cpu", weights_only=weights_only)


def _load_pickle(
    path: Path, arch: str | None, num_classes: int | None, trust: bool, arch_args: dict[str, Any] | None
) -> tuple[nn.Module, ModelMeta]:
    try:
        obj = _torch_load(path, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            if not trust:
                raise CheckpointError(
                    f"'{path}' contains pickled code (a whole model object), which odekit does not run by default",
                    "save a state dict instead, or pass `trust_checkpoint` if you trust its source",
                ) from exc
            return _load_trusted_module(path, arch, num_classes, arch_args)
        raise CheckpointError(
            f"'{path}' cannot be read as a torch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})",
            "the file may be truncated or not a checkpoint",
        ) from exc
    if isinstance(obj, nn.Module):  # only reachable for allow-listed classes
        return _whole_module(obj, path, arch, num_classes, arch_args)
    state, meta = _state_dict_from_object(obj, path)
    meta = _override(meta, arch, num_classes) if meta else _meta_from_options(arch, num_classes, path, arch_args)
    return _build_and_fill(meta, state, path), meta


def _whole_module(
    obj: nn.Module, path: Path, arch: str | None, num_classes: int | None, arch_args: dict[str, Any] | None
) -> tuple[nn.Module, ModelMeta]:
    if arch is not None:
        return _rebuild_from_module(obj, path, arch, num_classes, arch_args)
    return obj, ModelMeta(arch=f"pickled:{type(obj).__name__}", num_classes=num_classes)


def _load_trusted_module(
    path: Path, arch: str | None, num_classes: int | None, arch_args: dict[str, Any] | None
) -> tuple[nn.Module, ModelMeta]:
    spec: ArchSpec | None = parse_arch(arch) if arch is not None else None
    if spec is not None and spec.is_file:
        # Importing the file under its stem lets a pickle that names that module find its class.
        load_user_file(Path(spec.target))
    try:
        with importable(path.parent, Path.cwd()):
            obj = _torch_load(path, weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise CheckpointError(
            f"'{path}' could not be unpickled: {exc}", missing_module_hint(exc)
        ) from exc
    except Exception as exc:
        raise CheckpointError(
            f"'{path}' could not be unpickled ({type(exc).__name__}: {exc})",
            "the class definitions it needs must be importable (PYTHONPATH or `arch` path/to/file.py:ClassName)",
        ) from exc
    if isinstance(obj, torch.jit.ScriptModule):
        return obj, ModelMeta(arch="torchscript", num_classes=num_classes)
    if not isinstance(obj, nn.Module):
        state, meta = _state_dict_from_object(obj, path)
        meta = _override(meta, arch, num_classes) if meta else _meta_from_options(arch, num_classes, path, arch_args)
        return _build_and_fill(meta, state, path), meta
    return _whole_module(obj, path, arch, num_classes, arch_args)


def _load_torchscript(
    path: Path, arch: str | None, num_classes: int | None, trust: bool, arch_args: dict[str, Any] | None
) -> tuple[nn.Module, ModelMeta]:
    extra = {TORCHSCRIPT_META_FILE: ""}
    try:
        with warnings.catch_warnings():  # torch deprecates TorchScript; users still have archives
            warnings.simplefilter("ignore", FutureWarning)
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
    if meta is None:
        assert arch is not None
        return _rebuild_from_module(scripted, path, arch, num_classes, arch_args)
    meta = _override(meta, arch, num_classes)
    state = {k: v.detach().clone() for k, v in scripted.state_dict().items()}
    return _build_and_fill(meta, state, path), meta


def _load_export(
    path: Path, arch: str | None, num_classes: int | None, trust: bool, arch_args: dict[str, Any] | None
) -> tuple[nn.Module, ModelMeta]:
    """A ``.pt2`` archive runs without its source code; its input shape is read from the graph."""
    module, meta_json = load_exported(path)
    if meta_json:
        meta = _override(ModelMeta.from_json(meta_json), arch, num_classes)
        if parse_arch(meta.arch).kind == "zoo" and meta.arch in _registered_names():
            # A registered architecture is rebuilt as its own class (hooks, layer names);
            # the graph itself is the fallback when the weights do not fit it.
            state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            with contextlib.suppress(OdekitError):
                return _build_and_fill(meta, state, path), meta
        return module, meta
    if arch is not None:
        return _rebuild_from_module(module, path, arch, num_classes, arch_args)
    return module, ModelMeta(arch="export", num_classes=num_classes, input_shape=exported_input_shape(module))


def _registered_names() -> set[str]:
    from odekit.models.registry import arch_names

    return set(arch_names())


def exported_input_shape(module: nn.Module) -> list[int] | None:
    """The per-sample input shape a ``torch.export`` graph was traced with (batch dimension dropped)."""
    graph = getattr(module, "graph", None)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"] if graph is not None else []
    if len(placeholders) != 1:
        return None
    value = placeholders[0].meta.get("val")
    shape = getattr(value, "shape", None)
    if shape is None or len(shape) < 2:
        return None
    try:
        return [int(s) for s in shape[1:]]
    except (TypeError, ValueError):  # a symbolic non-batch dimension
        return None


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
    state = state_dict_for_saving(model)
    metadata = {META_KEY: meta.to_json(), "format": "pt", DIGEST_KEY: tensor_digest(state)}
    require_finite(state.items(), f"writing the model '{Path(path).name}'")
    return write_safetensors(path, state, metadata, force)


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
