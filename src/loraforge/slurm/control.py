"""`loraforge slurm status|cancel|logs|mark-failed` and `loraforge runs`: what was submitted
(jobs.json), what SLURM says about it now (scontrol), and what the runs say (run.json)."""

from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from loraforge import scheduler
from loraforge.config import Settings, outside_project_note
from loraforge.errors import ForgeError
from loraforge.runs import (
    RECORD,
    TRAINED_FROM,
    RunRecord,
    another_project,
    check_run_name,
    list_runs,
    lora_files,
    on_this_cluster,
    project_of,
    read_record,
    saved_states,
    state_step,
    stopped,
)
from loraforge.slurm.jobs import jobs_path, load_jobs

RECENT = 20


def select_jobs(settings: Settings, jobs: list[dict[str, Any]], run: str | None,
                ) -> list[dict[str, Any]]:
    """The recorded jobs of RUN (a run name, job name or job id, of any project), else the
    recent ones of this project: the storage root is shared, and its newest jobs may be
    another project's. `jobs`: those recorded for the storage root (load_jobs)."""
    if not jobs:
        raise ForgeError("no jobs were submitted with `loraforge slurm` for this storage root",
                         path=jobs_path(settings.storage_root),
                         fix="submit one with `loraforge slurm train` (or `pipeline`, `sweep`)")
    if run is None:
        own = this_project(settings, jobs)
        if not own:
            raise ForgeError(_none_here(settings, jobs), path=jobs_path(settings.storage_root),
                             fix=OTHERS_FIX)
        return own[-RECENT:]
    chosen = [j for j in jobs if run in (j.get("run"), j.get("job_id"), j.get("array_job_id"),
                                          j.get("name"))]
    if not chosen:
        known = sorted({str(j.get("run")) for j in jobs if j.get("run")})
        raise ForgeError(f"no recorded job for `{run}`", path=jobs_path(settings.storage_root),
                         fix="give a run name or job id from `loraforge slurm status`"
                             + (f"; runs: {', '.join(known[-10:])}" if known else ""))
    return chosen


#: How to reach another project's jobs, which the commands without a RUN leave alone.
OTHERS_FIX = ("run it in that project's folder (or with its --config), or name the job: "
              "`loraforge slurm status|logs|cancel JOB_ID_OR_RUN`")


def this_project(settings: Settings, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The jobs submitted from this project's folder (each entry records its project's)."""
    return [j for j in jobs if j.get("project") == str(settings.base_dir)]


def _none_here(settings: Settings, jobs: list[dict[str, Any]]) -> str:
    return (f"no job of this project ({settings.base_dir}) is recorded: the {len(jobs)} "
            "recorded for this storage root are other projects'")


def _note_others(settings: Settings, jobs: list[dict[str, Any]], done: str) -> None:
    """Say so when the storage root's newest job is another project's: left alone, `done`
    (what the command did instead) with this project's."""
    newest = jobs[-1] if jobs else {}
    if newest and newest.get("project") != str(settings.base_dir):
        _say(f"note: the newest job in {jobs_path(settings.storage_root)} ({newest['job_id']}) "
             f"is another project's ({newest.get('project') or 'not recorded'}), left alone: "
             f"{done} ({settings.base_dir}). To reach another's: {OTHERS_FIX}")


def job_status(settings: Settings, jobs: list[dict[str, Any]], run: str | None,
               ) -> list[dict[str, Any]]:
    rows = []
    for entry in select_jobs(settings, jobs, run):
        elsewhere = scheduler.another_cluster(entry.get("cluster"))
        records = [] if elsewhere else scheduler.show_jobs([entry["job_id"]])
        live = records[0] if records else {}
        row = {k: entry.get(k) for k in ("job_id", "kind", "run", "name", "log", "depends_on",
                                         "submitted_at", "cluster")}
        if elsewhere:  # this SLURM's job of that id, if any, is another job
            row.update(state=f"(on cluster {entry['cluster']})", reason="", node="",
                       elapsed="", restarts="", exit_code="")
        elif live:
            row.update(state=live.get("JobState", "?"), reason=live.get("Reason", ""),
                       node=live.get("NodeList", ""), elapsed=live.get("RunTime", ""),
                       restarts=live.get("Restarts", "0"), exit_code=live.get("ExitCode", ""))
        else:
            row.update(state="(gone from SLURM)", reason="", node="", elapsed="", restarts="",
                       exit_code="")
        if entry.get("run") and entry.get("kind") == "train":
            record = read_record(settings.runs_dir / entry["run"]) or {}
            row["run_status"] = record.get("status", "not started")
            if (_job_runs(record, entry["job_id"]) and row["run_status"] == "running"
                    and on_this_cluster(record)  # else this SLURM knows nothing of its job
                    and live.get("JobState") not in scheduler.RUNNING_STATES):
                row["run_status"] = "stopped"  # its job is no longer running it
        else:
            row["run_status"] = ""
        rows.append(row)
    return rows


