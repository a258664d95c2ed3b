"""A demo-sized job as a user runs it (issue #20: under 60 s wall on one GPU, loading and
caching included): `loraforge init --tiny`'s project with the demo's sample dataset, trained at
`resolution` for `steps` steps by `loraforge train` in a process of its own. The wall time runs
from starting the command to its exit: importing the libraries, loading the model, caching,
training, the epoch files and the final file."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

#: What #20 asks of the whole job, in seconds.
TARGET_WALL_S = 60.0


@dataclass
class JobResult:
    resolution: int
    steps: int
    wall_s: float
    #: The wall time outside the steady steps: imports, loading, caching, the first step,
    #: saving the final file. (Each epoch's file and report fall between steps: they count in
    #: `steps_per_s`, as in the job a user runs.)
    overhead_s: float
    steps_per_s: float
    #: False when the job was stopped at its time limit (`steps` is how far it got).
    finished: bool = True


def prepare(work: Path) -> Path:
    """The demo's project (tiny model built, sample dataset written) under `work`; returns its
    forge.toml. Building the tiny model is not part of the job: the demo does it once."""
    from loraforge.config import CONFIG_NAME, load_settings
    from loraforge.dataset.sample import write_sample_dataset
    from loraforge.models.tiny import ensure_tiny_models
    from loraforge.project import init_project

    project = work / "job"
    init_project(project, tiny=True)
    settings = load_settings(project / CONFIG_NAME)
    ensure_tiny_models(settings.storage_root)
    write_sample_dataset(settings.dataset_dir)
    return project / CONFIG_NAME


def run_job(config: Path, resolution: int, steps: int, timeout: float) -> JobResult:
    """`loraforge train` on `config` at `resolution` for `steps` steps (a fresh run), timed;
    stopped after `timeout` seconds as SLURM stops a job (SIGTERM: the trainer saves its state
    and exits), and then the result says how far it got."""
    from loraforge.config import load_settings
    from loraforge.train.journal import HISTORY
    from loraforge.train.signals import RESUMABLE_EXIT

    run = f"job-{resolution}-{steps}"
    command = [sys.executable, "-m", "loraforge", "train", "--config", str(config), "--run",
               run, "--restart", "--set", f"dataset.resolution={resolution}",
               "--set", f"train.max_steps={steps}"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            _, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
    wall = time.perf_counter() - started
    finished = process.returncode == 0
    if not finished and process.returncode != RESUMABLE_EXIT:
        raise RuntimeError(f"`{' '.join(command)}` failed:\n{err[-3000:]}")
    history = load_settings(config).runs_dir / run / HISTORY
    lines = history.read_text().splitlines() if history.is_file() else []
    if finished and len(lines) < steps:
        raise RuntimeError(f"the job finished but {history} holds {len(lines)} steps")
    seconds = [json.loads(line)["seconds"] for line in lines] or [0.0]
    # `seconds` counts from the journal's start (after loading and caching); the first entry
    # is the first step, read alone.
    steady = len(seconds) - 1
    rate = steady / (seconds[-1] - seconds[0]) if steady and seconds[-1] > seconds[0] else 0.0
    return JobResult(resolution, len(lines), wall, wall - (seconds[-1] - seconds[0]), rate,
                     finished)
