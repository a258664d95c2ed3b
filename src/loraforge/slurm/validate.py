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
    """Extra #SBATCH options: one option per entry, starting with '-', one line, no '#'."""
    checked = []
    for line in lines:
        text = str(line).strip()
        if text.startswith("#SBATCH"):
            text = text.removeprefix("#SBATCH").strip()
        if not text.startswith("-") or _CONTROL.search(text) or len(text) > 500:
            raise _fail(key, line, "is not one sbatch option on one line",
                        "each entry is an option as you would type it after #SBATCH, e.g. "
                        "\"--constraint=a100\" or \"--mail-type=END\"", where)
        gres = re.fullmatch(r"--gres=gpu:(.+)", text)
        if gres:
            parse_gpus(gres.group(1), key, where)
        checked.append(text)
    return checked
