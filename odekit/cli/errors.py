"""The one place where exceptions become an `Error: ...` line and an exit code."""

from __future__ import annotations

import contextlib
import re
import sys
import warnings
from collections.abc import Iterator

from odekit.errors import OdekitError, os_error_hint

# The library names the Python API's parameters in backticks (`fit_samples`, `rank=50`); the CLI
# shows its flags instead. A parameter is its flag with underscores (fit_samples: --fit-samples)
# unless this table says otherwise (settings fields whose flag reads differently).
PARAMETER_FLAGS = {
    "max_iter": "--max-iters",
    "steps_per_iter": "--iters",
}
_PARAMETER = re.compile(r"`([a-z][a-z0-9_]*)(?:=([^`\s]+))?`")


def flag_of(parameter: str) -> str:
    """The CLI flag of an API parameter: fit_samples -> --fit-samples."""
    return PARAMETER_FLAGS.get(parameter, "--" + parameter.replace("_", "-"))


def cli_text(text: str) -> str:
    """A library message as the CLI shows it: `fit_samples` -> --fit-samples, `rank=50` -> --rank 50."""

    def flag(match: re.Match[str]) -> str:
        name, value = match.group(1), match.group(2)
        return flag_of(name) + (f" {value}" if value is not None else "")

    return _PARAMETER.sub(flag, text)


def os_error_line(exc: OSError) -> str:
    """One line for an operating-system error, naming the path when there is one."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = f": '{exc.filename}'" if exc.filename else ""
    return f"{reason}{where}. Hint: {os_error_hint(exc)}"


def _is_torch_out_of_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")  # not loaded: the error cannot be torch's (and --help stays fast)
    return torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)


def exception_line(exc: BaseException) -> tuple[str, int] | None:
    """The one-line message and exit code of a known kind of error (None: unexpected)."""
    if isinstance(exc, OdekitError):
        return cli_text(exc.one_line()), exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        signum = getattr(exc, "signum", 2)
        line = "interrupted" if signum == 2 else f"interrupted by {exc} (signal {signum})"
        return line, 128 + signum
    if isinstance(exc, MemoryError) or _is_torch_out_of_memory(exc):
        return "out of memory. Hint: lower --batch-size or the number of samples, or use another --device", 1
    if isinstance(exc, OSError):
        return os_error_line(exc), 1
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


@contextlib.contextmanager
def captured_warnings(debug: bool) -> Iterator[None]:
    """Third-party warnings (torch's deprecations...) are noise to users: shown only with --debug."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for item in caught if debug else []:
                print(f"warning: {item.category.__name__}: {item.message} ({item.filename}:{item.lineno})", file=sys.stderr)
