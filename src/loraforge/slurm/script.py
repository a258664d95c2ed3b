"""Job scripts: plain bash with `#SBATCH` lines from `[slurm]`, one `loraforge` call, and the glue
that turns SLURM's time-limit warning into checkpoint -> requeue -> resume.

The same renderer writes the project's `submit_training.ssub` / `submit_inference.ssub`
(`loraforge init`) and the scripts `loraforge slurm ...` submits. Values in `#SBATCH` lines are
validated (see validate.py); every word of the script body is shlex-quoted.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from loraforge import fsutil
from loraforge.config import STORAGE_ENV, Settings
from loraforge.errors import ForgeError
from loraforge.slurm.validate import (
    Gpus,
    check_extra,
    check_mem,
    check_name,
    check_partition,
    parse_gpus,
    parse_time,
    split_gres,
)
from loraforge.submitted import SUBMITTED_ENV, SUBMITTED_FROM_ENV

TRAIN_SCRIPT = "submit_training.ssub"
INFERENCE_SCRIPT = "submit_inference.ssub"
LOG_DIR = "logs"
OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE", "HF_DATASETS_OFFLINE",
           "HF_HUB_DISABLE_TELEMETRY")
Kind = Literal["train", "generate", "tag"]


class Raw(str):
    """A word placed in the script as is (a shell variable reference we wrote ourselves)."""


def quote(word: str) -> str:
    return str(word) if isinstance(word, Raw) else shlex.quote(str(word))


def comment(text: str) -> str:
    """`text` for a `# ...` line, each character that is not printable written as its escape
    (`\\n`, `\\x1b`): a newline in a folder's name would end the comment, the rest would run as a
    command, and sbatch would stop reading #SBATCH lines there."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in str(text))


@dataclass(frozen=True)
class Resources:
    """The validated `[slurm]` values (plus a --gpus override)."""

    partition: str
    nodes: int
    cpus: int
    mem: str
    time: str
    time_seconds: int
    gpus: Gpus
    account: str | None
    qos: str | None
    extra: list[str]
    grace_seconds: int
    max_requeues: int


def resources(settings: Settings, gpus: str | None = None) -> Resources:
    """Check every `[slurm]` value that becomes an #SBATCH line; ForgeError names the key."""
    cfg = settings.config.slurm
    where = settings.origin  # a value's --set, else the config file
    seconds = parse_time(cfg.time, where=where("slurm.time"))
    if seconds <= cfg.grace_seconds:
        from loraforge.errors import ForgeError

        raise ForgeError(f"`slurm.time` = {cfg.time!r} ({seconds} s) is not longer than "
                         f"`slurm.grace_seconds` = {cfg.grace_seconds}: the save-and-requeue "
                         "warning would come at once", path=where("slurm.time"),
                         fix="raise slurm.time or lower slurm.grace_seconds (at least 30)")
    per_node = cfg.gpus_per_node if cfg.gpus_per_node is not None else cfg.gpus
    key = "slurm.gpus_per_node" if cfg.gpus_per_node is not None else "slurm.gpus"
    gpu = parse_gpus(gpus) if gpus is not None else parse_gpus(per_node, key, where(key))
    return Resources(
        partition=check_partition(cfg.partition, where=where("slurm.partition")),
        nodes=cfg.nodes, cpus=cfg.cpus, mem=check_mem(cfg.mem, where=where("slurm.mem")),
        time=cfg.time.strip(), time_seconds=seconds, gpus=gpu,
        account=check_name(cfg.account, "slurm.account", where("slurm.account"))
        if cfg.account else None,
        qos=check_name(cfg.qos, "slurm.qos", where("slurm.qos")) if cfg.qos else None,
        extra=check_extra(cfg.extra, where=where("slurm.extra")),
        grace_seconds=cfg.grace_seconds, max_requeues=cfg.max_requeues)


def umask_for(file_mode: int) -> str:
    """The `umask` line's value for storage.file_mode (fsutil.umask_for), e.g. `0022`."""
    return f"{fsutil.umask_for(file_mode):04o}"


@dataclass(frozen=True)
class ArrayTask:
    run: str
    sets: list[str]


