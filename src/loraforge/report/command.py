"""`loraforge report RUN`: rebuild a run's `report.html`. Light imports only (cli.py imports
this module for --help); the work happens in `loraforge.report.html`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from loraforge.options import ConfigOpt, SetOpt

RunArg = Annotated[str, typer.Argument(help="Run name: a folder under "
                   "<storage>/Multi_Concept_Output/ (or its path).")]


def _run_name(runs_dir: Path, run: str) -> str:
    """The run's name from what was typed: a name, `name/`, or a path to a run folder under
    `runs_dir` (as the shell completes it, `Multi_Concept_Output/name/`)."""
    from loraforge.errors import ForgeError

    path = Path(run)
    if len(path.parts) == 1:
        return path.name or run
    # the folder's own name, not where it links to (a run folder may be a link to scratch)
    if Path(os.path.abspath(path)).parent.resolve() != runs_dir.resolve():
        raise ForgeError(f"`{run}` is not a run folder of this project: runs are the folders "
                         f"in {runs_dir}", path=path,
                         fix="name the run (`loraforge runs` lists them), or pass --config/--set "
                             "storage.root=... for another storage root")
    return path.name


def find_run(runs_dir: Path, run: str) -> Path:
    """`runs_dir / run` (`run` as `_run_name` reads it), or a ForgeError listing the runs that
    exist."""
    from loraforge import runs
    from loraforge.errors import ForgeError

    run = runs.check_run_name(_run_name(runs_dir, run))
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
