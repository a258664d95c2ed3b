"""Training runs on disk: `<storage>/Multi_Concept_Output/<run>/` with its `run.json` record."""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from loraforge import scheduler
from loraforge.errors import ForgeError
from loraforge.fsutil import write_atomic

RECORD = "run.json"
#: Resumable states: `state/step-NNNNNNNN/` folders, each with its position.json.
STATE_DIR = "state"
STATE_PREFIX = "step-"
POSITION = "position.json"
#: A finished run's concept separation, written by `loraforge eval`.
SEPARATION = "separation.json"
#: The longest run name: it becomes a folder and the start of its files' names.
MAX_NAME = 100
NAME_PATTERN = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._+-]{{0,{MAX_NAME - 1}}}$")
STATUSES = ("running", "finished", "failed", "interrupted")
#: run.json's sha256 of what decides the trained weights (settings, images, captions), as an
#: attempt starts: a rerun with the same one writes the same LoRA files.
TRAINED_FROM = "trained_from_sha256"


def check_run_name(name: str) -> str:
    """`name`, when it may name a run; else a message saying what is wrong with it."""
    if not name:  # `--run "$NAME"` in a script, with NAME unset
        raise ForgeError("the run name is empty",
                         fix="give a run name, e.g. blake_v2 (leave --run out for "
                             "train.run_name); in a job script, check that the variable given "
                             "as the run is set")
    if len(name) > MAX_NAME:
        raise ForgeError(f"run name `{name}` is {len(name)} characters long: a run name has "
                         f"at most {MAX_NAME}",
                         fix=f"shorten it to {MAX_NAME} characters or fewer")
    if not NAME_PATTERN.match(name) or name in {".", ".."}:
        raise ForgeError(f"run name `{name}` is not allowed: it becomes a folder and a file "
                         "name",
                         fix="use letters, digits, '.', '_', '+' and '-' only (no '/' or "
                             "spaces), starting with a letter or digit, e.g. --run blake_v2")
    return name


def final_lora(run_dir: Path) -> Path:
    return run_dir / f"{run_dir.name}.safetensors"


def epoch_lora(run_dir: Path, epoch: int) -> Path:
    return run_dir / f"{run_dir.name}-{epoch:06d}.safetensors"


def lora_files(run_dir: Path) -> list[Path]:
    """The run's LoRA files, final and per epoch (`<run>-000001.safetensors`), by name; not a
    file of the user's beside them (`<run>_merged.safetensors`), which `--restart` deletes."""
    epochs = run_dir.glob(f"{glob.escape(run_dir.name)}-[0-9][0-9][0-9][0-9][0-9][0-9]"
                          ".safetensors")
    final = final_lora(run_dir)
    return sorted([*epochs, *([final] if final.is_file() else [])])


def _load(run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the run's `run.json` as read, None when it is missing or cannot be read; why it cannot
    be read, None when it is missing or fine)."""
    try:
        record = json.loads((run_dir / RECORD).read_text())
    except (FileNotFoundError, NotADirectoryError):  # no record (or no run folder)
        return None, None
    except OSError as exc:
        return None, exc.strerror or str(exc)
    except ValueError as exc:
        return None, f"not JSON: {exc}"
    return (record, None) if isinstance(record, dict) else (None, "not a JSON object")


def damage(run_dir: Path) -> str | None:
    """Why the run's `run.json` cannot be read, when there is one (None: readable, or none)."""
    return _load(run_dir)[1]


def shown_record(run_dir: Path) -> dict[str, Any] | None:
    """The record to show for a run (`runs`, `report`): `read_record`'s, or for a run.json that
    cannot be read a stand-in with the status "damaged" and why as its error; None: none."""
    record = read_record(run_dir)
    if record is not None:
        return record
    why = damage(run_dir)
    return None if why is None else {"name": run_dir.name, "status": "damaged",
                                     "error": f"{RECORD} cannot be read ({why})", "config": {}}


def saved_states(run_dir: Path) -> list[Path]:
    """Complete states, oldest first."""
    root = run_dir / STATE_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STATE_PREFIX)
             and p.name[len(STATE_PREFIX):].isdigit() and (p / POSITION).is_file()]
    return sorted(found, key=state_step)


def state_step(state: Path) -> int:
    """The step a state folder (`step-NNNNNNNN`) was saved at."""
    return int(state.name[len(STATE_PREFIX):])


