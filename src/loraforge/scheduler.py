"""The SLURM client programs, called with argument lists (never through a shell)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from loraforge.errors import ForgeError

#: Job states after which a job will not run again by itself.
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"})
ACTIVE_STATES = frozenset({
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
    "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"})
#: Active states in which the job's processes are (or may still be) alive; the others wait to
#: start (pending, requeued, held).
RUNNING_STATES = frozenset({
    "RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "RESIZING",
    "STOPPED"})

#: What SLURM's clients print when they cannot reach (or find) the controller.
UNREACHABLE = ("Unable to contact slurm controller", "Could not establish a configuration source",
               "Unable to process configuration file", "Socket timed out",
               "Zero Bytes were transmitted or received")
REACH_FIX = ("check that SLURM answers on this machine (`sinfo`; on a cluster, run this on its "
             "login node), then run the command again")


def _unreachable(message: str) -> bool:
    """Whether a SLURM client's error says the controller did not answer."""
    return any(sign in message for sign in UNREACHABLE)


_KEY = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=")


def parse_record(line: str) -> dict[str, str]:
    """One line of `scontrol show job -o`: `Key=Value Key=Value ...` (values may hold spaces)."""
    matches = list(_KEY.finditer(line))
    record: dict[str, str] = {}
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
        record[match.group(1)] = line[match.end():end].strip()
    return record


def parse_records(text: str) -> list[dict[str, str]]:
    return [parse_record(line) for line in text.splitlines() if "JobId=" in line]


def require(program: str, script: Path | None = None) -> str:
    """The path of a SLURM program, or a clear error (naming the kept script, if any)."""
    found = shutil.which(program)
    if found:
        return found
    where = (f"; the job script was written to {script}: submit it on a machine with SLURM "
             f"(`{program} {script.name}`)") if script is not None else ""
    raise ForgeError(f"`{program}` was not found on PATH: this machine is not a SLURM login "
                     f"node{where}",
                     fix="run this on the cluster's login node, or load SLURM first (e.g. "
                         "`module load slurm`)")


def _call(args: list[str], cwd: Path | None = None, timeout: float = 60,
          ) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ForgeError(f"`{' '.join(args[:2])}` did not answer within {timeout:.0f} s",
                         fix="check that the SLURM controller is up (`sinfo`)") from None


def sbatch(script: Path, options: list[str], cwd: Path) -> tuple[str, str | None]:
    """Submit `script` with `sbatch --parsable OPTIONS`; return the job id and the cluster
    sbatch names when the job went to another cluster (`--clusters`: `555;beta`), else None."""
    program = require("sbatch", script)
    result = _call([program, "--parsable", *options, str(script)], cwd=cwd)
    if result.returncode:
        message = (result.stderr or result.stdout).strip() or f"exit code {result.returncode}"
        if _unreachable(message):
            raise ForgeError(f"sbatch could not reach the SLURM controller, so nothing was "
                             f"submitted: {message}", path=script,
                             fix=f"{REACH_FIX}; the script named above is kept")
        raise ForgeError(f"sbatch refused the job: {message}", path=script,
                         fix="check the [slurm] section of forge.toml (partition, account, qos, "
                             "gpus, mem, time); the script named above is what was submitted")
    job_id, _, cluster = result.stdout.strip().partition(";")
    if not job_id.isdigit():
        raise ForgeError(f"sbatch answered {result.stdout.strip()!r}, not a job id", path=script,
                         fix="check with `squeue --me` whether it was queued; a wrapper around "
                             "sbatch must pass `--parsable` through")
    return job_id, cluster.strip() or None


def show_jobs(job_ids: list[str]) -> list[dict[str, str]]:
    """`scontrol show job -o` for each id (an array id gives one record per task); unknown ids
    (purged after MinJobAge) give nothing."""
    program = require("scontrol")
    records: list[dict[str, str]] = []
    for job_id in job_ids:
        result = _call([program, "show", "job", "-o", job_id])
        message = (result.stderr or result.stdout).strip()
        if result.returncode and _unreachable(message):
            raise ForgeError(f"scontrol could not reach the SLURM controller, so the state of "
                             f"job {job_id} is unknown: {message}",
                             fix=REACH_FIX)
        if result.returncode == 0:
            records += parse_records(result.stdout)
    return records


#: The cluster name each `scontrol` (by path and SLURM_CONF) gave, once per process.
_CLUSTERS: dict[tuple[str, str | None], str] = {}


def cluster_name() -> str | None:
    """The name of the SLURM cluster this machine is part of: SLURM_CLUSTER_NAME inside a job,
    else the ClusterName of `scontrol show config` (asked once per process); None: no SLURM
    here, or its controller does not answer."""
    inside = os.environ.get("SLURM_CLUSTER_NAME")
    if inside:
        return inside
    program = shutil.which("scontrol")
    if program is None:
        return None
    key = (program, os.environ.get("SLURM_CONF"))
    if key not in _CLUSTERS:
        try:
            result = _call([program, "show", "config"])
        except ForgeError:  # no answer in time: not known, and not kept (it may answer later)
            return None
        found = None
        if result.returncode == 0:
            for line in result.stdout.splitlines():
                name, sep, value = line.partition("=")
                if sep and name.strip() == "ClusterName":
                    found = value.strip() or None
                    break
        if found is None:
            return None
        _CLUSTERS[key] = found
    return _CLUSTERS[key]


def another_cluster(recorded: str | None) -> bool:
    """Whether a job recorded as submitted to the cluster `recorded` is another cluster's than
    this machine's: job ids are a cluster's own (two clusters that mount one storage root each
    have a job 12345), so this SLURM cannot answer for it, nor cancel it. Not recorded (before
    records said so) or not known here: False."""
    return bool(recorded) and cluster_name() not in (None, recorded)


def cancel(job_ids: list[str]) -> None:
    if not job_ids:
        return
    program = require("scancel")
    result = _call([program, *job_ids])
    if result.returncode:
        raise ForgeError(f"scancel failed: {(result.stderr or result.stdout).strip()}",
                         fix="check the jobs with `squeue --me`; `scancel JOBID` cancels one")