@dataclass
class JobScript:
    """Everything a job script says. `command` and `failed_command` are loraforge argv words."""

    kind: Kind
    job_name: str
    title: str
    res: Resources
    command: list[str]
    activate: str
    umask: str
    hf_home: str
    workdir: Path | None = None  # None: the folder sbatch was run from
    storage_root: Path | None = None  # None: loraforge resolves it in the job
    #: (the copy of the config as submitted, the config file): the job reads the copy
    submitted_config: tuple[Path, Path] | None = None
    failed_command: list[str] | None = None
    array: list[ArrayTask] = field(default_factory=list)
    max_parallel: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def log_pattern(self) -> str:
        return f"{LOG_DIR}/%x-%A_%a.out" if self.array else f"{LOG_DIR}/%x-%j.out"

    @property
    def layout(self) -> tuple[int, int, Gpus]:
        """(nodes, processes per node, GPUs per node): training runs one process per GPU on
        every node (one per node without GPUs); generation and tagging one process with at
        most one GPU."""
        gpus = self.res.gpus
        if self.kind == "train":
            return self.res.nodes, max(1, gpus.count), gpus
        return 1, 1, Gpus(min(gpus.count, 1), gpus.kind)

    @property
    def processes(self) -> int:
        nodes, per_node, _ = self.layout
        return nodes * per_node

    def log_name(self, job_id: str, task: int | str | None = None) -> str:
        suffix = f"{job_id}_{task}" if task is not None else job_id
        return f"{LOG_DIR}/{self.job_name}-{suffix}.out"


def _sbatch_lines(job: JobScript) -> list[str]:
    res = job.res
    lines = [f"--job-name={check_name(job.job_name, 'job name')}",
             f"--partition={res.partition}"]
    if res.account:
        lines.append(f"--account={res.account}")
    if res.qos:
        lines.append(f"--qos={res.qos}")
    nodes, per_node, gpus = job.layout
    lines += [f"--nodes={nodes}", f"--ntasks-per-node={per_node}", f"--cpus-per-task={res.cpus}"]
    gres, extra = split_gres(res.extra)
    if gpus.count or gres:
        lines.append("--gres=" + ",".join([gpus.gres()] * bool(gpus.count) + gres))
    lines += [f"--mem={res.mem}", f"--time={res.time}"]
    if job.array:
        limit = f"%{job.max_parallel}" if job.max_parallel else ""
        lines.append(f"--array=0-{len(job.array) - 1}{limit}")
    lines += [f"--output={job.log_pattern}", "--open-mode=append",
              f"--signal=B:USR1@{res.grace_seconds}", "--requeue", *extra]
    return [f"#SBATCH {line}" for line in lines]


def _command_lines(words: list[str], indent: str = "") -> str:
    """`loraforge train ...` on one line, or one option (with its value) per continued line."""
    segments: list[list[str]] = []
    for word in words:
        if not segments or word == "loraforge" or (str(word).startswith("-")
                                                   and not isinstance(word, Raw)):
            segments.append([quote(word)])
        else:
            segments[-1].append(quote(word))
    lines = [" ".join(segment) for segment in segments]
    if len(indent) + sum(len(line) + 1 for line in lines) <= 90:
        return indent + " ".join(lines)
    return indent + f" \\\n{indent}    ".join(lines)


