"""`loraforge demo DIR` runs the whole journey in DIR, and leaves a user's project alone: it
refuses a folder that is not its own before writing anything."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from conftest import assert_user_error, run_cli

from loraforge.errors import RESUMABLE_EXIT


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_demo_refuses_a_project_that_does_not_use_the_tiny_model(tmp_path: Path) -> None:
    assert run_cli("init", tmp_path).returncode == 0
    (tmp_path / "master_dataset" / "5_alice").mkdir()
    before = _tree(tmp_path)
    result = run_cli("demo", tmp_path)
    assert_user_error(result, str(tmp_path), "does not use the tiny model",
                      "loraforge demo demo")
    assert _tree(tmp_path) == before
    assert not (tmp_path / "master_dataset" / "10_red_knight").exists()


def test_demo_refuses_a_tiny_project_with_concepts_of_its_own(tmp_path: Path) -> None:
    assert run_cli("init", tmp_path, "--tiny").returncode == 0
    (tmp_path / "master_dataset" / "3_bob").mkdir()
    (tmp_path / "master_dataset" / "3_bob" / "1.txt").write_text("bob")
    before = _tree(tmp_path)
    result = run_cli("demo", tmp_path)
    assert_user_error(result, "master_dataset", "3_bob", "folder of its own")
    assert _tree(tmp_path) == before


def test_demo_keeps_everything_in_its_folder_though_a_storage_root_is_exported(
        tmp_path: Path) -> None:
    """The whole demo, as `make demo` runs it, by a user whose LORAFORGE_STORAGE_ROOT points
    at the lab's storage: the tiny model, the LoRA, the scene and the report go into the demo's
    folder; the lab's storage was its target (beside the user's own runs, where the tiny LoRA
    would be the newest one generate picks)."""
    lab = tmp_path / "lab"
    lab.mkdir()
    result = run_cli("demo", "demo", cwd=tmp_path, env={"LORAFORGE_STORAGE_ROOT": str(lab)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the demo leaves that storage alone" in result.stdout
    assert list(lab.iterdir()) == []
    run = tmp_path / "demo" / "Multi_Concept_Output" / "multi_concept"
    assert (run / "multi_concept.safetensors").is_file() and (run / "report.html").is_file()
    assert list((tmp_path / "demo" / "Final_Images").glob("*.png"))


def test_demo_interrupted_while_training_saves_and_says_to_rerun(tmp_path: Path) -> None:
    """Ctrl-C (or the job's SIGTERM) during `make demo` printed a traceback of `Interrupted`
    and exited 1, where `loraforge train` says the state is saved and exits 75."""
    process = subprocess.Popen([sys.executable, "-m", "loraforge", "demo", "demo"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if "multi_concept-000001.safetensors" in line:  # training, its first epoch saved
            process.send_signal(signal.SIGINT)
            break
    out, _ = process.communicate(timeout=300)
    text = "".join(seen) + out
    assert process.returncode == RESUMABLE_EXIT, text
    assert "Traceback" not in text
    assert "interrupted while training (state saved); rerun the same command" in text
    run = tmp_path / "demo" / "Multi_Concept_Output" / "multi_concept"
    assert list((run / "state").glob("step-*"))
