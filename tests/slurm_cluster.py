"""A real two-node SLURM cluster on this machine, for the tests of `loraforge slurm`.

Debian's slurmctld + two slurmd daemons (nodes n1 and n2, both on this host, as in
shared/reference/slurm-local.md) + munge: partitions `c3_accel` (the seed's) and `debug`, four
fake GPUs per node, a fast scheduler, everything under a temporary folder, private ports.
Started once per test session, stopped cleanly at the end (jobs cancelled, daemons killed by the
pids in their pid files).

Use it by importing the fixture into a test module:

    from slurm_cluster import slurm_cluster  # noqa: F401
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loraforge.scheduler import TERMINAL_STATES, parse_records

PROGRAMS = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo", "munged",
            "munge", "unmunge")
MUNGE_PID = Path("/run/munge/munged.pid")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _consecutive_free_ports() -> list[int]:
    """slurmctld's port, then two consecutive ones for the nodes (a node range takes a port
    range)."""
    for _ in range(50):
        first, second = _free_ports(2)
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", second))
                b.bind(("127.0.0.1", second + 1))
            except OSError:
                continue
        if second + 1 != first:
            return [first, second, second + 1]
    raise RuntimeError("no two consecutive free ports for the test cluster's nodes")


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 30,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): "
                           f"{result.stdout}{result.stderr}")
    return result


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop_pid(path: Path, timeout: float = 15) -> None:
    pid = _read_pid(path)
    if pid is None or not _pid_alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


@dataclass
class Cluster:
    """A running cluster: its config file, the environment that reaches it, helpers to poll jobs."""

    root: Path
    conf: Path
    env: dict[str, str]
    started_munge: bool = False
    pid_files: list[Path] = field(default_factory=list)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o ID` as a dict (the first record; {} when unknown)."""
        result = _run("scontrol", "show", "job", "-o", job_id, env=self.env, check=False)
        records = parse_records(result.stdout)
        return records[0] if records else {}

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """Every record of a job (one per array task)."""
        result = _run("scontrol", "show", "job", "-o", job_id, env=self.env, check=False)
        return parse_records(result.stdout)

    def wait(self, job_id: str, timeout: float = 300, states: frozenset[str] = TERMINAL_STATES,
             ) -> dict[str, str]:
        """Poll until the job (every task of an array) is in one of `states`; return its record."""
        deadline = time.monotonic() + timeout
        records: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            records = self.jobs(job_id)
            if records and all(r.get("JobState") in states for r in records):
                return records[0]
            time.sleep(1)
        seen = [(r.get("JobId"), r.get("JobState"), r.get("Reason")) for r in records]
        raise AssertionError(f"job {job_id} not in {sorted(states)} after {timeout:.0f} s: {seen}")

    def wait_all(self, job_id: str, timeout: float = 300) -> list[dict[str, str]]:
        self.wait(job_id, timeout)
        return self.jobs(job_id)

    def log(self, name: str) -> str:
        return (self.root / "log" / name).read_text(errors="replace")


NODES = ("n1", "n2")


def _write_config(root: Path, host: str, ports: list[int]) -> Path:
    """`ports`: slurmctld's, then one per node."""
    for sub in ("state", "spool", "log", "run", "gpu"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    gpus = []
    for i in range(4):
        gpu = root / "gpu" / f"gpu{i}"
        if not gpu.is_symlink():
            gpu.symlink_to("/dev/null")
        gpus.append(gpu)
    (root / "gres.conf").write_text(
        "AutoDetect=off\n"
        f"NodeName=n[1-2] Name=gpu File={root / 'gpu'}/gpu[0-3]\n")
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=loraforge-test",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ports[0]}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        "AuthInfo=cred_expire=10",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}/%n",
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'run' / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "ProctrackType=proctrack/pgid",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "SlurmdParameters=config_overrides",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,"
        "bf_interval=2",
        "MinJobAge=3600",
        "KillWait=5",
        "ReturnToService=2",
        "DefMemPerCPU=500",
        "GresTypes=gpu",
        f"NodeName=n[1-2] NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[1]}-{ports[2]} "
        "CPUs=32 RealMemory=256000 Gres=gpu:4 State=UNKNOWN",
        "PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP",
        "PartitionName=c3_accel Nodes=n[1-2] MaxTime=INFINITE State=UP",
        "",
    ]))
    return conf


