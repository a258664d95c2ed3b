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


def probability(value: float | None) -> float | None:
    """Callback of an option that is a probability: a number from 0 to 1 (not nan)."""
    if value is not None and not 0.0 <= value <= 1.0:
        raise typer.BadParameter(f"must be a number from 0 to 1, got {value}")
    return value
