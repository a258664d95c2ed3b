"""setup_forge.sh's pip output: quiet, but never hiding a real problem.

A machine whose pip config lists a file:// index that lacks some projects (as this one does)
makes pip print `WARNING: Location 'file:...' is ignored` for each of them: dozens of lines in
`make demo`. Here a real pip resolves a real (tiny) wheel from a file:// index while a second
configured file:// index lacks it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

SETUP = Path(__file__).parent.parent / "setup_forge.sh"


def _index(root: Path) -> str:
    """A file:// simple index holding one project, forge-probe 1.0 (a minimal wheel)."""
    wheel = root / "files" / "forge_probe-1.0-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("forge_probe/__init__.py", "")
        info = "forge_probe-1.0.dist-info"
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: forge-probe\nVersion: 1.0\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                                     "Root-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    project = root / "simple" / "forge-probe"
    project.mkdir(parents=True)
    (project / "index.html").write_text(f'<a href="{wheel.as_uri()}">{wheel.name}</a>\n')
    return (root / "simple").as_uri()


def _pip_install(tmp_path: Path, index: str, project: str) -> subprocess.CompletedProcess[str]:
    """setup_forge.sh's pip_install, sourced: a dry run of `pip install PROJECT`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    # no pip config of this machine; and were the script to run instead of being sourced, it
    # would stop at once (no Python to make an environment with), touching nothing
    env.update(PIP_CONFIG_FILE=os.devnull, LORA_ENV=str(tmp_path / "no-env"), PYTHON="false")
    missing = (tmp_path / "empty").as_uri()
    script = ('source "$1" && pip_install "$2" "$3" --dry-run --no-deps --index-url "$4" '
              '--extra-index-url "$5" "$6"')
    return subprocess.run(["bash", "-c", script, "bash", str(SETUP), sys.executable,
                           str(tmp_path / "pip.log"), index, missing, project],
                          env=env, capture_output=True, text=True, timeout=120)


def test_index_misses_are_kept_out_of_the_output_but_in_the_log(tmp_path: Path) -> None:
    result = _pip_install(tmp_path, _index(tmp_path), "forge-probe")
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""
    log = (tmp_path / "pip.log").read_text()
    assert "WARNING: Location 'file:" in log and "/empty/forge-probe/' is ignored" in log
    assert not (tmp_path / "no-env").exists()


def test_a_failing_pip_shows_everything(tmp_path: Path) -> None:
    result = _pip_install(tmp_path, _index(tmp_path), "forge-nothing")
    assert result.returncode == 1
    assert "No matching distribution found for forge-nothing" in result.stderr
    assert "WARNING: Location 'file:" in result.stderr  # shown when pip fails: maybe the cause
