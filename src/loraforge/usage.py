"""Help and usage in the conventions users know from other CLIs (light imports only).

Typer shows Python types where a CLI shows metavars (`--set <list[str]>`, `--json <bool>`,
`report [OPTIONS] {run}`) and answers a usage error with a box and exit code 2. Here options get
metavars (`--set KEY=VALUE`, `--seed N`, `--config FILE`), flags none, arguments their name in
capitals (`report [OPTIONS] RUN`), and a usage error becomes our `error:`/`fix:` lines, exit 1.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

HELP_OPTION_NAMES = ["-h", "--help"]
# Metavars by value type, for options declared without one (argparse's and click's habits).
TYPE_METAVARS = {int: "N", float: "NUMBER", Path: "PATH"}


class ConventionalArgument(TyperArgument):
    """An argument shown by its metavar: `RUN` when required, `[RUN]` when optional."""

    def _usage_display_name(self) -> str:
        name = self.display_name_raw + ("..." if self.nargs != 1 else "")
        return name if self.required else f"[{name}]"

    def display_type_rich(self, ctx: typer.Context) -> str | None:
        return None


def _option_metavar(option: TyperOption) -> str:
    annotation = option.type_descriptor.annotation
    element = annotation.__args__[0] if option.type_descriptor.is_list else annotation
    return TYPE_METAVARS.get(element, option.name.upper() if option.name else "VALUE")


def conventional(command: TyperGroup | TyperCommand) -> None:
    """Give every parameter of `command` and its subcommands a metavar (none for flags and for
    `-h`/`--help`)."""
    help_option = command.get_help_option(typer.Context(command,
                                                        help_option_names=HELP_OPTION_NAMES))
    if help_option is not None:
        help_option.metavar = ""
    for param in command.params:
        if isinstance(param, TyperArgument):
            if param.metavar is None:
                param.metavar = (param.name or "value").upper()
            # typer builds its parameters itself and offers no hook for their display
            param.__class__ = ConventionalArgument
        elif isinstance(param, TyperOption) and param.metavar is None:
            param.metavar = "" if param.is_flag else _option_metavar(param)
    for sub in getattr(command, "commands", {}).values():
        conventional(sub)


def report_usage_error(exc: typer.TyperException, err: Console) -> int:
    """Print a usage error (bad value, unknown option, missing argument) as `error:`/`fix:`
    lines; return the exit code, 1. With no arguments Typer already printed the help."""
    if type(exc).__name__ == "NoArgsIsHelpError":
        return 1
    err.print(Text.assemble(("error: ", "bold red"), exc.format_message()), soft_wrap=True)
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        usage = ctx.get_usage().removeprefix("Usage:").strip()
        err.print(f"  fix: usage: {usage}; `{ctx.command_path} --help` explains each option",
                  soft_wrap=True, markup=False, highlight=False)
    return 1