def _job_runs(record: dict[str, Any], job_id: str) -> bool:
    """Whether the run's record was written by the job `job_id` as `loraforge slurm` records
    it: its own id, or a sweep's `ARRAY_TASK` (the task also has an id of its own)."""
    slurm = record.get("slurm") or {}
    ids = {str(slurm.get("job_id")), f"{slurm.get('array_job_id')}_{slurm.get('array_task_id')}"}
    return str(job_id) in ids


def print_status(settings: Settings, run: str | None, as_json: bool, console: Console) -> None:
    """The jobs' table (or JSON): RUN's, else this project's recent ones. No jobs (of this
    project) is an answer, not an error (like `slurm cancel` with nothing to cancel); an
    unknown RUN is an error."""
    jobs = load_jobs(settings.storage_root)
    if run is None and not this_project(settings, jobs):
        if as_json:
            console.print_json("[]")
        elif jobs:
            console.print(f"{_none_here(settings, jobs)} (to see one: {OTHERS_FIX})",
                          markup=False)
        else:
            console.print(f"no jobs yet: none was submitted with `loraforge slurm` for "
                          f"{settings.storage_root} (submit one with `loraforge slurm train`, "
                          "`pipeline` or `sweep`)", markup=False)
            _note_defaults(settings)
        return
    rows = job_status(settings, jobs, run)
    if run is None:
        _note_others(settings, jobs, "shown are this project's jobs")
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(title=escape(f"jobs ({jobs_path(settings.storage_root)})"))
    for column in ("job", "job name", "run", "state", "reason", "node", "elapsed", "requeues",
                   "run status"):
        table.add_column(column)
    for row in rows:
        _add_row(table, row["job_id"], row["name"], row.get("run") or "-", row["state"],
                 row["reason"] if row["reason"] != "None" else "", row["node"],
                 row["elapsed"], row["restarts"], row["run_status"])
    console.print(table)


def _add_row(table: Table, *cells: object) -> None:
    """A row of text as it is: brackets in a value (a storage path, a run's error, a setting)
    are shown, not read as rich markup."""
    table.add_row(*(escape(str(cell)) if cell is not None else None for cell in cells))


def _note_defaults(settings: Settings) -> None:
    """An empty answer found with the built-in defaults may just mean: not in the project."""
    if settings.source is None:
        _say(outside_project_note())


def _say(text: str) -> None:
    """A note beside the answer, on stderr."""
    Console(stderr=True).print(text, markup=False, soft_wrap=True)


def cancel_jobs(settings: Settings, run: str | None) -> list[str]:
    """scancel the still active jobs of RUN; without RUN, those of this project's newest
    submission (another project's newer one is left alone, and said so)."""
    jobs = load_jobs(settings.storage_root)
    if run is not None:
        jobs = select_jobs(settings, jobs, run)
    elif jobs:
        own = this_project(settings, jobs)
        if own:
            _note_others(settings, jobs, "cancelled are the jobs of this project's newest "
                                         "submission")
        else:
            _say(f"note: {_none_here(settings, jobs)}, left alone. To cancel one: {OTHERS_FIX}")
        jobs = [j for j in own if j.get("submission") == own[-1].get("submission")]
    ids = []
    for entry in jobs:
        if scheduler.another_cluster(entry.get("cluster")):  # the id here is another job's
            _say(f"note: job {entry['job_id']} was submitted to cluster {entry['cluster']}, "
                 f"not this one ({scheduler.cluster_name()}), left alone: cancel it there")
            continue
        records = scheduler.show_jobs([entry["job_id"]])
        if records and records[0].get("JobState") in scheduler.ACTIVE_STATES:
            ids.append(entry["job_id"])
    scheduler.cancel(ids)
    return ids


def job_log(settings: Settings, run: str | None, lines: int | None) -> tuple[Path, str]:
    """The newest existing log of RUN's jobs (or of this project's newest job) and its text."""
    recorded = load_jobs(settings.storage_root)
    jobs = select_jobs(settings, recorded, run)
    if run is None:
        _note_others(settings, recorded,
                     "the log shown is of this project's newest job that has one")
    for entry in reversed(jobs):
        path = Path(entry["log"])
        if not path.is_file():
            asked = run is not None and not scheduler.another_cluster(entry.get("cluster"))
            live = scheduler.show_jobs([entry["job_id"]]) if asked else []
            stdout = live[0].get("StdOut") if live else None
            if stdout and Path(stdout).is_file():
                path = Path(stdout)
        if path.is_file():
            with open(path, encoding="utf-8", errors="replace") as fh:
                text = "".join(deque(fh, maxlen=lines)) if lines else fh.read()
            return path, text
    newest = jobs[-1]
    raise ForgeError(f"job {newest['job_id']} has no log yet (it appears once the job starts)",
                     path=newest["log"],
                     fix="see where it stands with `loraforge slurm status`")


