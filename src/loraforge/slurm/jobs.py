"""`loraforge slurm train|generate|pipeline|sweep|tag`: render the job scripts from the config, keep
them under `<storage>/jobs/`, submit them with sbatch, and remember which job runs which run in
`<storage>/jobs/jobs.json` (for `slurm status|cancel|logs`)."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import itertools
import json
import os
import pwd
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from loraforge import scheduler
from loraforge.config import load_settings_and_bytes, parse_override, settings_from
from loraforge.errors import ForgeError
from loraforge.fsutil import storage_umask, write_atomic
from loraforge.generate.loras import split_weight
from loraforge.models import gpu_runtime
from loraforge.runs import check_run_name, final_lora
from loraforge.slurm.script import (
    LOG_DIR,
    ArrayTask,
    JobScript,
    Raw,
    absolute_activate,
    comment,
    quote,
    render,
    resources,
    umask_for,
)

JOBS_DIR = "jobs"
JOBS_RECORD = "jobs.json"
#: Under jobs/: the configs jobs were submitted with, one file per content (its sha256).
CONFIGS_DIR = "configs"
MAX_ARRAY = 1000


@dataclass
class Options:
    """What every submitting command shares."""

    config: Path | None = None
    overrides: list[str] = field(default_factory=list)
    gpus: str | None = None
    dry_run: bool = False


@dataclass
class GenerateArgs:
    """The `loraforge generate` options passed through to the job."""

    prompt: str | None = None
    negative: str | None = None
    seed: int | None = None
    lora: list[str] = field(default_factory=list)
    pose: str | None = None
    scenes: str | None = None
    name: str | None = None
    figure: list[str] = field(default_factory=list)  # casting: "CHARACTER: prompt" each

    def words(self) -> list[str]:
        words: list[str] = []
        if self.prompt is not None:
            words += ["--prompt", self.prompt]
        if self.negative is not None:
            words += ["--negative", self.negative]
        if self.seed is not None:
            words += ["--seed", str(self.seed)]
        for lora in self.lora:
            words += ["--lora", _absolute_lora(lora)]
        if self.pose is not None:
            words += ["--pose", _absolute_if_exists(self.pose)]
        if self.scenes is not None:
            words += ["--scenes", _absolute_if_exists(self.scenes)]
        if self.name is not None:
            words += ["--name", self.name]
        for figure in self.figure:
            words += ["--figure", figure]
        return words


def _absolute_if_exists(value: str) -> str:
    """A path given relative to where the user stands, made absolute (the job runs in the
    project folder); anything else (a run name, a LoRA with a weight) is passed unchanged."""
    path = Path(value).expanduser()
    return str(path.resolve()) if not path.is_absolute() and path.exists() else value


def _absolute_lora(value: str) -> str:
    """`--lora FILE:WEIGHT` with FILE made absolute and the weight kept as written: the weight
    is split off as `loraforge generate` splits it, else `FILE:0.7` exists nowhere and stays
    relative, and the job, in the project folder, misses the file or finds another."""
    ref, weight = split_weight(value)
    written = value.strip()[len(ref):] if weight is not None else ""
    return _absolute_if_exists(ref) + written


@dataclass
class Planned:
    """One script to submit, and the runs it will produce."""

    job: JobScript
    runs: list[str | None]
    depends_on: int | None = None  # index of an earlier Planned in the same submission
    alone: str = ""  # how to submit it by itself, when the jobs before it are queued already


class Submitter:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.settings, self.config_bytes = load_settings_and_bytes(options.config,
                                                                   options.overrides)
        self.res = resources(self.settings, options.gpus)
        self.project = self.settings.base_dir

    # --- the loraforge words every job shares -------------------------------------------
    def base_words(self) -> list[str]:
        words: list[str] = []
        if self.settings.source is not None:
            words += ["--config", str(self.settings.source)]
        for item in self.options.overrides:
            words += ["--set", item]
        return words

    def _job(self, **values: Any) -> JobScript:
        settings = self.settings
        return JobScript(res=self.res, activate=absolute_activate(settings),
                         umask=umask_for(settings.file_mode),
                         hf_home=quote(str(settings.cache_dir / "huggingface")),
                         workdir=self.project, storage_root=settings.storage_root,
                         submitted_config=self.submitted_config, **values)

    @functools.cached_property
    def submitted_config(self) -> tuple[Path, Path] | None:
        """(where the config as validated is kept for the job, the config file), named by its
        content: submissions of the same file share a copy, an edited one gets its own."""
        if self.settings.source is None or self.config_bytes is None:
            return None
        digest = hashlib.sha256(self.config_bytes).hexdigest()
        return (self.jobs_dir / CONFIGS_DIR / f"forge-{digest}.toml", self.settings.source)

    def _keep_config(self) -> None:
        """Write the copy the job reads (once per content: a copy already there is kept)."""
        if self.submitted_config is None or self.config_bytes is None:  # no forge.toml
            return
        copy = self.submitted_config[0]
        try:
            if copy.read_bytes() == self.config_bytes:
                return
        except OSError:  # not there yet (or not readable: written again)
            pass
        with storage_umask(self.settings.file_mode):  # jobs/configs/, for the group
            write_atomic(copy, self.config_bytes, self.settings.file_mode)

    def train_job(self, run: str) -> JobScript:
        words = [*self.base_words(), "--run", run]
        return self._job(kind="train", job_name=f"train-{run}",
                         title=f"train the LoRA `{run}` (rendered by `loraforge slurm`).",
                         command=["loraforge", "train", *words],
                         failed_command=["loraforge", "slurm", "mark-failed", *words],
                         notes=self._notes())

    def generate_job(self, args: GenerateArgs, run: str | None) -> JobScript:
        return self._job(kind="generate", job_name=f"generate-{run}" if run else "generate",
                         title="render posed scenes (rendered by `loraforge slurm`).",
                         command=["loraforge", "generate", *self.base_words(), *args.words()],
                         notes=self._notes())

    def tag_job(self, words: list[str]) -> JobScript:
        device = "cuda" if self.res.gpus.count else "cpu"
        return self._job(kind="tag", job_name="tag",
                         title="caption the dataset with the image tagger (rendered by "
                               "`loraforge slurm tag`); a rerun continues where it stopped.",
                         command=["loraforge", "dataset", "tag", *self.base_words(), "--device",
                                  device, *words],
                         notes=self._notes())

    def sweep_job(self, base_run: str, tasks: list[ArrayTask], max_parallel: int | None,
                  ) -> JobScript:
        words = [*self.base_words(), "--run", Raw('"$RUN"'), Raw('"${SETS[@]}"')]
        return self._job(kind="train", job_name=f"sweep-{base_run}",
                         title=f"a sweep of {len(tasks)} training runs (rendered by "
                               "`loraforge slurm sweep`).",
                         command=["loraforge", "train", *words],
                         failed_command=["loraforge", "slurm", "mark-failed", *words],
                         array=tasks, max_parallel=max_parallel, notes=self._notes())

    def _notes(self) -> list[str]:
        return [f"Project: {self.project}",
                f"Config: {self.settings.source or '(none: built-in defaults)'}"]

    # --- submission ---------------------------------------------------------------------
    def submit(self, plans: list[Planned], echo: Any) -> list[dict[str, Any]]:
        """Dry run: print each script and the sbatch call. Else write, submit, record, print."""
        if self.options.dry_run:
            for i, plan in enumerate(plans):
                echo(f"# --- {plan.job.job_name}: would be written to "
                     f"{comment(self.jobs_dir / (plan.job.job_name + '-<time>.ssub'))}")
                echo(render(plan.job))
                placeholders = {j: f"<id of {plans[j].job.job_name}>" for j in range(i)}
                options = self._dependency(plans, i, placeholders)
                call = " ".join(["sbatch", "--parsable", *options,
                                 f"{plan.job.job_name}-<time>.ssub"])
                echo(f"# would run (in {comment(self.project)}): {call}\n")
            return []
        activate = Path(absolute_activate(self.settings))
        if not activate.is_file():
            raise ForgeError(f"the job's Python environment is missing: {activate} does not "
                             "exist", path=self.settings.source,
                             fix="build it with ./setup_forge.sh, or point slurm.env_activate at "
                                 "the activate script of the environment that has loraforge")
        root, mode = self.settings.storage_root, self.settings.file_mode
        with _locked(root, mode):  # a record that cannot be kept is said before a job is queued
            load_jobs(root)
        (self.project / LOG_DIR).mkdir(parents=True, exist_ok=True)
        submission = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
        self._keep_config()
        scripts = [self._write(plan.job) for plan in plans]
        ids: dict[int, str] = {}
        entries: list[dict[str, Any]] = []
        unrecorded: str | None = None  # why the record failed, once a job was queued
        for i, (plan, script) in enumerate(zip(plans, scripts, strict=True)):
            options = self._dependency(plans, i, ids)
            try:
                ids[i], cluster = scheduler.sbatch(script, options, self.project)
            except ForgeError as exc:
                if not ids:
                    raise
                raise _half_submitted(exc, plans[i], list(ids.values())) from None
            new = self._entries(plan, script, ids[i], submission,
                                ids.get(plan.depends_on) if plan.depends_on is not None
                                else None, cluster or scheduler.cluster_name())
            try:
                record_jobs(root, new, mode)
            except (OSError, ForgeError) as exc:
                unrecorded = unrecorded or _why(exc)
            entries += new
            what = plan.job.job_name + (f" (after job {ids[plan.depends_on]})"
                                        if plan.depends_on is not None else "")
            echo(f"submitted job {ids[i]}: {what}")
            echo(f"  script: {script}")
            task = "<task>" if plan.job.array else None
            echo(f"  log:    {self.project / plan.job.log_name(ids[i], task)}")
        if unrecorded is not None:
            queued = list(ids.values())
            raise ForgeError(f"{_jobs_text(queued)} queued; only its record failed "
                             f"({unrecorded}), so `loraforge slurm status`, `cancel` and `logs` "
                             "do not know it", path=jobs_path(root),
                             fix="do not submit it again, that would queue it twice: `squeue "
                                 f"--me` shows it and `scancel {' '.join(queued)}` cancels it; "
                                 "make the record writable (permissions, free space) before the "
                                 "next submission")
        return entries

    @staticmethod
    def _dependency(plans: list[Planned], index: int, ids: dict[int, str]) -> list[str]:
        parent = plans[index].depends_on
        if parent is None:
            return []
        return [f"--dependency=afterok:{ids[parent]}", "--kill-on-invalid-dep=yes"]

    @property
    def jobs_dir(self) -> Path:
        return self.settings.storage_root / JOBS_DIR

    def _write(self, job: JobScript) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = self.jobs_dir / f"{job.job_name}-{stamp}.ssub"
        n = 1
        while path.exists():
            n += 1
            path = self.jobs_dir / f"{job.job_name}-{stamp}-{n}.ssub"
        with storage_umask(self.settings.file_mode):  # jobs/ itself, for the group's next member
            write_atomic(path, render(job), self.settings.file_mode | 0o100)
        return path

    def _entries(self, plan: Planned, script: Path, job_id: str, submission: str,
                 parent: str | None, cluster: str | None) -> list[dict[str, Any]]:
        """jobs.json's entries for a queued job; `cluster`: the one it was queued on (its id
        is that cluster's own)."""
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        common = {"kind": plan.job.kind, "name": plan.job.job_name, "submitted_at": now,
                  "submission": submission, "script": str(script),
                  "project": str(self.project), "depends_on": parent, "cluster": cluster}
        if not plan.job.array:
            return [{"job_id": job_id, "run": plan.runs[0], **common,
                     "log": str(self.project / plan.job.log_name(job_id))}]
        return [{"job_id": f"{job_id}_{i}", "array_job_id": job_id, "run": run, **common,
                 "log": str(self.project / plan.job.log_name(job_id, i))}
                for i, run in enumerate(plan.runs)]


