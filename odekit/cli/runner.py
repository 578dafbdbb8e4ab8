"""The shared life cycle of a subcommand: set up, run the body, write the report, print.

`run_command` checks numeric options, resolves the device, seeds every generator, locks
--out (a second run on it fails at once), claims output names (refusing to overwrite without
--force), runs the body with its outputs going to a private staging folder, writes
report.json + report.md there, refuses models or vectors holding NaN/inf, then installs the
whole set in --out at once. On failure, SIGINT, SIGTERM or SIGHUP it removes the staging
folder, leaving --out as it was, and maps the error to an exit code (130 for Ctrl-C).
Third-party warnings are captured and shown only with --debug.

Under torchrun (issue 15) every rank runs the body on its share of the work (``ctx.dist``);
only rank 0 locks --out, writes and prints; the other ranks stage into a private temporary
folder that is deleted. A failing rank prints its one line and tells the others, and every rank
exits with status 1 within seconds, leaving --out as it was.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from odekit import __version__
from odekit.api.progress import RichProgress, plain_progress
from odekit.cli.errors import captured_warnings, exception_line, report_exception, unexpected_line
from odekit.cli.options import CommonOptions
from odekit.cli.vocabulary import DEPRECATED
from odekit.errors import OdekitError, UsageError
from odekit.progress import Progress, SilentProgress
from odekit.writers.tables import ReportTable
from odekit.writers.transaction import OutputTransaction, signals_raise

if TYPE_CHECKING:  # torch loads when a command runs, not for --help (issue 12)
    import torch

    from odekit.distributed import Distributed, LaunchEnv


def _current_dist() -> Distributed:
    from odekit.distributed import current

    return current()

DEFAULT_RUNS_DIR = Path("odekit-runs")


class ResultTable(ReportTable):
    """A table printed on stdout for people and embedded in report.md."""

    def to_rich(self) -> Table:
        return rich_table(self)


def rich_table(table: ReportTable) -> Table:
    """The terminal view of a result table (the API's tables are `ReportTable`s)."""
    shown = Table(title=table.title, title_justify="left")
    for header in table.headers:
        shown.add_column(header, overflow="fold")
    for row in table.rows:
        shown.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    return shown


@dataclass
class CommandOutput:
    """What a command body returns: JSON results plus the human view of them."""

    results: dict[str, Any]
    tables: Sequence[ReportTable] = field(default_factory=list)
    headline: list[str] = field(default_factory=list)


@dataclass
class CommandContext:
    """Handed to a command body: device, outputs, progress and the report's inputs/params."""

    command: str
    device: torch.device
    out_dir: Path
    force: bool
    seed: int
    progress: Progress
    log_console: Console
    inputs: dict[str, Any]
    params: dict[str, Any]
    transaction: OutputTransaction | None = None
    dist: Distributed = field(default_factory=_current_dist)  # issue 15: this rank of a torchrun launch

    def path(self, name: str) -> Path:
        """Claim output ``name``: fails now, before any work, if --out holds it (without --force).

        The path returned lies in the run's private staging folder; the whole set moves to
        --out when the run succeeds, and paths in the report name their final place.
        """
        if self.transaction is None:
            raise RuntimeError("CommandContext.path() called outside run_command")
        return self.transaction.claim(name)

    def log(self, message: str) -> None:
        self.log_console.print(message, highlight=False)


def default_out_dir(command: str, name: str | None) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"{command}-{name}-{stamp}" if name else f"{command}-{stamp}"
    candidate, n = DEFAULT_RUNS_DIR / base, 1
    # a run still working on a candidate holds its lock and staging next to it: skip those too
    while candidate.exists() or any(DEFAULT_RUNS_DIR.glob(f".{candidate.name}.odekit*")):
        n += 1
        candidate = DEFAULT_RUNS_DIR / f"{base}-{n}"
    return candidate


def check_option_values(params: dict[str, Any], command: str = "") -> None:
    """Every numeric option is finite and fits 64 bits, whatever command parsed it."""
    renamed = DEPRECATED.get(command, {})  # a report key may keep an option's old name
    for key, value in params.items():
        option = f"--{key.replace('_', '-')}"
        option = renamed.get(option, option)
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{option} {value} is not a finite number", f"give {option} a finite value")
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
            raise UsageError(f"{option} {str(value)[:24]}... is out of range", f"give {option} a value below 2**63")


def _final_paths(value: Any, staging: str, final: str) -> Any:
    """Report values with the staging folder replaced by --out (where the files end up)."""
    if isinstance(value, str):
        return value.replace(staging, final)
    if isinstance(value, Path):
        return Path(str(value).replace(staging, final))
    if isinstance(value, dict):
        return {k: _final_paths(v, staging, final) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_final_paths(v, staging, final) for v in value)
    return value


@contextlib.contextmanager
def _stdout_to_stderr(enabled: bool) -> Iterator[None]:
    """With --json, send what native libraries print to file descriptor 1 to stderr instead.

    MAGMA (behind some CUDA linear algebra) writes banners straight to fd 1, which would corrupt
    the JSON on stdout; Python-level prints go through ``sys.stdout`` and are redirected too.
    """
    if not enabled:
        yield
        return
    try:
        saved = os.dup(1)
    except OSError:  # no usable fd 1 (closed stdout): nothing to protect
        yield
        return
    sys.stdout.flush()
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run_command(
    command: str,
    common: CommonOptions,
    *,
    inputs: dict[str, Any],
    params: dict[str, Any],
    body: Callable[[CommandContext], CommandOutput],
    run_name: str | None = None,
    distributed: bool = False,
) -> None:
    """Run a subcommand body under the shared life cycle; exits through `typer.Exit`.

    ``distributed``: the body shards its work over the ranks of a torchrun launch (through
    ``ctx.dist``); other commands refuse to run on several ranks."""
    from odekit.device import resolve_device, seed_everything, set_threads
    from odekit.distributed import init_distributed, read_launch_env
    from odekit.writers.guards import check_staged_tensors
    from odekit.writers.report import ARRAYS_NAME, Report

    start = time.perf_counter()
    out_console = Console(file=sys.stdout, width=max(Console(file=sys.stdout).width, 120))
    err_console = Console(file=sys.stderr)
    transaction: OutputTransaction | None = None
    dist: Distributed | None = None
    launch: LaunchEnv | None = None
    private_dir: Path | None = None
    try:
        with signals_raise(), captured_warnings(common.debug):
            check_option_values({"seed": common.seed, **params}, command)
            device = resolve_device(common.device)
            threads = set_threads(common.threads)
            launch = read_launch_env()
            if launch.distributed and not distributed:
                raise UsageError(
                    f"odekit {command} does not split its work over ranks ({launch.world_size} were launched)",
                    "run it as one process, without torchrun",
                )
            dist = init_distributed(device, launch)
            device = dist.device
            seed_everything(common.seed)
            out_dir = common.out if common.out is not None else default_out_dir(command, run_name)
            if not dist.is_main:
                # only rank 0 locks and fills --out; the others stage into a private folder
                private_dir = Path(tempfile.mkdtemp(prefix=f"odekit-rank{dist.rank}-"))
                out_dir = private_dir / "out"  # its lock and staging stay inside private_dir
                err_console = Console(file=sys.stderr, quiet=True)
            use_bars = not common.json and err_console.is_terminal and dist.is_main
            progress_impl = RichProgress(err_console) if use_bars else None
            plain = plain_progress(err_console.is_terminal) if dist.is_main else None
            transaction = OutputTransaction(out_dir, common.force or not dist.is_main)
            dist.add_cleanup(lambda: _abort(transaction))
            if private_dir is not None:  # also when a peer's failure forces the exit
                dist.add_cleanup(lambda: shutil.rmtree(private_dir, ignore_errors=True))
            ctx = CommandContext(
                command=command,
                device=device,
                out_dir=out_dir,
                force=common.force,
                seed=common.seed,
                progress=progress_impl or plain or SilentProgress(),
                log_console=err_console,
                inputs=dict(inputs),
                params=dict(params),
                transaction=transaction,
                dist=dist,
            )
            transaction.begin()
            ctx.path("report.json")
            ctx.path("report.md")
            with _stdout_to_stderr(common.json):
                if progress_impl is not None:
                    with progress_impl:
                        output = body(ctx)
                else:
                    output = body(ctx)
            staging, final = str(transaction.staging), str(out_dir)
            report = Report(
                command=command,
                odekit_version=__version__,
                inputs=_final_paths(ctx.inputs, staging, final),
                params=_final_paths(ctx.params, staging, final),
                results=_final_paths(output.results, staging, final),
                device=str(device),
                threads=threads,
                seconds=time.perf_counter() - start,
                markdown_sections=[(t.title, t.markdown()) for t in output.tables],
                outputs=transaction.staged_names(),
                world_size=dist.world_size,
                backend=dist.describe()["backend"],
            )
            if dist.is_main:
                if report.long_arrays():  # report.md links them instead of listing thousands of numbers
                    ctx.path(ARRAYS_NAME)
                    report.outputs = [*report.outputs, ARRAYS_NAME]
                report.write(transaction.staging, force=False)
                check_staged_tensors(transaction.staging, command)
            dist.close()  # every rank got here: nothing failed anywhere
            if dist.is_main:
                transaction.commit()
            else:
                _abort(transaction)
            if plain is not None:
                print(f"[odekit] {command}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    except (typer.Exit, typer.Abort):
        _abort(transaction)
        raise
    except BaseException as exc:
        _abort(transaction)
        if isinstance(exc, OdekitError) and transaction is not None:  # name files where they would be
            exc.message = exc.message.replace(str(transaction.staging), str(transaction.out_dir))
        if dist is not None and dist.active:
            _end_failed_rank(dist, exc, common.debug, private_dir)
        if launch is not None and launch.rank > 0:  # the same error on every rank: rank 0 says it
            known = exception_line(exc)
            raise typer.Exit(known[1] if known else 1) from None
        code = report_exception(exc, common.debug)
        raise typer.Exit(code) from None
    finally:
        if private_dir is not None:
            shutil.rmtree(private_dir, ignore_errors=True)
    if dist is not None and not dist.is_main:
        return
    if common.json:
        print(report.to_json())
        return
    for line in output.headline:
        out_console.print(_final_paths(line, staging, final), highlight=False)
    for table in output.tables:
        out_console.print(rich_table(table))
    out_console.print(f"Report: {out_dir / 'report.json'}", highlight=False)


def _end_failed_rank(dist: Distributed, exc: BaseException, debug: bool, private_dir: Path | None) -> NoReturn:
    """A rank of a multi-process run failed: tell the others, print its line, exit at once
    (tearing the process group down could wait on the broken peers).

    A peer's failure (`PeerFailedError`) exits 1 silently: the failing rank printed it."""
    from odekit.distributed import PeerFailedError

    if private_dir is not None:
        shutil.rmtree(private_dir, ignore_errors=True)
    # torchrun's agent stops the healthy ranks with SIGTERM once one failed: that is no news
    signalled = isinstance(exc, KeyboardInterrupt) and getattr(exc, "signum", 2) != 2
    if isinstance(exc, PeerFailedError) or (signalled and dist.posted_failure(wait_s=2.0)):
        dist.exit_after_failure(1)
    known = exception_line(exc)
    dist.fail(known[0] if known else unexpected_line(exc))
    code = 1
    try:
        code = report_exception(exc, debug, prefix=f"rank {dist.rank}: ")
    except BaseException:  # --debug re-raises unexpected errors: show the traceback instead
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    dist.exit_after_failure(code)


def _abort(transaction: OutputTransaction | None) -> None:
    if transaction is not None:
        transaction.abort()