def rerun_goes_on(run_dir: Path) -> str:
    """What the same `train` command does with a run that stopped before its end: resume
    from its newest complete state or, with none saved yet, train from step 0 (where an
    attempt's LoRA files are written again, unchanged)."""
    states = saved_states(run_dir)
    if not states:
        return "training starts over from step 0 (no state was saved yet)"
    return f"training resumes from the last state saved completely (step {state_step(states[-1])})"


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The run's `run.json`; None when it is missing or unreadable, or not a JSON object (see
    `damage`). In a hand-edited or foreign file, a value of the wrong kind (see `_KINDS`)
    counts as absent, and so does a config section that is not a table."""
    record = _load(run_dir)[0]
    if record is None:
        return None
    for key, kinds in _KINDS.items():  # a value of the wrong kind counts as absent
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            record[key] = None
    record["config"] = {section: values for section, values in (record.get("config") or {}).items()
                        if isinstance(values, dict)}
    return record


#: The kinds of the values of run.json that the commands read (`runs`, `report`, `generate`).
_KINDS: dict[str, type | tuple[type, ...]] = {
    **dict.fromkeys(("name", "status", "error", "finished_at", "updated_at", "started_at",
                     "failed_at", "final_lora", "base_model", "device", "project",
                     TRAINED_FROM), str),
    **dict.fromkeys(("final_loss", "started_at_unix"), (int, float)),
    **dict.fromkeys(("step", "total_steps", "epochs", "steps_per_epoch", "pid"), int),
    **dict.fromkeys(("config", "slurm", "dataset", "images"), dict),
    "process_hosts": list,
}


def this_host() -> str:
    """The machine's name as SLURM knows it (a compute node), else its host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def vanished(record: dict[str, Any]) -> bool:
    """A run recorded as running whose training process is gone from this machine without a
    word (SIGKILL, the out-of-memory killer): it will never update its record again. A run on
    another machine cannot be told apart from a live one here, and counts as running."""
    hosts, pid = record.get("process_hosts"), record.get("pid")
    if record.get("status") != "running" or pid is None or not hosts or hosts[0] != this_host():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # someone else's process (alive), or no pid at all
        pass
    return False


STOPPED_WHY = ("its training process ended without updating its record (killed, e.g. out of "
               "memory, or its disk was full)")


def on_this_cluster(record: dict[str, Any]) -> bool:
    """Whether SLURM here can answer for the run's job: the job ran on this machine's cluster,
    or its record does not say which (written before records said so). Job ids are a
    cluster's own: two clusters mounting one storage root each have a job 12345, and each
    calls the other's unknown."""
    return not scheduler.another_cluster((record.get("slurm") or {}).get("cluster"))


def _job_ended(record: dict[str, Any]) -> tuple[str, bool] | None:
    """Why a run recorded as running is not, when its trainer ran in a SLURM job on another
    machine and SLURM says that job is no longer running it (killed without a word: out of
    memory, a node failure, `scancel --signal=KILL`), and whether the job goes on with it by
    itself (requeued). None: running, or not known from here (no job recorded, no SLURM on
    this machine, its controller does not answer, or the job is another cluster's)."""
    job_id = (record.get("slurm") or {}).get("job_id")
    if record.get("status") != "running" or not job_id or not on_this_cluster(record):
        return None
    try:
        found = scheduler.show_jobs([str(job_id)])
    except ForgeError:
        return None
    state = found[0].get("JobState", "?") if found else None
    if state in scheduler.RUNNING_STATES:
        return None
    if state is not None and state in scheduler.ACTIVE_STATES:  # requeued, waiting to start
        return f"its SLURM job {job_id} is {state} (requeued): it resumes the run when it " \
            "starts", True
    ended = f"ended ({state})" if state else "is gone from SLURM"
    return f"its SLURM job {job_id} {ended} without the run saying so", False


def stopped(record: dict[str, Any]) -> tuple[str, bool] | None:
    """Why a run recorded as running is not (its process is gone from this machine, or SLURM
    says its job elsewhere no longer runs it), and whether its job goes on with it by itself
    (requeued); None: running as far as is known here, or not recorded as running."""
    return (STOPPED_WHY, False) if vanished(record) else _job_ended(record)


def status(record: dict[str, Any] | None) -> str:
    """The run's status as every command shows it: its record's, except "stopped" for a run
    recorded as running that is not (`stopped`)."""
    if not record:
        return "unknown"
    return "stopped" if stopped(record) else str(record.get("status") or "unknown")