# --- the commands ---------------------------------------------------------------------------
def submit_train(options: Options, run: str | None, echo: Any) -> list[dict[str, Any]]:
    sub = Submitter(options)
    name = check_run_name(run if run is not None else sub.settings.config.train.run_name)
    return sub.submit([Planned(sub.train_job(name), [name])], echo)


def submit_generate(options: Options, args: GenerateArgs, echo: Any) -> list[dict[str, Any]]:
    sub = Submitter(options)
    return sub.submit([Planned(sub.generate_job(args, None), [None])], echo)


def submit_tag(options: Options, words: list[str], echo: Any) -> list[dict[str, Any]]:
    """`loraforge dataset tag WORDS` as a job (one process; a GPU when slurm.gpus asks, which
    needs the GPU build of onnxruntime: refused without it, a note in a dry run)."""
    sub = Submitter(options)
    problem = gpu_runtime.why_unusable(sub.settings.storage_root) if sub.res.gpus.count else None
    if problem and not gpu_runtime.environment_has_cuda():
        message = f"the job asks for a GPU but could only tag on the CPU: {problem}"
        fix = f"{gpu_runtime.FETCH_FIX}; or submit it without a GPU: --gpus 0"
        if not options.dry_run:
            raise ForgeError(message, fix=fix)
        echo(f"# note: {comment(f'{message}; {fix}')}")
    return sub.submit([Planned(sub.tag_job(words), [None])], echo)


