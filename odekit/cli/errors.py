"""The one place where exceptions become an `Error: ...` line and an exit code."""

from __future__ import annotations

import sys

import torch

from odekit.errors import OdekitError


def report_exception(exc: BaseException, debug: bool) -> int:
    """Print one line for ``exc`` on stderr and return the exit code (re-raise with --debug)."""
    if isinstance(exc, OdekitError):
        line, code = exc.one_line(), exc.exit_code
    elif isinstance(exc, KeyboardInterrupt):
        line, code = "interrupted", 130
    elif isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        line, code = "out of memory. Hint: lower --batch-size or the number of samples, or use another --device", 1
    elif isinstance(exc, OSError) and exc.filename:
        line, code = f"{exc.strerror or exc}: '{exc.filename}'. Hint: check the path and its permissions", 1
    else:
        if debug:
            raise exc
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        line = f"unexpected {type(exc).__name__}: {first}. Hint: rerun with --debug for the traceback and report it"
        code = 1
    if debug and not isinstance(exc, KeyboardInterrupt):
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    print(f"Error: {line}", file=sys.stderr)
    return code