class RunRecord:
    """`run.json`: resolved config, dataset summary, status and timings, rewritten atomically."""

    def __init__(self, run_dir: Path, mode: int, write: bool = True) -> None:
        """`write=False`: keep the values in memory only (a training process other than rank 0)."""
        self.path = run_dir / RECORD
        self.mode = mode
        self.write = write
        self.data: dict[str, Any] = read_record(run_dir) or {"name": run_dir.name}

    def update(self, **values: Any) -> None:
        self.data.update(values)
        self.data["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if self.write:
            write_atomic(self.path, json.dumps(self.data, indent=2, sort_keys=True), self.mode)


def list_runs(runs_dir: Path) -> list[dict[str, Any]]:
    """Every run with a record, oldest update first. A run whose run.json cannot be read is
    listed too, with the status "damaged" and why as its error: its LoRA files are still
    there, and a run that vanished from the lists would look like none at all."""
    if not runs_dir.is_dir():
        return []
    runs = []
    for run_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        record = shown_record(run_dir)
        if record is not None:
            runs.append({**record, "dir": str(run_dir)})
    return sorted(runs, key=lambda r: r.get("finished_at") or r.get("updated_at") or "")


# --- the run a command takes when none is named ---------------------------------------------

def project_of(record: dict[str, Any]) -> str | None:
    """The project folder (its forge.toml's) that trained the run, as run.json records it (as
    jobs.json records each job's); None: not recorded (a run trained before runs recorded it)."""
    return record.get("project") or None


def another_project(record: dict[str, Any], project: Path, runs_dir: Path) -> str | None:
    """The project folder that trained the run, when it is another project than `project`
    (whose runs are in `runs_dir`); None when the run is this project's, or not known to be
    another's:
    - its record names no project (trained before runs recorded theirs);
    - it names this folder, by its path or as the file system sees it (a symlink, a bind
      mount, an automounter's second path);
    - the runs lie inside this project's folder (`storage.root = "."`, as `init` writes it):
      a copied project, or a copied demo, holds runs of its own;
    - the folder it names is not on this machine, and the run was not trained on another
      cluster (whose mount points may differ): the project moved."""
    owner = project_of(record)
    if owner is None or owner == str(project):
        return None
    if runs_dir.resolve().is_relative_to(project.resolve()):
        return None
    try:
        if os.path.samefile(owner, project):
            return None
    except OSError:  # not on this machine
        if on_this_cluster(record):
            return None
    return owner


def finished_time(record: dict[str, Any]) -> float:
    """When a finished run finished: its record's finished_at, else its final file's time."""
    stamp = record.get("finished_at")
    if isinstance(stamp, str):
        for parse in (lambda s: datetime.strptime(s, "%Y-%m-%dT%H:%M:%S%z"),
                      datetime.fromisoformat):
            try:
                return parse(stamp).timestamp()
            except ValueError:
                continue
    try:
        return final_lora(Path(record["dir"])).stat().st_mtime
    except OSError:
        return 0.0


@dataclass(frozen=True)
class Chosen:
    """The run a command takes when none is named, and how to say which it took."""

    run_dir: Path
    #: "run `NAME`, this project's newest finished run" (or, for a run whose record names no
    #: project, says so: it may be another project's on a shared storage root).
    said: str


def _missing(final: Path) -> str | None:
    return None if final.is_file() else "its final LoRA is not there"


class OtherProjectsOnly(ForgeError):
    """`newest_finished`'s refusal: the finished runs there are all other projects'."""


def newest_finished(runs_dir: Path, project: Path, name_it: str,
                    problem: Callable[[Path], str | None] = _missing) -> Chosen | None:
    """The newest finished run (by `finished_time`) of the project in the folder `project`
    whose final LoRA is usable: `problem(final)` says why not (None: usable; by default, one
    that is there). A run whose record names no project (trained before runs recorded theirs)
    counts as this project's. None: no such run, and no other project's either, or this
    project's finished runs are all unusable (the caller says why).

    The storage root is often a lab's, shared by several projects: another project's run is
    never taken unnamed. When the finished runs there are all other projects', a ForgeError
    names the newest and how to take it: `name_it`, with its name for `{name}`."""
    finished = sorted((r for r in list_runs(runs_dir) if r.get("status") == "finished"),
                      key=finished_time, reverse=True)
    others: list[dict[str, Any]] = []
    own = False
    for record in finished:
        run_dir = Path(record["dir"])
        if another_project(record, project, runs_dir) is not None:
            if final_lora(run_dir).is_file():
                others.append(record)
            continue
        own = True
        if problem(final_lora(run_dir)) is not None:
            continue
        said = f"run `{run_dir.name}`, this project's newest finished run"
        if project_of(record) is None:
            said = (f"run `{run_dir.name}`, the newest finished run of this project or of none "
                    f"recorded: its {RECORD} names no project (written before runs recorded "
                    "theirs), so it may be another project's on this storage root")
        return Chosen(run_dir, said)
    if own or not others:
        return None
    newest = others[0]
    name = Path(newest["dir"]).name
    raise OtherProjectsOnly(
        f"no finished training run of this project ({project}) under {runs_dir}: the newest "
        f"finished run there, `{name}`, is another project's ({project_of(newest)}), and "
        "another project's run is not taken without being named",
        fix=f"to use it, name it: {name_it.format(name=name)}; or train this project's own "
            "(`loraforge train`)")