def render(job: JobScript) -> str:
    res = job.res
    start = ("cd " + quote(str(job.workdir))) if job.workdir else \
        "# Runs in the folder sbatch was called from (the project folder)."
    out = ["#!/bin/bash", f"# LoRA Forge: {comment(job.title)}",
           *[f"# {comment(n)}" for n in job.notes],
           f"# Log: {comment(job.log_pattern)} (%x = job name, %j = job id)", "#",
           *_sbatch_lines(job), ""]
    out += [
        f"# Near the time limit SLURM sends USR1 to this shell {res.grace_seconds} s early",
        "# (slurm.grace_seconds): loraforge saves its state and exits 75; the job is then",
        "# requeued and resumes where it stopped. After slurm.max_requeues requeues it gives up.",
        f"MAX_REQUEUES={res.max_requeues}",
        "# Catch SLURM's signals from the start; once loraforge runs they are passed on to it.",
        'child=""',
        "warned=0",
        "cancelled=0",
        "trap 'warned=1; echo \"[$(date -Is)] USR1: time limit or preemption near: saving"
        " state\"; [ -z \"$child\" ] || kill -USR1 \"$child\" 2>/dev/null' USR1",
        *_term_trap(job),
        "",
        start,
        "# New files and folders: group-readable; only the owner writes (storage.file_mode).",
        f"umask {job.umask}",
        "# The Python environment (slurm.env_activate).",
        f"if ! source {quote(job.activate)}; then",
        f"    echo \"cannot activate the Python environment:\" {quote(job.activate)} >&2",
        "    exit 1",
        "fi",
        "# Compute nodes are offline: models come from lab storage, Hugging Face caches live",
        "# there too (loraforge sets the same itself; this covers anything else in the job).",
        f"export HF_HOME={job.hf_home}",
        "export " + " ".join(f"{name}=1" for name in OFFLINE),
        *_storage_lines(job),
        *_config_lines(job),
        "# One thread per CPU SLURM gave the job.",
        'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
        'export MKL_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
        "export PYTHONUNBUFFERED=1",
        "",
    ]
    if job.processes > 1:
        nodes, per_node, _ = job.layout
        out += [
            f"# Data-parallel training: srun starts {job.processes} processes ({nodes} node(s) x "
            f"{per_node}), one per GPU;",
            "# they meet on the allocation's first node (this one) at a free port. srun passes",
            "# USR1 on to every process and exits with their highest exit code.",
            'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
            'getent hosts "$MASTER_ADDR" >/dev/null || MASTER_ADDR="$(hostname)"',
            "MASTER_PORT=\"$(python -c 'import socket; s = socket.socket(); "
            's.bind(("", 0)); print(s.getsockname()[1])\')"',
            "export MASTER_ADDR MASTER_PORT",
            "",
        ]
    if job.array:
        out += ["# One run per combination of the swept values; SLURM_ARRAY_TASK_ID picks one.",
                'case "${SLURM_ARRAY_TASK_ID:-0}" in']
        for index, task in enumerate(job.array):
            sets = " ".join(f"--set {quote(s)}" for s in task.sets)
            out += [f"    {index}) RUN={quote(task.run)}", f"       SETS=({sets}) ;;"]
        out += ['    *) echo "no run for array task ${SLURM_ARRAY_TASK_ID:-}" >&2; exit 1 ;;',
                "esac", ""]
    out += [
        'echo "[$(date -Is)] job ${SLURM_JOB_ID:-(not under SLURM)} on $(hostname),'
        ' attempt $(( ${SLURM_RESTART_COUNT:-0} + 1 ))"',
        "",
        "# loraforge runs in the background so this shell can pass SLURM's signals on; a trap",
        "# interrupts `wait`, so wait again until loraforge has really exited.",
        _command_lines(_launch(job) + job.command) + " &",
        "child=$!",
        '[ "$warned" -eq 0 ] || kill -USR1 "$child" 2>/dev/null',
        'wait "$child"',
        'while kill -0 "$child" 2>/dev/null; do wait "$child"; done',
        'wait "$child"; status=$?',
        "# Killed by USR1 (128 + 10) before it could catch it (still starting): nothing was",
        "# lost, as every file is written atomically; resuming is safe, so treat it as saved.",
        'if [ "$status" -eq 138 ] && [ "$warned" -eq 1 ]; then status=75; fi',
        "",
        "# Exit 75: state saved after USR1. Requeue (same job id, same log), unless the job was",
        "# cancelled (TERM: scancel, or SLURM requeues it itself) or was requeued too often.",
        'if [ "$status" -eq 75 ] && [ "$cancelled" -eq 0 ] && [ -n "${SLURM_JOB_ID:-}" ]; then',
        '    restarts="${SLURM_RESTART_COUNT:-0}"',
        '    if [ "$restarts" -lt "$MAX_REQUEUES" ]; then',
        '        echo "[$(date -Is)] state saved; requeueing job $SLURM_JOB_ID'
        ' (requeue $((restarts + 1)) of at most $MAX_REQUEUES)"',
        '        scontrol requeue "$SLURM_JOB_ID" ||'
        ' echo "scontrol requeue failed: submit this script again to resume" >&2',
        "        exit 75",
        "    fi",
        '    reason="stopped by a signal $((restarts + 1)) times; not requeued again'
        ' (slurm.max_requeues = $MAX_REQUEUES)"',
        '    echo "[$(date -Is)] $reason" >&2',
    ]
    if job.failed_command:
        out.append(_command_lines([*job.failed_command, "--reason", Raw('"$reason"')],
                                  indent="    "))
    out += [
        "    exit 1",
        "fi",
        'echo "[$(date -Is)] loraforge exited with code $status"',
        'exit "$status"',
        "",
    ]
    return "\n".join(out)


def _storage_lines(job: JobScript) -> list[str]:
    """The storage root the submission used, absolute: the job runs in the project folder and
    may not inherit the submitting shell's environment (`--export=NONE`), where a relative
    LORAFORGE_STORAGE_ROOT, or none, would name another root."""
    if job.storage_root is None:
        return []
    return ["# The storage root the submission used (absolute, whatever the job inherits).",
            f"export {STORAGE_ENV}={quote(str(job.storage_root))}"]


def _config_lines(job: JobScript) -> list[str]:
    """The copy of forge.toml the submission kept: the job may start hours later, after the
    file was edited for the next experiment, and runs with what was submitted."""
    if job.submitted_config is None:
        return []
    copy, source = job.submitted_config
    return ["# The config as submitted: loraforge reads this copy of it, not the file as edited",
            "# since, and notes in the log what was edited.",
            f"export {SUBMITTED_ENV}={quote(str(copy))}",
            f"export {SUBMITTED_FROM_ENV}={quote(str(source))}"]


