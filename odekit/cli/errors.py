"""The one place where exceptions become an `Error: ...` line and an exit code."""

from __future__ import annotations

import sys

import torch

from odekit.errors import OdekitError


def exception_line(exc: BaseException) -> tuple[str, int] | None:
    """The one-line message and exit code of a known kind of error (None: unexpected)."""
    if isinstance(exc, OdekitError):
        return exc.one_line(), exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return "out of memory. Hint: lower --batch-size or the number of samples, or use another --device", 1
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or exc}: '{exc.filename}'. Hint: check the path and its permissions", 1
    return None


def unexpected_line(exc: BaseException) -> str:
    first = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"unexpected {type(exc).__name__}: {first}. Hint: rerun with --debug for the traceback and report it"


def report_exception(exc: BaseException, debug: bool, prefix: str = "") -> int:
    """Print one line for ``exc`` on stderr and return the exit code (re-raise with --debug).
    ``prefix`` goes after "Error: " (e.g. "rank 1: " in a multi-process run)."""
    known = exception_line(exc)
    if known is None:
        if debug:
            raise exc
        known = (unexpected_line(exc), 1)
    line, code = known
    if debug and not isinstance(exc, KeyboardInterrupt):
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    print(f"Error: {prefix}{line}", file=sys.stderr)
    return code
