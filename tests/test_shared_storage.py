"""Several projects on one storage root (a lab's): each run records the project that trained it,
and the commands that take a run when none is named (`generate`, `eval`) take this project's,
never another project's unnamed. Real runs, trained by `loraforge train` on the tiny model."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import assert_user_error, run_cli, write_training_project

GENERATE = "[generate]\nwidth = 96\nheight = 96\nsteps = 1\ncount = 1\n"


@dataclass
class Lab:
    storage: Path
    mine: Path
    theirs: Path
    new: Path  # a project without runs of its own

    def run_dir(self, name: str) -> Path:
        return self.storage / "Multi_Concept_Output" / name


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, tiny_store: Path) -> Lab:
    """Two projects train one run each on the lab's storage root: `mine_run`, then
    `their_run` (the root's newest); a third project has none."""
    base = tmp_path_factory.mktemp("lab")
    storage = base / "lab_storage"
    folders = {}
    for name in ("mine", "theirs", "new"):
        config = write_training_project(base / name, tiny_store, {"max_steps": 1})
        config.write_text(config.read_text().replace('root = "store"', f'root = "{storage}"')
                          + GENERATE)
        folders[name] = base / name
    shutil.rmtree(folders["new"] / "master_dataset")
    for name, run in (("mine", "mine_run"), ("theirs", "their_run")):
        done = run_cli("train", "--run", run, cwd=folders[name])
        assert done.returncode == 0, done.stdout + done.stderr
    return Lab(storage, folders["mine"], folders["theirs"], folders["new"])


def _record(lab: Lab, run: str) -> dict[str, object]:
    return json.loads((lab.run_dir(run) / "run.json").read_text())


def test_a_run_records_the_project_that_trained_it(lab: Lab) -> None:
    assert _record(lab, "mine_run")["project"] == str(lab.mine)
    assert _record(lab, "their_run")["project"] == str(lab.theirs)


def test_without_a_run_named_another_projects_run_is_refused_and_named(lab: Lab) -> None:
    """`generate` in a project without runs rendered with the storage root's newest run: a
    colleague's LoRA, and nothing said so; `eval` measured it."""
    images = set(lab.storage.glob("Final_Images/*.png"))
    result = run_cli("generate", cwd=lab.new)
    assert_user_error(result, "no LoRA given", f"no finished training run of this project "
                      f"({lab.new})", "`their_run`, is another project's", str(lab.theirs),
                      "name it: `--lora their_run`")
    assert set(lab.storage.glob("Final_Images/*.png")) == images
    result = run_cli("eval", cwd=lab.new)
    assert_user_error(result, "`their_run`, is another project's", str(lab.theirs),
                      "name it: `loraforge eval their_run`")
    assert not (lab.run_dir("their_run") / "separation.json").exists()
    # a scene casting one of their characters: unknown here, and the message says why (the
    # refusal was swallowed by the character lookup, as if no run knew the character)
    (lab.new / "scenes.toml").write_text('[[scene]]\nname = "yard"\nprompt = "yard"\n'
                                         'pose = "random"\n[[scene.figure]]\n'
                                         'character = "red_knight"\n')
    result = run_cli("generate", "--scenes", "scenes.toml", cwd=lab.new)
    assert_user_error(result, "unknown character `red_knight`",
                      "`their_run`, is another project's", "name a concept of the scene's LoRA")
    assert set(lab.storage.glob("Final_Images/*.png")) == images


def test_generate_and_eval_take_this_projects_run_though_another_projects_is_newer(
        lab: Lab) -> None:
    assert _record(lab, "their_run")["finished_at"] > _record(lab, "mine_run")["finished_at"]
    result = run_cli("generate", cwd=lab.mine)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("note: no LoRA named: using run `mine_run`, this project's newest finished run"
            in result.stdout), result.stdout
    assert f"LoRA {lab.run_dir('mine_run') / 'mine_run.safetensors'} (weight" in result.stdout
    assert "their_run" not in result.stdout
    result = run_cli("eval", "--json", cwd=lab.mine)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["run"] == "mine_run"
    assert "measuring run `mine_run`, this project's newest finished run" in result.stderr
    assert (lab.run_dir("mine_run") / "separation.json").is_file()


def test_a_run_recorded_before_runs_named_their_project_is_taken_and_said_so(
        lab: Lab, tmp_path: Path) -> None:
    """A run.json from before the field: its run may be this project's, as it always was
    taken; the note says which run it is, and that its project is not known."""
    old = tmp_path / "old_storage" / "Multi_Concept_Output" / "their_run"
    shutil.copytree(lab.run_dir("their_run"), old)
    record = json.loads((old / "run.json").read_text())
    record.pop("project", None)
    (old / "run.json").write_text(json.dumps(record))
    result = run_cli("generate", "--set", f"storage.root={tmp_path / 'old_storage'}",
                     cwd=lab.new)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "note: no LoRA named: using run `their_run`" in result.stdout
    assert "its run.json names no project" in result.stdout
    assert f"LoRA {old / 'their_run.safetensors'} (weight" in result.stdout


def test_runs_marks_the_runs_of_other_projects(lab: Lab) -> None:
    result = run_cli("runs", "--json", cwd=lab.mine)
    assert result.returncode == 0, result.stderr
    assert {row["name"]: row["project"] for row in json.loads(result.stdout)} == {
        "mine_run": str(lab.mine), "their_run": str(lab.theirs)}
    result = run_cli("runs", cwd=lab.mine, env={"COLUMNS": "200"})
    rows = {line.split()[1]: line for line in result.stdout.splitlines()
            if line.startswith("│")}
    assert f"another project's ({lab.theirs})" in rows["their_run"], result.stdout
    assert "another project's" not in rows["mine_run"]


def _files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file()}