def _term_trap(job: JobScript) -> list[str]:
    if job.processes == 1:
        return ["trap 'cancelled=1; [ -z \"$child\" ] || kill -TERM \"$child\" 2>/dev/null' "
                "TERM INT"]
    return ["# srun ends the step on TERM once SLURM's KillWait is over; it passes USR1 on:",
            "# ask every process to save now.",
            "trap 'cancelled=1; [ -z \"$child\" ] || kill -USR1 \"$child\" 2>/dev/null' "
            "TERM INT"]


def _launch(job: JobScript) -> list[str]:
    """The words before `loraforge`: srun for a job of several processes. Every process
    exits 75 after a save; when one fails, srun ends the others a minute later instead of
    leaving them waiting for it (KillOnBadExit would also end them on that 75)."""
    if job.processes == 1:
        return []
    _, per_node, _ = job.layout
    return ["srun", f"--ntasks-per-node={per_node}", f"--cpus-per-task={job.res.cpus}",
            "--kill-on-bad-exit=0", "--wait=60"]


def _shell_path(path: Path, base: Path | None) -> str:
    """A path for the script body: relative to the job's folder ("$PWD"/...) when inside it."""
    if base is not None:
        try:
            rel = path.resolve().relative_to(base.resolve())
        except ValueError:
            pass
        else:
            return '"$PWD"' if str(rel) == "." else f'"$PWD"/{quote(str(rel))}'
    return quote(str(path))


def project_scripts(settings: Settings) -> dict[str, str]:
    """The two scripts `loraforge init` writes into the project (run from the project folder)."""
    res = resources(settings)
    project = settings.base_dir
    common = dict(res=res, activate=expanded_activate(settings),
                  umask=umask_for(settings.file_mode),
                  hf_home=_shell_path(settings.cache_dir / "huggingface", project))
    train = JobScript(kind="train", job_name="loraforge-train",
                      title="train the multi-concept LoRA over master_dataset/.",
                      command=["loraforge", "train"],
                      failed_command=["loraforge", "slurm", "mark-failed"],
                      notes=["Written by `loraforge init` from forge.toml [slurm]; never "
                             "overwritten, edit freely.",
                             f"Submit from the project folder:  sbatch {TRAIN_SCRIPT}",
                             "Rerun it after an interruption: training resumes from its "
                             "saved state."], **common)
    generate = JobScript(kind="generate", job_name="loraforge-generate",
                         title="render the posed scene with this project's newest finished LoRA.",
                         command=["loraforge", "generate"],
                         notes=["Written by `loraforge init` from forge.toml [slurm]; never "
                                "overwritten, edit freely.",
                                f"Submit from the project folder:  sbatch {INFERENCE_SCRIPT}",
                                "Writes Final_Images/final_command_scene.png under the "
                                "storage root."], **common)
    return {TRAIN_SCRIPT: render(train), INFERENCE_SCRIPT: render(generate)}


def _requests(text: str) -> list[str]:
    """What a job script asks of SLURM and of the node: its #SBATCH lines and the environment
    it activates (the rest, comments and commands, the user may edit freely)."""
    return [line.strip() for line in text.splitlines()
            if line.startswith("#SBATCH") or line.startswith("if ! source ")]


def script_drift(settings: Settings) -> dict[str, list[str]]:
    """The project's job scripts (`loraforge init`'s) that lack a request forge.toml [slurm]
    makes now, each with the lines it lacks: a script is written once, and `sbatch
    submit_training.ssub` does not read forge.toml. Lines the user added are no drift. Nothing
    when [slurm] itself is invalid (the commands that submit say so)."""
    try:
        scripts = project_scripts(settings)
    except ForgeError:
        return {}
    drift = {}
    for name, text in scripts.items():
        path = settings.base_dir / name
        try:
            have = set(_requests(path.read_text(encoding="utf-8", errors="replace")))
        except OSError:  # not there (or not readable): nothing to compare
            continue
        missing = [line for line in _requests(text) if line not in have]
        if missing:
            drift[name] = missing
    return drift


def drift_note(drift: dict[str, list[str]]) -> str:
    """One line on scripts that no longer ask what forge.toml [slurm] asks."""
    shown = "; ".join(f"{name} lacks {', '.join(lines[:3])}" + (" ..." if len(lines) > 3
                                                                else "")
                      for name, lines in drift.items())
    return (f"note: the job scripts no longer ask what forge.toml [slurm] asks ({shown}): "
            "`loraforge init --scripts` writes them again (the old ones are kept as .bak), or "
            "submit with `loraforge slurm train`, which reads forge.toml")


def expanded_activate(settings: Settings) -> str:
    """slurm.env_activate with `~` and `$VAR` expanded here: the script quotes it, so the job's
    shell would look for a folder named `$HOME`."""
    return os.path.expanduser(os.path.expandvars(settings.config.slurm.env_activate))


def absolute_activate(settings: Settings) -> str:
    path = Path(expanded_activate(settings))
    return str(path if path.is_absolute() else settings.base_dir / path)
