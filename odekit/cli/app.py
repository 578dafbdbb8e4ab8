"""The `odekit` Typer application: one module per command, registered here."""

from __future__ import annotations

import signal
from typing import Annotated, Any, get_args

import typer
from typer._click.core import (  # Typer 0.29 vendors click: its classes, not click's
    Context,
    Parameter,
)
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from odekit import __version__
from odekit.cli.asnet import EPILOG as ASNET_EPILOG
from odekit.cli.asnet import asnet_command
from odekit.cli.attack import EPILOG as ATTACK_EPILOG
from odekit.cli.attack import attack_command
from odekit.cli.certify import EPILOG as CERTIFY_EPILOG
from odekit.cli.certify import certify_command
from odekit.cli.export import EPILOG as EXPORT_EPILOG
from odekit.cli.export import export_command
from odekit.cli.info import EPILOG as INFO_EPILOG
from odekit.cli.info import info_command
from odekit.cli.reduce import EPILOG as REDUCE_EPILOG
from odekit.cli.reduce import reduce_command
from odekit.cli.smoothness import EPILOG as SMOOTHNESS_EPILOG
from odekit.cli.smoothness import smoothness_command
from odekit.cli.train_ode import EPILOG as TRAIN_ODE_EPILOG
from odekit.cli.train_ode import train_ode_command
from odekit.cli.vocabulary import rewrite_deprecated


class _FlagOption(TyperOption):
    """A boolean flag: its help row shows no `<bool>` value placeholder (it takes no value)."""

    def display_type_rich(self, ctx: Context) -> str | None:
        return None


class _ManyArgument(TyperArgument):
    """An argument taking several values: its help row shows the type of one value (`<path>`),
    not Typer's `<list[Path]>`; the name (metavar `NAME...`) says that several are taken."""

    def display_type_rich(self, ctx: Context) -> str | None:
        (item,) = get_args(self.type_descriptor.annotation) or (str,)
        return f"<{getattr(item, '__name__', str(item)).lower()}>"


def _plain_flags(params: list[Parameter]) -> list[Parameter]:
    """Flags show no value type; many-valued arguments show the type of one value."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and not isinstance(param, _FlagOption):
            param.__class__ = _FlagOption
        elif isinstance(param, TyperArgument) and param.nargs != 1 and not isinstance(param, _ManyArgument):
            param.__class__ = _ManyArgument
    return params


class OdekitCommand(TyperCommand):
    """Usage lines name arguments as `CHECKPOINT` (Typer writes `{checkpoint}`); flags show no value type."""

    def collect_usage_pieces(self, ctx: Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = (param.metavar or param.name or "").upper()
                name = name if param.required else f"[{name}]"
                pieces.append(name + ("..." if param.nargs != 1 and not name.endswith("...") else ""))
        return pieces

    def get_params(self, ctx: Context) -> list[Parameter]:
        return _plain_flags(super().get_params(ctx))


class OdekitGroup(TyperGroup):
    """Accepts a command's deprecated option spellings (odekit.cli.vocabulary) with a note on stderr."""

    def resolve_command(self, ctx: Context, args: list[str]) -> tuple[Any, Any, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        return name, command, rewrite_deprecated(name or "", rest)

    def get_params(self, ctx: Context) -> list[Parameter]:
        return _plain_flags(super().get_params(ctx))


app = typer.Typer(
    name="odekit",
    help="Neural ODEs with memory-efficient gradients, reduced-order compression and universal adversarial attacks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",
    cls=OdekitGroup,
)

COMMANDS = [
    ("info", info_command, INFO_EPILOG),
    ("train-ode", train_ode_command, TRAIN_ODE_EPILOG),
    ("smoothness-check", smoothness_command, SMOOTHNESS_EPILOG),
    ("reduce", reduce_command, REDUCE_EPILOG),
    ("asnet", asnet_command, ASNET_EPILOG),
    ("attack", attack_command, ATTACK_EPILOG),
    ("certify", certify_command, CERTIFY_EPILOG),
    ("export", export_command, EXPORT_EPILOG),
]
for _name, _function, _epilog in COMMANDS:
    app.command(_name, epilog=_epilog, cls=OdekitCommand)(_function)  # type: ignore[type-var]


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
