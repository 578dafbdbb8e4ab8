"""`odekit train-ode`: placeholder until its implementation lands."""

from __future__ import annotations

import typer

from odekit.cli.errors import report_exception
from odekit.errors import OdekitError

EPILOG = ""


def train_ode_command() -> None:
    """Not available in this build yet."""
    raise typer.Exit(report_exception(OdekitError("this command is not available in this build yet"), False))
