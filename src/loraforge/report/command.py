"""`loraforge report RUN`: rebuild a run's `report.html`. Light imports only (cli.py imports
this module for --help); the work happens in `loraforge.report.html`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from loraforge.options import ConfigOpt, SetOpt

RunArg = Annotated[str, typer.Argument(help="Run name: a folder under "
                   "<storage>/Multi_Concept_Output/.")]


def find_run(runs_dir: Path, run: str) -> Path:
    """`runs_dir / run`, or a ForgeError listing the runs that exist."""
    from loraforge import runs
    from loraforge.errors import ForgeError

    runs.check_run_name(run)
    run_dir = runs_dir / run
    if (run_dir / runs.RECORD).is_file():
        return run_dir
    names = [Path(r["dir"]).name for r in runs.list_runs(runs_dir)]
    shown = ", ".join(names) if names else "none yet"
    raise ForgeError(f"no training run `{run}` (no {runs.RECORD} in {run_dir})",
                     path=runs_dir, fix=f"runs found: {shown}; pass one of them, or check "
                     "storage.root (--config/--set storage.root=...)")


def report_command(run: RunArg, config: ConfigOpt = None, overrides: SetOpt = None) -> None:
    """Rebuild RUN's report.html: config, dataset, loss curve, previews and LoRA files per epoch.

    The page opens from the file system (no server, no network) and links only files that exist.
    """
    from rich.console import Console

    from loraforge.config import load_settings
    from loraforge.report.html import write_report

    settings = load_settings(config, list(overrides or []))
    run_dir = find_run(settings.runs_dir, run)
    path = write_report(run_dir, settings.file_mode)
    Console(soft_wrap=True, highlight=False).print(f"report: {path}", markup=False)
