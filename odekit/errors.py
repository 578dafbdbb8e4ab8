"""Exception types that the CLI maps to one-line messages and exit codes.

Library code raises these for anything a user can fix (bad file, bad option, bad data): exit
code 1. Typer's own parse errors exit with 2. Programming errors stay ordinary exceptions.

Every `OdekitError` is a `ValueError` (a bad value given to a function), so Python callers can
catch either. Messages name the Python API's parameters in backticks (`` `fit_samples` ``, or
`` `rank=50` `` with a value); the CLI rewrites them to its flags (``--fit-samples``,
``--rank 50``) in one place, `odekit.cli.errors.cli_text`.
"""

from __future__ import annotations

import errno
import re


class OdekitError(ValueError):
    """Base class: a user-facing problem with a message and an optional hint."""

    exit_code = 1
    # every error line carries a hint: subclasses name the usual fix when the raiser gives none
    default_hint = "rerun with --debug for details"

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.one_line()

    def one_line(self) -> str:
        text = self.message.rstrip(".")
        hint = self.hint or self.default_hint
        if hint:
            text += f". Hint: {hint}"
        return text


class UsageError(OdekitError):
    """An option value or combination that can never work (unknown name, out-of-range value).

    It exits with 1 like every other rejected input; exit code 2 is left to the command-line
    parser (unknown options, missing arguments, values of the wrong type).
    """

    default_hint = "check the option values ('odekit COMMAND --help' lists them)"


class InputFileError(OdekitError):
    """A path that does not exist or cannot be read."""

    default_hint = "check the path"


class CheckpointError(OdekitError):
    """A checkpoint that is corrupt, truncated, of unknown format or mismatched."""

    default_hint = "the file may be damaged or not a supported checkpoint (docs/formats.md lists the formats)"


class DataError(OdekitError):
    """A data set that is missing, empty, of the wrong shape or holds NaN/inf."""

    default_hint = "docs/formats.md lists what a data set must look like"


class LayerSelectionError(OdekitError):
    """A layer index, range or name that does not resolve against the model."""

    default_hint = "'odekit info CHECKPOINT' lists the layers and their names"


class UnsupportedModelError(OdekitError):
    """A model (or a part of it) that a method cannot handle."""

    default_hint = "docs/formats.md lists the supported models"


class NumericalError(OdekitError):
    """A method whose numerics cannot succeed (impossible rank, solver blew up...)."""

    default_hint = "try other settings (rank, step size, learning rate) or check the inputs for extreme values"


class OutputExistsError(OdekitError):
    """An output that exists already and --force was not given."""

    default_hint = "pass --force to overwrite it or choose another --out"


# issue 17: transactional outputs and integrity
class OutputBusyError(OdekitError):
    """Another odekit run holds the lock on the same --out folder."""

    default_hint = "wait for that run to finish or choose another --out"


class IntegrityError(CheckpointError):
    """A file whose recorded checksum (zip CRC, odekit tensor hash) does not match its bytes."""


class OutputWriteError(OdekitError):
    """An output that could not be written (disk full, permissions, read-only file system)."""

    default_hint = "check the path, its permissions and the free disk space"


OS_HINTS = {
    errno.ENOSPC: "free disk space or choose --out on another disk",
    errno.EDQUOT: "free space within your disk quota or choose --out on another disk",
    errno.EFBIG: "the file exceeds the size limit of this file system or process (ulimit -f)",
    errno.EROFS: "the file system is read-only; choose a writable --out",
    errno.EACCES: "check the permissions of the path or choose another --out",
    errno.EPERM: "check the permissions of the path or choose another --out",
    errno.ENAMETOOLONG: "choose a shorter path",
}


def os_error_hint(exc: BaseException) -> str:
    """A hint for an I/O failure, from its errno (or the 'os error N' that Rust libraries print)."""
    code = getattr(exc, "errno", None)
    if code is None:
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    return OS_HINTS.get(code or -1, "check the path, its permissions and the free disk space")
