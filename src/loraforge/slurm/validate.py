"""Checks for every value that reaches a job script or `sbatch`, with messages naming the key.

`#SBATCH` lines are read by sbatch, not by a shell, and cannot be quoted reliably: each value that
goes there must match a strict pattern. Everything in the script body goes through shlex.quote.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from loraforge.errors import ForgeError

TIME_FORMATS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
_NAME = re.compile(r"^[A-Za-z0-9_.+-]{1,128}$")
_PARTITION = re.compile(r"^[A-Za-z0-9_.-]{1,64}(,[A-Za-z0-9_.-]{1,64})*$")
_MEM = re.compile(r"^(\d{1,9})([KMGT]?)$", re.IGNORECASE)
_GPU = re.compile(r"^(?:([A-Za-z0-9_.-]{1,64}):)?(\d{1,3})$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SET_GPUS = " and set `slurm.gpus` (or `slurm.gpus_per_node`): \"2\", or \"a100:2\" for a type"
_LAYOUT = ": training runs one process per GPU on each of `slurm.nodes` nodes, generation one"
_SET_MEM = " and set `slurm.mem` (memory per node)"
_REQUEUE = (": jobs save and requeue themselves near the time limit; `slurm.grace_seconds` and "
            "`slurm.max_requeues` tune it")
_LOG = (": the log is logs/<job name>-<job id>.out in the project folder, where "
        "`loraforge slurm logs` reads it")
#: The sbatch options a job script sets itself, each with the rest of the fix "remove it from
#: slurm.extra...": the same option in slurm.extra comes later and silently wins.
_OWNED = {
    "--partition": " and set `slurm.partition`", "--account": " and set `slurm.account`",
    "--qos": " and set `slurm.qos`", "--nodes": " and set `slurm.nodes`",
    "--ntasks": _LAYOUT, "--ntasks-per-node": _LAYOUT, "--ntasks-per-gpu": _LAYOUT,
    "--cpus-per-task": " and set `slurm.cpus` (CPUs per process)",
    "--cpus-per-gpu": " and set `slurm.cpus` (CPUs per process, one process per GPU)",
    "--gres": _SET_GPUS, "--gpus": _SET_GPUS, "--gpus-per-node": _SET_GPUS,
    "--gpus-per-task": _SET_GPUS,
    "--mem": _SET_MEM, "--mem-per-cpu": _SET_MEM, "--mem-per-gpu": _SET_MEM,
    "--time": " and set `slurm.time`", "--signal": _REQUEUE, "--requeue": _REQUEUE,
    "--no-requeue": _REQUEUE, "--output": _LOG, "--open-mode": _LOG,
    "--chdir": ": the job runs in the project folder (its logs too)",
    "--job-name": ": the job is named after its run (--run)",
    "--array": ": `loraforge slurm sweep` submits job arrays",
    "--dependency": ": `loraforge slurm pipeline` runs generation after training",
}
_SHORT = {"-p": "--partition", "-A": "--account", "-q": "--qos", "-N": "--nodes",
          "-n": "--ntasks", "-c": "--cpus-per-task", "-G": "--gpus", "-t": "--time",
          "-o": "--output", "-D": "--chdir", "-J": "--job-name", "-a": "--array",
          "-d": "--dependency"}


def _fail(key: str, value: object, problem: str, fix: str, where: str | None) -> ForgeError:
    return ForgeError(f"`{key}` = {value!r} {problem}", path=where, fix=fix)


def parse_time(value: str, key: str = "slurm.time", where: str | None = None) -> int:
    """A SLURM time limit in one of its formats -> seconds. Rejects anything else."""
    text = str(value).strip()
    days = 0
    body = text
    match = re.fullmatch(r"(\d{1,3})-(.+)", text)
    if match:
        days, body = int(match.group(1)), match.group(2)
    parts = body.split(":")
    ok = bool(parts) and all(re.fullmatch(r"\d{1,4}", p) for p in parts) and len(parts) <= 3
    seconds = 0
    if ok:
        numbers = [int(p) for p in parts]
        if match:  # D-HH, D-HH:MM, D-HH:MM:SS
            numbers += [0] * (3 - len(numbers))
            hours, minutes, secs = numbers
            ok = hours < 24 and minutes < 60 and secs < 60
        elif len(numbers) == 1:  # MM
            hours, minutes, secs = 0, numbers[0], 0
        elif len(numbers) == 2:  # MM:SS
            hours, minutes, secs = 0, numbers[0], numbers[1]
            ok = secs < 60
        else:  # HH:MM:SS
            hours, minutes, secs = numbers
            ok = minutes < 60 and secs < 60
        seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
    if not ok:
        raise _fail(key, value, f"is not a SLURM time limit ({TIME_FORMATS})",
                    "e.g. time = \"04:00:00\" (4 hours), \"90\" (90 minutes) or \"1-12\" "
                    "(1 day 12 hours)", where)
    if seconds <= 0:
        raise _fail(key, value, "is zero", "give the job a time limit, e.g. \"04:00:00\"",
                    where)
    return seconds


def check_mem(value: str, key: str = "slurm.mem", where: str | None = None) -> str:
    """Memory per node: a number with an optional K/M/G/T suffix (no suffix = megabytes)."""
    text = str(value).strip()
    match = _MEM.fullmatch(text)
    if not match:
        raise _fail(key, value, "is not a SLURM memory size",
                    "a whole number with an optional unit K, M, G or T: \"32G\", \"500M\" or "
                    "\"64000\" (megabytes)", where)
    return match.group(1) + match.group(2).upper()


@dataclass(frozen=True)
class Gpus:
    count: int
    kind: str | None = None

    def gres(self) -> str:
        return f"gpu:{self.kind}:{self.count}" if self.kind else f"gpu:{self.count}"


def parse_gpus(value: str | int, key: str = "--gpus", where: str | None = None) -> Gpus:
    """GPUs per node: `N` or `TYPE:N` (as in --gres=gpu:TYPE:N)."""
    text = str(value).strip()
    match = _GPU.fullmatch(text)
    if not match or int(match.group(2)) > 64:
        raise _fail(key, value, "is not a GPU request",
                    "write a count (\"1\") or a type and a count (\"a100:2\"), at most 64",
                    where)
    return Gpus(int(match.group(2)), match.group(1))


def check_partition(value: str, key: str = "slurm.partition", where: str | None = None) -> str:
    if not _PARTITION.fullmatch(str(value)):
        raise _fail(key, value, "is not a partition name",
                    "letters, digits, '_', '.', '-' (several separated by commas); "
                    "`sinfo -s` lists them", where)
    return value


def check_name(value: str, key: str, where: str | None = None) -> str:
    """An account, QOS or job name: plain characters only."""
    if not _NAME.fullmatch(str(value)):
        raise _fail(key, value, "contains characters a SLURM name cannot have",
                    "use letters, digits, '_', '.', '+' and '-' only", where)
    return value


def check_extra(lines: list[str], key: str = "slurm.extra", where: str | None = None,
                ) -> list[str]:
    """Extra #SBATCH options: one option per entry, starting with '-', one line, none that the
    script sets itself from another key."""
    checked = []
    for line in lines:
        text = str(line).strip()
        if text.startswith("#SBATCH"):
            text = text.removeprefix("#SBATCH").strip()
        if not text.startswith("-") or _CONTROL.search(text) or len(text) > 500:
            raise _fail(key, line, "is not one sbatch option on one line",
                        "each entry is an option as you would type it after #SBATCH, e.g. "
                        "\"--constraint=a100\" or \"--mail-type=END\"", where)
        owned = _owned(text)
        if owned == "--gres" and not _gres_gpus(text):
            owned = None  # local scratch, NVMe...: joined to the script's own --gres line
        if owned:
            raise _fail(key, line, f"sets {owned}, which the job script sets itself (this "
                        "later line would silently override it)",
                        f"remove it from {key}{_OWNED[owned]}", where)
        checked.append(text)
    return checked


def _gres_value(option: str) -> str:
    """The value of a `--gres=VALUE` (or `--gres VALUE`) option."""
    parts = re.split(r"[=\s]+", option.strip(), maxsplit=1)
    return parts[1].strip() if len(parts) == 2 else ""


def _gres_gpus(option: str) -> bool:
    """Whether a --gres option asks for GPUs (which `slurm.gpus` owns)."""
    return any(entry.strip().startswith("gpu") for entry in _gres_value(option).split(","))


def split_gres(extra: list[str]) -> tuple[list[str], list[str]]:
    """`slurm.extra` (checked) as (the generic resources its --gres options ask for, e.g.
    `lscratch:10`, and its other options): a script joins the first to its own --gres line,
    since a second --gres line would replace the GPUs it asks for."""
    gres = [_gres_value(line) for line in extra if _owned(line) == "--gres"]
    return [g for g in gres if g], [line for line in extra if _owned(line) != "--gres"]


def _owned(option: str) -> str | None:
    """The option of `_OWNED` that `option` (as written, with its value) sets, if any: `-t 60`
    sets --time, and so does `--tim=60`, as sbatch takes the start of a long option's name."""
    if not option.startswith("--"):
        return _SHORT.get(option[:2])
    name = "--" + re.split(r"[=\s]", option[2:], maxsplit=1)[0]
    if name in _OWNED:
        return name
    return next((owned for owned in _OWNED if len(name) > 2 and owned.startswith(name)), None)
