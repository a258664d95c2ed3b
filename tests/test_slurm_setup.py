"""`make test` without root: the SLURM cluster tests are reported as not run, with how to run
them, never as passed or as errors (tests/setup_slurm.sh, tests/slurm_cluster.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
PROGRAMS = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo", "munged",
            "munge", "unmunge")


def _as_a_user(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run ARGS as an unprivileged user: `nobody` when the tests run as root."""
    command = [str(a) for a in args]
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("needs runuser (util-linux) to run a command as `nobody`")
        command = ["runuser", "-u", "nobody", "--", *command]
    return subprocess.run(command, cwd=HERE.parent, capture_output=True, text=True, timeout=60)


def test_cluster_tests_are_reported_not_run_without_root(tmp_path: Path) -> None:
    # A real run as `nobody` cannot start this Python when it lives in root's home (0700), as
    # here: the pytest run below only believes it is not root (os.geteuid).
    (tmp_path / "not_root.py").write_text("import os\nos.geteuid = lambda: 65534\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "not_root", "-q", "-rs",
                             "-p", "no:cacheprovider", "tests/test_slurm_cluster.py"],
                            cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=120)
    text = result.stdout + result.stderr
    assert result.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, text  # the module is skipped
    assert "1 skipped" in text and "passed" not in text and "error" not in text.lower(), text
    assert "SLURM cluster tests not run: slurmd and munged must run as root; run them with " \
           "`sudo make test`" in text


def test_setup_script_without_root_installs_nothing_and_says_so() -> None:
    result = _as_a_user(HERE / "setup_slurm.sh")
    assert result.returncode == 0, result.stderr
    installed = all(shutil.which(p) or Path("/usr/sbin", p).exists() for p in PROGRAMS)
    if installed:
        assert result.stdout == ""
    else:
        assert "missing and not root: the SLURM cluster tests will be skipped (run `sudo make " \
               "test`" in result.stdout
        assert len(result.stdout.splitlines()) == 1
