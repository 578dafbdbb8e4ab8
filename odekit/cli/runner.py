"""The shared life cycle of a subcommand: set up, run the body, write the report, print.

`run_command` resolves the device, seeds every generator, claims output files (refusing to
overwrite without --force), runs the body, writes report.json + report.md, prints JSON or
tables on stdout, deletes what it wrote if anything fails, and maps errors to exit codes.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from odekit import __version__
from odekit.cli.errors import exception_line, report_exception, unexpected_line
from odekit.cli.options import CommonOptions
from odekit.cli.progress import RichProgress
from odekit.device import resolve_device, set_threads
from odekit.distributed import (
    Distributed,
    LaunchEnv,
    PeerFailedError,
    init_distributed,
    read_launch_env,
)
from odekit.distributed import current as current_dist
from odekit.errors import OutputExistsError, UsageError
from odekit.progress import Progress, SilentProgress
from odekit.writers.atomic import check_writable
from odekit.writers.report import Report, markdown_table

DEFAULT_RUNS_DIR = Path("odekit-runs")


@dataclass
class ResultTable:
    """A table printed on stdout for people and embedded in report.md."""

    title: str
    headers: list[str]
    rows: list[list[Any]]

    def to_rich(self) -> Table:
        table = Table(title=self.title, title_justify="left")
        for header in self.headers:
            table.add_column(header, overflow="fold")
        for row in self.rows:
            table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
        return table


@dataclass
class CommandOutput:
    """What a command body returns: JSON results plus the human view of them."""

    results: dict[str, Any]
    tables: list[ResultTable] = field(default_factory=list)
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
    claimed: list[Path] = field(default_factory=list)
    preexisting: set[Path] = field(default_factory=set)
    created_dirs: list[Path] = field(default_factory=list)
    dist: Distributed = field(default_factory=current_dist)  # issue 15: this rank of a torchrun launch

    def path(self, name: str) -> Path:
        """Claim an output file in --out: fails now, before any work, if it exists."""
        target = self.out_dir / name
        check_writable(target, self.force)
        if target.exists():
            self.preexisting.add(target)
        self.claimed.append(target)
        return target

    def log(self, message: str) -> None:
        self.log_console.print(message, highlight=False)


def default_out_dir(command: str, name: str | None) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"{command}-{name}-{stamp}" if name else f"{command}-{stamp}"
    candidate, n = DEFAULT_RUNS_DIR / base, 1
    while candidate.exists():
        n += 1
        candidate = DEFAULT_RUNS_DIR / f"{base}-{n}"
    return candidate


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _make_dirs(path: Path) -> list[Path]:
    created = []
    for parent in reversed([path, *path.parents]):
        if not parent.exists():
            created.append(parent)
    path.mkdir(parents=True, exist_ok=True)
    return created


def _cleanup(ctx: CommandContext | None) -> None:
    """Remove what this run created; files that existed before (--force) are left alone."""
    if ctx is None:
        return
    for target in ctx.claimed:
        if target not in ctx.preexisting and target.exists():
            target.unlink()
    for folder in reversed(ctx.created_dirs):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _end_failed_rank(dist: Distributed, exc: BaseException, debug: bool) -> NoReturn:
    """A rank of a multi-process run failed: tell the others, print its line, exit at once.

    A peer's failure (`PeerFailedError`) exits 1 silently: the failing rank printed it."""
    if isinstance(exc, PeerFailedError):
        dist.exit_after_failure(1)
    known = exception_line(exc)
    dist.fail(known[0] if known else unexpected_line(exc))
    code = 1
    with contextlib.suppress(BaseException):
        code = report_exception(exc, debug, prefix=f"rank {dist.rank}: ")
    dist.exit_after_failure(code)


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
    start = time.perf_counter()
    out_console = Console(file=sys.stdout, width=max(Console(file=sys.stdout).width, 120))
    err_console = Console(file=sys.stderr)
    ctx: CommandContext | None = None
    dist: Distributed | None = None
    launch: LaunchEnv | None = None
    private_dir: Path | None = None
    try:
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
            # only rank 0 claims --out; the others write into a private folder deleted at exit
            private_dir = out_dir = Path(tempfile.mkdtemp(prefix=f"odekit-rank{dist.rank}-"))
            err_console = Console(file=sys.stderr, quiet=True)
        if out_dir.exists() and not out_dir.is_dir():
            raise OutputExistsError(f"--out '{out_dir}' is a file, not a folder", "choose a folder for --out")
        use_bars = not common.json and err_console.is_terminal and dist.is_main
        progress_impl = RichProgress(err_console) if use_bars else None
        ctx = CommandContext(
            command=command,
            device=device,
            out_dir=out_dir,
            force=common.force or not dist.is_main,
            seed=common.seed,
            progress=progress_impl or SilentProgress(),
            log_console=err_console,
            inputs=dict(inputs),
            params=dict(params),
            dist=dist,
        )
        ctx.path("report.json")
        ctx.path("report.md")
        ctx.created_dirs = _make_dirs(out_dir)
        dist.add_cleanup(lambda: _cleanup(ctx))
        if progress_impl is not None:
            with progress_impl:
                output = body(ctx)
        else:
            output = body(ctx)
        report = Report(
            command=command,
            odekit_version=__version__,
            inputs=ctx.inputs,
            params=ctx.params,
            results=output.results,
            device=str(device),
            threads=threads,
            seconds=time.perf_counter() - start,
            markdown_sections=[(t.title, markdown_table(t.headers, t.rows)) for t in output.tables],
            world_size=dist.world_size,
            backend=dist.describe()["backend"],
        )
        if dist.is_main:
            report.write(out_dir, common.force)
        dist.close()
    except (typer.Exit, typer.Abort):
        raise
    except BaseException as exc:
        _cleanup(ctx)
        if dist is None or not dist.active:
            if launch is not None and launch.rank > 0:  # the same error on every rank: one line
                known = exception_line(exc)
                raise typer.Exit(known[1] if known else 1) from None
            code = report_exception(exc, common.debug)
            raise typer.Exit(code) from None
        _end_failed_rank(dist, exc, common.debug)
    finally:
        if private_dir is not None:
            shutil.rmtree(private_dir, ignore_errors=True)
    if not dist.is_main:
        return
    if common.json:
        print(report.to_json())
        return
    for line in output.headline:
        out_console.print(line, highlight=False)
    for table in output.tables:
        out_console.print(table.to_rich())
    out_console.print(f"Report: {out_dir / 'report.json'}", highlight=False)