def _ensure_munge(env: dict[str, str]) -> bool:
    """Make `munge -n | unmunge` work; returns True when this call started munged."""
    def works() -> bool:
        made = subprocess.run(["munge", "-n"], capture_output=True, env=env, timeout=10)
        if made.returncode:
            return False
        checked = subprocess.run(["unmunge"], input=made.stdout, capture_output=True, env=env,
                                 timeout=10)
        return checked.returncode == 0

    if works():
        return False
    for folder in (Path("/run/munge"), Path("/var/log/munge"), Path("/var/lib/munge")):
        folder.mkdir(parents=True, exist_ok=True)
        shutil.chown(folder, "munge", "munge")
    key = Path("/etc/munge/munge.key")
    if not key.is_file():
        _run("runuser", "-u", "munge", "--", "/usr/sbin/mungekey", "--create", env=env)
    _run("runuser", "-u", "munge", "--", "/usr/sbin/munged", env=env)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if works():
            return True
        time.sleep(0.2)
    raise RuntimeError("munged started but `munge -n | unmunge` still fails")


def missing_requirements() -> str | None:
    """Why the cluster cannot start on this machine (None: it can): the one line a skipped test
    reports, saying how to run the cluster tests."""
    if os.geteuid() != 0:
        return ("SLURM cluster tests not run: slurmd and munged must run as root; run them with "
                "`sudo make test`")
    missing = [p for p in PROGRAMS if shutil.which(p) is None
               and not Path("/usr/sbin", p).exists()]
    if missing:
        return (f"SLURM cluster tests not run: {', '.join(missing)} missing; `make test` as "
                "root installs them (tests/setup_slurm.sh, apt)")
    return None


def start_cluster(root: Path) -> Cluster:
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    host = socket.gethostname().split(".")[0]
    if subprocess.run(["getent", "hosts", host], capture_output=True).returncode:
        with open("/etc/hosts", "a") as hosts:
            hosts.write(f"127.0.0.1 {host}\n")
    conf = _write_config(root, host, _consecutive_free_ports())
    env = {**os.environ, "SLURM_CONF": str(conf)}
    env["PATH"] = f"{env.get('PATH', '')}:/usr/sbin"
    cluster = Cluster(root, conf, env)
    cluster.started_munge = _ensure_munge(env)
    cluster.pid_files = [root / "run" / "slurmctld.pid",
                         *(root / "run" / f"slurmd-{node}.pid" for node in NODES)]
    _run("slurmctld", "-i", env=env)
    for node in NODES:
        (root / "spool" / node).mkdir(parents=True, exist_ok=True)
        _run("slurmd", "-N", node, env=env)
    deadline = time.monotonic() + 30
    state = ""
    while time.monotonic() < deadline:
        state = _run("sinfo", "-h", "-o", "%T", env=env, check=False).stdout.strip()
        if state and all(s.startswith("idle") for s in state.split()):
            return cluster
        time.sleep(0.3)
    stop_cluster(cluster)
    pytest.fail(f"the test SLURM cluster did not come up (sinfo: {state!r}); logs in "
                f"{root / 'log'}", pytrace=False)


def stop_cluster(cluster: Cluster) -> None:
    """Cancel every job, wait for them to go, then stop the daemons this fixture started."""
    env = cluster.env
    _run("scancel", "--user", "root", env=env, check=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = _run("squeue", "-h", "-o", "%i %T", env=env, check=False)
        if left.returncode or not left.stdout.strip():
            break
        time.sleep(0.5)
    for pid_file in reversed(cluster.pid_files):
        _stop_pid(pid_file)
    if cluster.started_munge:
        _stop_pid(MUNGE_PID)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A two-node SLURM cluster; SLURM_CONF points every client command of this process at it."""
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(cluster.conf))
        patch.setenv("PATH", cluster.env["PATH"])
        try:
            yield cluster
        finally:
            stop_cluster(cluster)
