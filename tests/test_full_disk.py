"""A full disk (ENOSPC) under `train`, `report`, `eval` and `init`, on a real small tmpfs: one
message naming the file being written, that the disk is full and to free space, and what is kept;
never the catch-all's "check that this path is a folder or a file" with no file named."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import assert_user_error, fill_disk, run_cli, write_training_project

FULL = "No space left on device (the disk, or your quota on it, is full)"
CATCH_ALL = "check that this path is what it should be"


def test_init_onto_a_full_disk_names_the_file(small_disk: Callable[[str], Path],
                                               tmp_path: Path) -> None:
    disk = small_disk("1m")
    fill_disk(disk)
    result = run_cli("init", disk / "project", cwd=tmp_path)
    assert_user_error(result, f"{disk / 'project' / 'forge.toml'}: could not be written", FULL,
                      "free space", "left as it was")
    assert CATCH_ALL not in result.stderr
    assert not (disk / "project" / "forge.toml").exists()
    assert not [p.name for p in (disk / "project").iterdir() if p.name.endswith(".tmp")]


def test_report_and_eval_onto_a_full_disk_name_their_file_and_keep_the_old_one(
        small_disk: Callable[[str], Path], tiny_store: Path, tmp_path: Path) -> None:
    disk = small_disk("4m")
    config = write_training_project(tmp_path / "project", tiny_store,
                                    {"epochs": 1, "max_steps": 2})
    where = ["--config", config, "--set", f"storage.root={disk / 'store'}"]
    trained = run_cli("train", *where)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    run_dir = disk / "store" / "Multi_Concept_Output" / "multi_concept"
    report = (run_dir / "report.html").read_bytes()
    fill_disk(disk)

    result = run_cli("report", "multi_concept", *where)
    assert_user_error(result, f"{run_dir}/report", ": could not be written", FULL, "free space",
                      "left as it was")
    assert CATCH_ALL not in result.stderr
    assert (run_dir / "report.html").read_bytes() == report

    result = run_cli("eval", *where)
    assert_user_error(result, f"{run_dir / 'separation.json'}: could not be written", FULL,
                      "free space")
    assert CATCH_ALL not in result.stderr
    assert not (run_dir / "separation.json").exists()
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_a_save_on_a_full_disk_is_the_error_told_not_the_record_that_could_not_follow(
        small_disk: Callable[[str], Path], tiny_store: Path, tmp_path: Path) -> None:
    """The final LoRA could not be written, then neither could run.json marked failed: that
    second OSError hid the first message (the catch-all: "No space left on device", no file
    named), and `runs` said the run had been killed (out of memory)."""
    disk = small_disk("4m")
    config = write_training_project(tmp_path / "project", tiny_store,
                                    {"epochs": 1, "batch_size": 1, "max_steps": 3})
    where = ["--config", str(config), "--set", f"storage.root={disk / 'store'}"]
    process = subprocess.Popen([sys.executable, "-m", "loraforge", "train", *where],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("step 2/3"):  # the disk fills up before the last step
            process.send_signal(signal.SIGSTOP)
            fill_disk(disk)
            process.send_signal(signal.SIGCONT)
            break
    out, err = process.communicate(timeout=300)
    run_dir = disk / "store" / "Multi_Concept_Output" / "multi_concept"
    final = run_dir / "multi_concept.safetensors"
    assert process.returncode == 1, out + err
    assert "Traceback" not in err, err
    assert f"error: {final}: could not write multi_concept.safetensors: No space left" in err
    assert "free space" in err and "training starts over from step 0 (no state" in err
    assert CATCH_ALL not in err
    assert f"{run_dir / 'run.json'} not updated" in err  # a warning
    assert not final.exists()

    (row,) = json.loads(run_cli("runs", "--json", *where).stdout)
    assert row["status"] == "stopped"
    assert "ended without updating its record" in row["error"]
    assert "its disk was full" in row["error"]
    assert "trains it from the start (no state was saved yet)" in row["error"]
    assert "without a word" not in row["error"]