def submit_pipeline(options: Options, run: str | None, args: GenerateArgs, echo: Any,
                    ) -> list[dict[str, Any]]:
    """Training, then generation with its LoRA once training succeeded (cancelled if not)."""
    sub = Submitter(options)
    name = check_run_name(run if run is not None else sub.settings.config.train.run_name)
    lora = final_lora(sub.settings.runs_dir / name)
    args = dataclasses.replace(args, lora=[str(lora), *args.lora])
    alone = (f"`loraforge slurm generate --lora {name}` with this command's other options, once "
             "the training has finished")
    return sub.submit([Planned(sub.train_job(name), [name]),
                       Planned(sub.generate_job(args, name), [name], depends_on=0, alone=alone)],
                      echo)


def parse_params(params: list[str]) -> list[tuple[str, list[str]]]:
    """`train.unet_lr=1e-4,5e-4` -> ("train.unet_lr", ["1e-4", "5e-4"])."""
    parsed: list[tuple[str, list[str]]] = []
    for item in params:
        (section, key), _ = parse_override(item, "--param")
        if section == "slurm":
            raise ForgeError(f"--param `{item}`: the runs of a sweep are one job array, which "
                             "asks SLURM for one set of resources",
                             fix=f"set it once with --set {section}.{key}=..., or submit one "
                                 "sweep per value")
        raw = item.split("=", 1)[1]
        values = [v.strip() for v in raw.split(",")]
        if not all(values):
            raise ForgeError(f"--param `{item}` has an empty value",
                             fix="write --param section.key=value1,value2,...")
        parsed_values = [json.dumps(parse_override(f"{section}.{key}={v}")[1]) for v in values]
        if len(set(parsed_values)) != len(parsed_values):  # 1e-4 and 0.0001 are one value
            raise ForgeError(f"--param `{item}` repeats a value",
                             fix="list each value once")
        full = f"{section}.{key}"
        if full == "train.run_name":
            raise ForgeError("--param `train.run_name` cannot be swept: each run is named from "
                             "its values", fix="set the names' common start with --run")
        if any(full == k for k, _ in parsed):
            raise ForgeError(f"--param `{full}` is given twice",
                             fix="give each key one --param, listing all its values")
        parsed.append((full, values))
    if not parsed:
        raise ForgeError("a sweep needs at least one --param",
                         fix="e.g. --param train.unet_lr=1e-4,5e-4 --param "
                             "train.network_dim=8,16")
    return parsed


