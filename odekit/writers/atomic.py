"""Atomic file writes: temp file in the target folder, then rename.

A reader never sees a half-written file, and an existing file is only replaced with
``force=True``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from safetensors import SafetensorError

from odekit.errors import OdekitError, OutputExistsError, OutputWriteError, os_error_hint

# what a full disk or a lost mount raises: OSError, torch.save's RuntimeError, safetensors' own
_WRITE_ERRORS: tuple[type[Exception], ...] = (OSError, RuntimeError, SafetensorError)


def check_writable(path: Path, force: bool) -> None:
    """Refuse to touch an existing output unless ``force``."""
    if path.exists() and not force:
        raise OutputExistsError(
            f"output '{path}' exists already", "pass --force to overwrite it or choose another --out"
        )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``."""
    target = Path(path)
    check_writable(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise OutputWriteError(f"cannot create a file in '{target.parent}': {exc.strerror}", os_error_hint(exc)) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600 files; give outputs the permissions a plain open() would
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except OdekitError:
        raise
    except _WRITE_ERRORS as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = getattr(exc, "strerror", None) or text
        raise OutputWriteError(f"could not write '{target}': {reason}", os_error_hint(exc)) from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, force: bool = False) -> Path:
    with atomic_path(path, force) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, force: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), force)


def atomic_write_with(
    path: str | os.PathLike[str], write: Callable[[Path], None], force: bool = False
) -> Path:
    """Let ``write`` fill a temporary file (for libraries that want a filename)."""
    with atomic_path(path, force) as tmp:
        write(tmp)
    return Path(path)