def test_training_another_projects_run_is_refused_and_leaves_it_whole(lab: Lab) -> None:
    """Two projects that keep one run name (the default) on a lab's storage root: the second
    was told to pass --restart, which deleted the first project's LoRA and trained over it."""
    before = _files(lab.run_dir("mine_run"))
    for extra in ([], ["--restart"]):
        result = run_cli("train", "--run", "mine_run", *extra, cwd=lab.theirs)
        assert_user_error(result, "run `mine_run` is another project's", str(lab.mine),
                          "--run NAME, or train.run_name in forge.toml")
        assert _files(lab.run_dir("mine_run")) == before
    result = run_cli("slurm", "train", "--run", "mine_run", cwd=lab.theirs)
    assert_user_error(result, "run `mine_run` is another project's", "nothing was submitted")
    result = run_cli("slurm", "train", "--run", "mine_run", "--dry-run", cwd=lab.theirs)
    assert "# note: this job would fail: " in result.stdout, result.stdout
    assert "run `mine_run` is another project's" in result.stdout


def test_a_run_of_this_project_from_before_it_moved_goes_on(lab: Lab) -> None:
    """A project folder moved (or reached by another path): the folder its runs record is gone,
    and its finished run is handed back as before."""
    moved = lab.run_dir("moved_run")
    shutil.copytree(lab.run_dir("mine_run"), moved)
    for old in moved.glob("mine_run*.safetensors"):
        old.rename(moved / old.name.replace("mine_run", "moved_run"))
    record = json.loads((moved / "run.json").read_text())
    record["project"] = str(lab.mine.parent / "mine_before_it_moved")
    (moved / "run.json").write_text(json.dumps(record))
    result = run_cli("train", "--run", "moved_run", cwd=lab.mine)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "run `moved_run` had already finished" in result.stderr
    result = run_cli("runs", cwd=lab.mine, env={"COLUMNS": "200"})  # nor does its listing
    assert "mine_before_it_moved" not in result.stdout, result.stdout


def test_this_project_reached_by_another_path_is_still_this_project(lab: Lab,
                                                                     tmp_path: Path) -> None:
    """A bind mount (an automounter's /gpfs/home/u beside /home/u): the same project folder by
    a second path was refused its own runs, and told to move its own folder away."""
    view = tmp_path / "view"
    view.mkdir()
    done = subprocess.run(["mount", "--bind", str(lab.mine.parent), str(view)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"a bind mount is not permitted here: {done.stderr.strip()}")
    try:
        result = run_cli("train", "--run", "mine_run", cwd=view / "mine")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "run `mine_run` had already finished" in result.stderr
        result = run_cli("generate", cwd=view / "mine")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "using run `mine_run`, this project's newest finished run" in result.stdout
    finally:
        subprocess.run(["umount", "-l", str(view)], capture_output=True)


def test_a_copied_project_holding_its_own_runs_keeps_them(lab: Lab, tmp_path: Path) -> None:
    """`cp -a` of a project whose storage is its own folder (`storage.root = "."`, as init
    writes it), or of a demo: its runs record the original's folder, but they lie in the copy,
    and no other project's work is at stake there."""
    original = tmp_path / "original"
    shutil.copytree(lab.mine, original, ignore=shutil.ignore_patterns("store"))
    config = original / "forge.toml"
    config.write_text(config.read_text().replace(f'root = "{lab.storage}"', 'root = "."'))
    runs = original / "Multi_Concept_Output"
    shutil.copytree(lab.run_dir("mine_run"), runs / "mine_run")
    record = json.loads((runs / "mine_run" / "run.json").read_text())
    record["project"] = str(original)
    record["config"]["storage"]["root"] = "."
    (runs / "mine_run" / "run.json").write_text(json.dumps(record))
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    result = run_cli("generate", cwd=copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"LoRA {copy / 'Multi_Concept_Output' / 'mine_run' / 'mine_run.safetensors'}" \
        in result.stdout
    result = run_cli("runs", cwd=copy, env={"COLUMNS": "200"})
    assert "mine_run" in result.stdout and "another project's" not in result.stdout


def test_a_sweep_whose_second_run_is_another_projects_is_refused_before_submitting(
        lab: Lab) -> None:
    """A sweep's runs that share their dataset and models were checked once, by the first:
    whether another project's run among the others was caught hung on the order of values."""
    shutil.copytree(lab.run_dir("mine_run"), lab.run_dir("sw-unet_lr0.002"))
    try:
        result = run_cli("slurm", "sweep", "--run", "sw", "--param",
                         "train.unet_lr=0.001,0.002", cwd=lab.theirs)
        assert_user_error(result, "run `sw-unet_lr0.002` is another project's", str(lab.mine),
                          "nothing was submitted")
        result = run_cli("slurm", "sweep", "--run", "sw", "--param",
                         "train.unet_lr=0.001,0.002", "--dry-run", cwd=lab.theirs)
        assert "# note: this job would fail: " in result.stdout
        assert "run `sw-unet_lr0.002` is another project's" in result.stdout
    finally:  # the other tests' lab has two finished runs
        shutil.rmtree(lab.run_dir("sw-unet_lr0.002"))