def sweep_tasks(base_run: str, params: list[tuple[str, list[str]]]) -> list[ArrayTask]:
    """One run per combination, named from the values: <run>-unet_lr1e-4-network_dim8."""
    tasks = []
    for combo in itertools.product(*[values for _, values in params]):
        keys = [key for key, _ in params]
        name = "-".join([base_run, *(f"{k.split('.')[-1]}{v}" for k, v in zip(keys, combo,
                                                                              strict=True))])
        try:
            check_run_name(name)
        except ForgeError as exc:
            raise ForgeError(f"the sweep names each run from its values, and {exc.message}",
                             fix="sweep values that fit in a file name (letters, digits, . _ "
                                 "+ -); a path or a time does not") from None
        tasks.append(ArrayTask(name, [f"{k}={v}" for k, v in zip(keys, combo, strict=True)]))
    if len(tasks) > MAX_ARRAY:
        raise ForgeError(f"the sweep has {len(tasks)} runs; at most {MAX_ARRAY} fit in one job "
                         "array", fix="sweep fewer values")
    return tasks


def submit_sweep(options: Options, run: str | None, params: list[str],
                 max_parallel: int | None, echo: Any) -> list[dict[str, Any]]:
    sub = Submitter(options)
    base = check_run_name(run if run is not None else sub.settings.config.train.run_name)
    tasks = sweep_tasks(base, parse_params(params))
    for task in tasks:  # every combination must be a valid config before anything is submitted
        settings_from(sub.config_bytes, sub.settings.source, options.overrides, task.sets)
    entries = sub.submit([Planned(sub.sweep_job(base, tasks, max_parallel),
                                  [t.run for t in tasks])], echo)
    if not options.dry_run:
        for entry in entries:
            echo(f"  {entry['job_id']}: {entry['run']}")
    return entries


