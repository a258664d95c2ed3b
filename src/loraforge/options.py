"""Command-line options every command shares (typer annotations; light imports only)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", "-c", metavar="FILE", help="forge.toml to use (default: ./forge.toml if present, "
    "else built-in defaults).")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", metavar="KEY=VALUE", help="Override a value: section.key=value (repeatable), e.g. "
    "--set train.epochs=5.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
