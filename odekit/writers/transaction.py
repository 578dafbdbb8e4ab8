"""Transactional output folders: stage privately, then install the whole set under a lock.

A run writes every output into a private staging folder next to ``--out``
(``.NAME.odekit-staging.PID.TOKEN``). Only when the set is complete is it moved into place, while the
run holds an exclusive lock on ``--out`` (``.NAME.odekit.lock``, an ``flock`` the kernel drops
when the process dies). So ``--out`` is either absent, the old complete set, or the new complete
set; a second run on the same ``--out`` fails at once; a run killed with SIGKILL leaves only
its staging folder, which the next run on that ``--out`` recognises (it holds the lock, so no
live run owns the folder) and removes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from odekit.errors import OutputBusyError, OutputExistsError, OutputWriteError, os_error_hint

REPORT_NAME = "report.json"
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class SignalInterrupt(KeyboardInterrupt):
    """A termination signal turned into an exception, so the stack unwinds and cleans up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_signal(signum: int, frame: FrameType | None) -> None:
    raise SignalInterrupt(signum)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise `SignalInterrupt` inside the block (main thread only)."""
    previous = _install(_raise_signal)
    try:
        yield
    finally:
        _restore(previous)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP until the block ends, then raise the first one that came."""
    pending: list[int] = []
    previous = _install(lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        _restore(previous)
    if pending:
        raise SignalInterrupt(pending[0])


def _install(handler: Any) -> dict[int, Any]:
    previous: dict[int, Any] = {}
    with contextlib.suppress(ValueError):  # signal handlers can only be set in the main thread
        for signum in SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup'd or background: stays ignored
                previous[signum] = signal.signal(signum, handler)
    return previous


def _restore(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


class OutputTransaction:
    """The outputs of one run: claimed names, a private staging folder, an exclusive lock."""

    def __init__(self, out_dir: Path, force: bool) -> None:
        self.out_dir = Path(out_dir)
        self.target = Path(os.path.realpath(self.out_dir))  # a symlinked --out: stage beside its folder
        if not self.target.name:
            raise OutputExistsError(f"--out '{out_dir}' is the root folder", "choose a folder for --out")
        self.force = force
        self.parent = self.target.parent
        tag = f".{self.target.name}.odekit"
        self.lock_path = self.parent / f"{tag}.lock"
        token = f"{os.getpid()}.{secrets.token_hex(3)}"
        self.staging = self.parent / f"{tag}-staging.{token}"
        self._stale_globs = (f"{tag}-staging.*", f"{tag}-old.*")
        self._trash = self.parent / f"{tag}-old.{token}"
        self._lock_fd: int | None = None
        self._created_dirs: list[Path] = []
        self.names: list[str] = []

    # life cycle -------------------------------------------------------------------------
    def begin(self) -> None:
        """Create the parent folders, take the lock, sweep stale staging, open our staging folder."""
        if self.target.exists() and not self.target.is_dir():
            raise OutputExistsError(f"--out '{self.out_dir}' is a file, not a folder", "choose a folder for --out")
        self._created_dirs = [p for p in reversed(self.target.parents) if not p.exists()]
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
            self._lock()
            for pattern in self._stale_globs:
                for stale in self.parent.glob(pattern):
                    shutil.rmtree(stale, ignore_errors=True)
            self.staging.mkdir()
        except OSError as exc:
            raise OutputWriteError(
                f"cannot prepare --out '{self.out_dir}': {exc.strerror or exc} ('{exc.filename}')", os_error_hint(exc)
            ) from exc

    def claim(self, name: str) -> Path:
        """The staging path of output ``name``; refuses now if ``--out`` holds it and not --force."""
        if not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise OutputExistsError(f"output name '{name}' is not a plain relative name", "report this as a bug")
        self._check_free(name)
        if name not in self.names:
            self.names.append(name)
        staged = self.staging / name
        staged.parent.mkdir(parents=True, exist_ok=True)
        return staged

    def staged_names(self) -> list[str]:
        """Claimed names in claim order: the reports, and what the body really wrote."""
        return [n for n in self.names if n in (REPORT_NAME, "report.md") or (self.staging / n).exists()]

    def commit(self) -> None:
        """Install the staged set in ``--out`` as a whole; signals wait until it is done."""
        for name in self.names:
            self._check_free(name)
        with signals_deferred():
            self._install()
            self._unlock()

    def abort(self) -> None:
        """Remove the staging folder and folders this run created; release the lock."""
        with signals_deferred():
            if self._lock_fd is not None:  # only the lock holder owns staging and trash
                shutil.rmtree(self.staging, ignore_errors=True)
                shutil.rmtree(self._trash, ignore_errors=True)
            self._unlock()
            for folder in reversed(self._created_dirs):
                with contextlib.suppress(OSError):
                    folder.rmdir()

    # helpers ------------------------------------------------------------------------------
    def _check_free(self, name: str) -> None:
        existing = self.target / name
        if existing.exists() and not self.force:
            raise OutputExistsError(
                f"output '{self.out_dir / name}' exists already",
                "pass --force to overwrite it or choose another --out",
            )

    def _lock(self) -> None:
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputBusyError(
                    f"--out '{self.out_dir}' is in use by another odekit run (pid {self._holder()})",
                    "wait for that run to finish or choose another --out",
                ) from None
            # the holder before us may have unlinked the file after we opened it: retry on the new one
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino:
                    break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _holder(self) -> str:
        for _ in range(20):  # the holder writes its pid right after locking
            with contextlib.suppress(OSError, ValueError):
                return str(int(self.lock_path.read_text().strip()))
            time.sleep(0.01)
        return "unknown"

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            self.lock_path.unlink()
        os.close(self._lock_fd)
        self._lock_fd = None

    def _install(self) -> None:
        if not self.target.exists():
            os.rename(self.staging, self.target)
            return
        existing = set(os.listdir(self.target))
        old_set = previous_outputs(self.target) if self.force else set()
        staged = set(os.listdir(self.staging))
        # --out is empty, or holds nothing but odekit's old set: swap whole folders, never a mix.
        # Not when --out holds the working directory (the shell would sit in a deleted folder).
        if (not existing or (self.force and existing <= old_set | staged)) and not self._holds_cwd():
            try:
                self._swap(bool(existing))
                return
            except OSError as exc:  # a mount point or a folder we may not rename: go file by file
                if exc.errno not in (errno.EXDEV, errno.EBUSY, errno.EPERM, errno.EACCES):
                    raise
        self._install_files(old_set, staged)

    def _swap(self, replace_old: bool) -> None:
        if not replace_old:
            os.rename(self.staging, self.target)  # POSIX rename replaces an empty folder
            return
        os.rename(self.target, self._trash)
        try:
            os.rename(self.staging, self.target)
        except OSError:
            os.rename(self._trash, self.target)  # put the old set back
            raise
        shutil.rmtree(self._trash, ignore_errors=True)

    def _install_files(self, old_set: set[str], staged: set[str]) -> None:
        """--out holds files of its own (a user's folder): move file by file, the report last,
        and take the old report away first so a half-installed set never looks complete."""
        report = self.target / REPORT_NAME
        if self.force and report.exists():
            report.unlink()
        for name in sorted(old_set - staged):
            _remove(self.target / name)
        for name in sorted(staged - {REPORT_NAME}) + ([REPORT_NAME] if REPORT_NAME in staged else []):
            destination = self.target / name
            if destination.is_dir() and not destination.is_symlink():
                shutil.rmtree(destination)
            os.replace(self.staging / name, destination)
        os.rmdir(self.staging)

    def _holds_cwd(self) -> bool:
        cwd = Path(os.path.realpath(os.getcwd()))
        return cwd == self.target or self.target in cwd.parents


def previous_outputs(folder: Path) -> set[str]:
    """Names of the set an earlier run left in ``folder`` (its report lists them)."""
    try:
        report = json.loads((folder / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return set()
    outputs = report.get("outputs") if isinstance(report, dict) else None
    if not isinstance(outputs, list) or not (folder / REPORT_NAME).is_file():
        return set()
    names = {str(n).split("/")[0] for n in outputs if isinstance(n, str) and n and ".." not in n}
    return names | {REPORT_NAME, "report.md"}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
