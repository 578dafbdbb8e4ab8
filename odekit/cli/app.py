"""The `odekit` Typer application: one module per command, registered here."""

from __future__ import annotations

import signal
from typing import Annotated

import typer

from odekit import __version__
from odekit.cli.asnet import EPILOG as ASNET_EPILOG
from odekit.cli.asnet import asnet_command
from odekit.cli.attack import EPILOG as ATTACK_EPILOG
from odekit.cli.attack import attack_command
from odekit.cli.info import EPILOG as INFO_EPILOG
from odekit.cli.info import info_command
from odekit.cli.reduce import EPILOG as REDUCE_EPILOG
from odekit.cli.reduce import reduce_command
from odekit.cli.smoothness import EPILOG as SMOOTHNESS_EPILOG
from odekit.cli.smoothness import smoothness_command
from odekit.cli.train_ode import EPILOG as TRAIN_ODE_EPILOG
from odekit.cli.train_ode import train_ode_command

app = typer.Typer(
    name="odekit",
    help="Neural ODEs with memory-efficient gradients, reduced-order compression and universal adversarial attacks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",
)

COMMANDS = [
    ("info", info_command, INFO_EPILOG),
    ("train-ode", train_ode_command, TRAIN_ODE_EPILOG),
    ("smoothness-check", smoothness_command, SMOOTHNESS_EPILOG),
    ("reduce", reduce_command, REDUCE_EPILOG),
    ("asnet", asnet_command, ASNET_EPILOG),
    ("attack", attack_command, ATTACK_EPILOG),
]
for _name, _function, _epilog in COMMANDS:
    app.command(_name, epilog=_epilog)(_function)  # type: ignore[type-var]


def _version(value: bool) -> None:
    if value:
        print(f"odekit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """odekit: train neural ODEs, compress models, attack them, with reports you can trust."""


def main() -> None:
    """Console entry point; Ctrl-C outside a command body (Click turns it into 'Aborted!') exits 130."""
    interrupted: list[int] = []

    def on_sigint(signum: int, frame: object) -> None:
        interrupted.append(signum)
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        app()
    except SystemExit as exc:
        raise SystemExit(130 if interrupted and exc.code == 1 else exc.code) from None