def mark_failed(settings: Settings, run: str | None, reason: str) -> Path:
    """Called by a job script that gives up requeueing: run.json says failed, and why."""
    name = check_run_name(run if run is not None else settings.config.train.run_name)
    run_dir = settings.runs_dir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    RunRecord(run_dir, settings.file_mode).update(
        status="failed", error=reason, failed_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return run_dir


# --- loraforge runs ------------------------------------------------------------------------
def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in config.items()
            if isinstance(values, dict) for key, value in values.items()
            if section in ("models", "dataset", "train")}


def _goes_on(record: dict[str, Any], run: str) -> str:
    """How a stopped run goes on: a rerun starts from its newest state (not the last step it
    logged), else from step 0, except over LoRA files that its record (written before records
    said what trained a run) cannot show to be this run's."""
    run_dir = Path(record["dir"])
    rerun = f"`loraforge train --run {run}` (or its job, submitted again)"
    states = saved_states(run_dir)
    if states:
        return f"{rerun} resumes it from its last state (step {state_step(states[-1])})"
    if lora_files(run_dir) and not record.get(TRAINED_FROM):
        return (f"no state was saved, and its record does not show what trained its LoRA "
                f"files: `loraforge train --run {run} --restart` trains it from the start "
                "(they are replaced)")
    return f"{rerun} trains it from the start (no state was saved yet)"


def _stopped(record: dict[str, Any], run: str) -> str | None:
    """Why a run recorded as running has stopped, and how it goes on (None: it is running, as
    far as is known here)."""
    found = stopped(record)
    if found is None:
        return None
    why, requeued = found
    if requeued:
        return f"{why}, from its last state" if saved_states(Path(record["dir"])) else why
    return f"{why}; {_goes_on(record, run)}"


def runs_table(settings: Settings) -> list[dict[str, Any]]:
    """Every run under Multi_Concept_Output/ with status, loss, and the settings that differ."""
    runs = list_runs(settings.runs_dir)
    flat = [_flatten(r.get("config") or {}) for r in runs]
    known = [f for f in flat if f]  # a run whose record holds no settings differs in none
    keys = sorted({k for f in known for k in f} - {"train.run_name"})
    differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in known}) > 1]
    rows = []
    for record, values in zip(runs, flat, strict=True):
        slurm = record.get("slurm") or {}
        folder = Path(record["dir"]).name  # what --run takes; a copied run's record names the
        recorded = record.get("name")     # original until the copy is trained
        moved = f"copied or renamed from {recorded}" if recorded not in (None, folder) else None
        stopped = _stopped(record, folder)
        lacks = _lacks(record, values)
        rows.append({
            "name": folder, "status": "stopped" if stopped else record.get("status"),
            "final_loss": record.get("final_loss"), "step": record.get("step"),
            "total_steps": record.get("total_steps"), "epochs": record.get("epochs"),
            "job_id": slurm.get("job_id"), "node": slurm.get("node"),
            "cluster": slurm.get("cluster"),
            "error": stopped or record.get("error"),
            "moved": moved, "lacks": lacks, "lora": record.get("final_lora"),
            "project": project_of(record),
            "another_project": another_project(record, settings.base_dir, settings.runs_dir),
            "updated_at": record.get("updated_at"), "dir": record.get("dir"),
            "params": {k: values.get(k) for k in differ}})
    return rows


def _lacks(record: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """What a readable run.json does not record: "status", "settings" (a hand-edited or
    foreign one, or the one `slurm mark-failed` writes for a run that failed before training
    began). Its settings are unknown, not the ones that differ from every other run's."""
    if record.get("status") == "damaged":
        return []
    return [what for what, there in (("status", isinstance(record.get("status"), str)),
                                     ("settings", bool(settings))) if not there]


def print_runs(settings: Settings, as_json: bool, console: Console) -> None:
    settings.listed_storage_root("runs")
    rows = runs_table(settings)
    if as_json:
        console.print_json(json.dumps(rows))
        return
    if not rows:
        console.print(f"no runs yet in {settings.runs_dir}", markup=False)
        _note_defaults(settings)
        return
    params = list(rows[0]["params"])
    table = Table(title=escape(f"runs ({settings.runs_dir})"))
    for column in ("run", "status", "final loss", "steps", *[p.split(".")[-1] for p in params],
                   "job", "note"):
        table.add_column(escape(column), overflow="fold")
    for row in rows:
        loss = row["final_loss"]
        steps = f"{row['step'] or 0}/{row['total_steps'] or '?'}"
        lacks = f"its {RECORD} records no {' and no '.join(row['lacks'])}" if row["lacks"] else None
        other = (f"another project's ({row['another_project']})"
                 if row["another_project"] else None)
        note = "; ".join(text for text in (other, row["moved"], lacks, row["error"]) if text)
        unknown = row["status"] == "damaged" or "settings" in row["lacks"]
        _add_row(table, row["name"], row["status"] or "?",
                 f"{loss:.4f}" if isinstance(loss, int | float) else "-", steps,
                 *[str(row["params"][p]) if not unknown else "?" for p in params],
                 row["job_id"] or "-", note)
    console.print(table)