# --- the job record -------------------------------------------------------------------------
def jobs_path(storage_root: Path) -> Path:
    return storage_root / JOBS_DIR / JOBS_RECORD


@contextlib.contextmanager
def _locked(storage_root: Path, file_mode: int) -> Iterator[None]:
    """The record's lock. jobs/ and the lock get storage.file_mode's permissions: with "0664"
    the group's next member may take it too."""
    lock = storage_root / JOBS_DIR / ".jobs.lock"
    with storage_umask(file_mode), _open_lock(lock) as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _open_lock(lock: Path) -> IO[str]:
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        return open(lock, "a")
    except PermissionError as exc:
        raise _not_permitted(Path(exc.filename or lock), "cannot be written") from None


def load_jobs(storage_root: Path) -> list[dict[str, Any]]:
    path = jobs_path(storage_root)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except PermissionError:
        raise _not_permitted(path, "cannot be read") from None
    except (OSError, ValueError) as exc:
        raise _damaged(path, str(exc)) from None
    jobs = data.get("jobs", []) if isinstance(data, dict) else None
    if not isinstance(jobs, list) or not all(
            isinstance(job, dict) and isinstance(job.get("job_id"), str)
            and all(isinstance(job.get(key, ""), str | None) for key in ("run", "log", "name"))
            for job in jobs):
        raise _damaged(path, 'not {"jobs": [...]} with a job_id, run and log in each entry')
    return list(jobs)


def _damaged(path: Path, why: str) -> ForgeError:
    return ForgeError(f"cannot be read ({why})", path=path,
                      fix="it is only a record of submitted jobs: move it away to start a new "
                          "one")


def _not_permitted(path: Path, what: str) -> ForgeError:
    """Another member's file in a shared storage root: a permission to ask for, not a record to
    move away (it lists everyone's jobs)."""
    try:
        owner = f"it belongs to {pwd.getpwuid(path.stat().st_uid).pw_name}"
    except (OSError, KeyError):
        owner = "made by another user"
    return ForgeError(f"{what}: permission denied ({owner})", path=path,
                      fix="keep it: the job record lists the jobs of everyone who submits under "
                          "this storage root. Ask its owner to let the group read and write it "
                          "(`chmod g+rw` on it, `chmod g+rwx` on its folder), and set "
                          'storage.file_mode = "0664" so that new files are')


def _half_submitted(exc: ForgeError, plan: Planned, queued: list[str]) -> ForgeError:
    """sbatch refused a job after the jobs before it were queued: say they are, and how to
    either cancel them or submit the rest, as running the same command again queues them twice."""
    ids = " ".join(queued)
    rest = f", or keep it and submit only the rest: {plan.alone}" if plan.alone else ""
    return ForgeError(f"{exc.message}; {_jobs_text(queued)} already queued, "
                      f"{plan.job.job_name} is not", path=exc.path,
                      fix=f"{exc.fix}. Then either cancel what is queued (`loraforge slurm "
                          f"cancel {ids}`, or `scancel {ids}`) and run the same command "
                          f"again{rest}")


def _why(exc: OSError | ForgeError) -> str:
    if isinstance(exc, ForgeError):
        return str(exc.message)
    return f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)


def _jobs_text(ids: list[str]) -> str:
    """`job 42 is` or `jobs 42 and 43 are`."""
    if len(ids) == 1:
        return f"job {ids[0]} is"
    return f"jobs {', '.join(ids[:-1])} and {ids[-1]} are"


def record_jobs(storage_root: Path, entries: list[dict[str, Any]], file_mode: int) -> None:
    with _locked(storage_root, file_mode):
        jobs = load_jobs(storage_root) + entries
        write_atomic(jobs_path(storage_root), json.dumps({"jobs": jobs}, indent=2), file_mode)
