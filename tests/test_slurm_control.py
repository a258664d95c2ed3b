"""`loraforge slurm status|cancel|logs` and `loraforge runs` on a storage root shared by several
projects, run in this process against stand-in `scontrol` and `scancel` programs; and the run
names they and `train` take."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from loraforge.cli import main


def _main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
          *args: str) -> tuple[int, str, str]:
    """Run `loraforge ARGS` in this process; its exit code, stdout and stderr."""
    monkeypatch.setattr(sys, "argv", ["loraforge", *args])
    with pytest.raises(SystemExit) as stop:
        main()
    captured = capsys.readouterr()
    return stop.value.code or 0, captured.out, captured.err


def _lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lab_name: str = "lab",
         ) -> tuple[Path, Path]:
    """A lab storage root (tmp_path/`lab_name`) shared by two projects, `mine` and `theirs`;
    their jobs recorded in its jobs.json, `theirs` submitted last; every job running, as the
    stand-in `scontrol` says; `scancel` writes the ids it is given to tmp_path/cancelled.
    Returns the projects."""
    lab = tmp_path / lab_name
    projects = []
    for name, job_id in (("mine", "101"), ("theirs", "202")):
        project = tmp_path / name
        (project / "logs").mkdir(parents=True)
        (project / "forge.toml").write_text(f'[storage]\nroot = "{lab}"\n')
        (project / "logs" / f"train-{job_id}.out").write_text(f"log of {name}\n")
        projects.append(project)
    (lab / "jobs").mkdir(parents=True)
    (lab / "jobs" / "jobs.json").write_text(json.dumps({"jobs": [
        {"job_id": job_id, "kind": "train", "name": "train", "run": f"run_{name}",
         "submission": f"s{job_id}", "project": str(tmp_path / name), "depends_on": None,
         "log": str(tmp_path / name / "logs" / f"train-{job_id}.out")}
        for name, job_id in (("mine", "101"), ("theirs", "202"))]}))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, body in (("scontrol", 'echo "JobId=$4 JobName=train JobState=RUNNING"'),
                       ("scancel", f'echo "$@" >> {tmp_path / "cancelled"}')):
        (bin_dir / tool).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return projects[0], projects[1]


def test_without_a_job_named_the_commands_act_on_this_projects_jobs_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`slurm cancel` cancelled the storage root's newest submission: another project's job.
    `status` and `logs` showed other projects' jobs as this project's."""
    mine, _ = _lab(tmp_path, monkeypatch)
    monkeypatch.chdir(mine)
    code, out, err = _main(monkeypatch, capsys, "slurm", "cancel")
    assert code == 0 and out.strip() == "cancelled: 101", (out, err)
    assert (tmp_path / "cancelled").read_text().split() == ["101"]
    assert "202" in err and "another project's" in err and str(tmp_path / "theirs") in err
    code, out, err = _main(monkeypatch, capsys, "slurm", "status", "--json")
    assert code == 0 and [row["job_id"] for row in json.loads(out)] == ["101"]
    assert "another project's" in err
    code, out, err = _main(monkeypatch, capsys, "slurm", "logs")
    assert code == 0 and out == "log of mine\n", (out, err)
    # Named, another project's job is reached as before.
    code, out, _ = _main(monkeypatch, capsys, "slurm", "status", "202", "--json")
    assert code == 0 and [row["job_id"] for row in json.loads(out)] == ["202"]
    code, out, _ = _main(monkeypatch, capsys, "slurm", "logs", "run_theirs")
    assert code == 0 and out == "log of theirs\n"


def test_a_project_without_jobs_of_its_own_is_told_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _lab(tmp_path, monkeypatch)
    new = tmp_path / "new"
    new.mkdir()
    (new / "forge.toml").write_text(f'[storage]\nroot = "{tmp_path / "lab"}"\n')
    monkeypatch.chdir(new)
    code, out, err = _main(monkeypatch, capsys, "slurm", "cancel")
    assert code == 0 and "nothing to cancel" in out, (out, err)
    assert "no job of this project" in err and "other projects'" in err
    assert not (tmp_path / "cancelled").exists()
    code, out, _ = _main(monkeypatch, capsys, "slurm", "status")
    assert code == 0 and "no job of this project" in out and "202" not in out
    code, out, err = _main(monkeypatch, capsys, "slurm", "logs")
    assert code == 1 and out == "" and "no job of this project" in err
    assert "Traceback" not in err


def test_brackets_in_the_storage_path_or_a_record_are_shown_not_read_as_markup(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`lab[bold]y` lost its brackets from the titles; `lab[/bold]y`, or a run's error with a
    closing tag, stopped `slurm status` and `runs` with a MarkupError traceback."""
    mine, _ = _lab(tmp_path, monkeypatch, "a[bold]b[/bold]c[/bold]")
    monkeypatch.chdir(mine)
    code, out, err = _main(monkeypatch, capsys, "slurm", "status")
    assert code == 0, err
    assert "a[bold]b[/bold]c[/bold]/jobs/jobs.json" in "".join(out.split()), out
    runs = tmp_path / "a[bold]b[/bold]c[/bold]" / "Multi_Concept_Output"
    (runs / "r1").mkdir(parents=True)
    (runs / "r1" / "run.json").write_text(json.dumps({
        "name": "r1", "status": "failed", "error": "[/red] out of memory",
        "config": {"dataset": {"caption_prefix": "[i]"}}}))
    (runs / "r2").mkdir()
    (runs / "r2" / "run.json").write_text(json.dumps({
        "name": "r2", "status": "finished", "config": {"dataset": {"caption_prefix": ""}}}))
    code, out, err = _main(monkeypatch, capsys, "runs")
    assert code == 0, err
    assert "[/red] out of memory" in out and "[i]" in out
    assert "a[bold]b[/bold]c[/bold]/Multi_Concept_Output" in "".join(out.split()), out


def test_a_run_name_too_long_is_refused_naming_the_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A name over 100 characters, or a sweep's name grown past it from its values, was
    refused with "use letters, digits, ...", which it already was."""
    from loraforge.errors import ForgeError
    from loraforge.runs import check_run_name

    assert check_run_name("a" * 100) == "a" * 100
    with pytest.raises(ForgeError, match="is 101 characters long: a run name has at most 100"):
        check_run_name("a" * 101)
    monkeypatch.chdir(tmp_path)
    code, out, err = _main(monkeypatch, capsys, "slurm", "sweep", "--dry-run", "--run", "a" * 90,
                           "--param", "train.network_dim=8,16")
    assert code == 1 and "Traceback" not in err, (out, err)
    assert "-network_dim8` is 103 characters long: a run name has at most 100" in err


def test_an_empty_run_name_is_refused_not_taken_for_the_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`--run ""` (a job script's `--run "$NAME"` with NAME unset) meant train.run_name: it
    resumed the default run, and a job giving up marked that run failed."""
    default = tmp_path / "Multi_Concept_Output" / "multi_concept"
    default.mkdir(parents=True)
    record = json.dumps({"name": "multi_concept", "status": "interrupted"})
    (default / "run.json").write_text(record)
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(monkeypatch, capsys, "train", "--run", "")
    assert code == 1 and "the run name is empty" in err, err
    assert "leave --run out for train.run_name" in err
    for command in (["slurm", "mark-failed", "--run", "", "--reason", "requeued too often"],
                    ["slurm", "sweep", "--dry-run", "--run", "", "--param", "train.seed=1,2"],
                    ["slurm", "train", "--dry-run", "--run", ""]):
        code, out, err = _main(monkeypatch, capsys, *command)
        assert code == 1 and "the run name is empty" in err and "Traceback" not in err, out
        assert "multi_concept" not in out  # no script for the default run shown either
    assert (default / "run.json").read_text() == record


def test_a_run_json_without_settings_leaves_the_runs_table_readable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """One run.json without a config table (as `slurm mark-failed` writes for a run that never
    started, or a foreign one) made every setting "differ": ~70 empty columns, and every key
    in each run's params of --json."""
    runs = tmp_path / "Multi_Concept_Output"
    for name, lr in (("a", 1e-4), ("b", 5e-4)):
        (runs / name).mkdir(parents=True)
        (runs / name / "run.json").write_text(json.dumps({"name": name, "status": "finished",
            "config": {"train": {"unet_lr": lr, "epochs": 2, "seed": 1},
                       "dataset": {"resolution": 512}}}))
    for name, record in (("gave_up", {"name": "gave_up", "status": "failed",
                                      "error": "requeued too often"}),
                         ("foreign", {"name": "foreign"})):
        (runs / name).mkdir()
        (runs / name / "run.json").write_text(json.dumps(record))
    monkeypatch.chdir(tmp_path)
    code, out, err = _main(monkeypatch, capsys, "runs", "--json")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert {name: r["params"] for name, r in rows.items()} == {
        "a": {"train.unet_lr": 1e-4}, "b": {"train.unet_lr": 5e-4},
        "gave_up": {"train.unet_lr": None}, "foreign": {"train.unet_lr": None}}
    assert {name: r["lacks"] for name, r in rows.items()} == {
        "a": [], "b": [], "gave_up": ["settings"], "foreign": ["status", "settings"]}
    code, out, err = _main(monkeypatch, capsys, "runs")
    assert code == 0 and "unet_lr" in out and "epochs" not in out, out
    (gave_up,) = [line for line in out.splitlines() if line.startswith("│ gave_up")]
    assert "│ ?" in gave_up and "run.json records no settings; requeued too often" in gave_up
    assert "run.json records no status and no settings" in out


def test_a_run_killed_on_its_node_reads_stopped_in_runs_the_report_and_eval(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A run recorded as running on another node whose SLURM job is gone (killed without a
    word): `runs` said stopped, but its report said running and eval "has not finished
    (status: running)"."""
    mine, _ = _lab(tmp_path, monkeypatch)
    (tmp_path / "bin" / "scontrol").write_text(
        '#!/bin/sh\necho "slurm_load_jobs error: Invalid job id specified" >&2\nexit 1\n')
    run_dir = tmp_path / "lab" / "Multi_Concept_Output" / "killed"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({
        "name": "killed", "status": "running", "step": 70, "total_steps": 140,
        "process_hosts": ["gpu-node-17"], "pid": 4242, "slurm": {"job_id": "98765"},
        "config": {"train": {"unet_lr": 1e-4}}}))
    monkeypatch.chdir(mine)
    code, out, err = _main(monkeypatch, capsys, "runs", "--json")
    assert code == 0 and json.loads(out)[0]["status"] == "stopped", (out, err)
    code, out, err = _main(monkeypatch, capsys, "report", "killed")
    assert code == 0, err
    page = (run_dir / "report.html").read_text()
    assert "stopped" in page and ">running<" not in page
    code, out, err = _main(monkeypatch, capsys, "eval", "killed")
    assert code == 1 and "status: stopped" in err, err


def test_a_run_training_on_another_cluster_is_not_read_stopped_from_this_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Two clusters mounting one storage root: a run training in job 101 of cluster `alpha`,
    looked at from cluster `beta` (whose scontrol knows no job 101), read "stopped", and `runs`
    advised training it again beside its live trainer. Its own cluster still tells."""
    mine, _ = _lab(tmp_path, monkeypatch)
    (tmp_path / "bin" / "scontrol").write_text(
        '#!/bin/sh\nif [ "$2" = config ]; then echo "ClusterName             = beta"; exit 0; fi\n'
        'echo "slurm_load_jobs error: Invalid job id specified" >&2\nexit 1\n')
    runs = tmp_path / "lab" / "Multi_Concept_Output"
    for name, cluster in (("run_mine", "alpha"), ("here", "beta"), ("old", None)):
        (runs / name).mkdir(parents=True)
        slurm = {"job_id": "101", **({"cluster": cluster} if cluster else {})}
        (runs / name / "run.json").write_text(json.dumps({
            "name": name, "status": "running", "step": 70, "total_steps": 140,
            "process_hosts": ["gpu-node-17"], "pid": 4242, "slurm": slurm,
            "config": {"train": {"unet_lr": 1e-4}}}))
    monkeypatch.chdir(mine)
    code, out, err = _main(monkeypatch, capsys, "runs", "--json")
    assert code == 0, err
    rows = {row["name"]: row for row in json.loads(out)}
    assert rows["run_mine"]["status"] == "running" and rows["run_mine"]["error"] is None, rows
    assert rows["run_mine"]["cluster"] == "alpha"
    # This cluster's job, and a record from before runs named their cluster: SLURM here says.
    assert rows["here"]["status"] == rows["old"]["status"] == "stopped", rows
    code, out, err = _main(monkeypatch, capsys, "slurm", "status", "--json")
    assert code == 0, err
    (row,) = json.loads(out)
    assert (row["run"], row["run_status"]) == ("run_mine", "running"), row
    code, _, err = _main(monkeypatch, capsys, "eval", "run_mine")
    assert code == 1 and "status: running" in err, err
    code, _, err = _main(monkeypatch, capsys, "report", "run_mine")
    assert code == 0, err
    page = (runs / "run_mine" / "report.html").read_text()
    assert ">running<" in page and "status-stopped\">" not in page
    # Inside a job of cluster alpha (SLURM_CLUSTER_NAME), its SLURM is asked: the job is gone.
    monkeypatch.setenv("SLURM_CLUSTER_NAME", "alpha")
    code, out, err = _main(monkeypatch, capsys, "runs", "--json")
    rows = {row["name"]: row for row in json.loads(out)}
    assert rows["run_mine"]["status"] == "stopped" and "gone from SLURM" in rows["run_mine"][
        "error"], rows


def test_a_job_of_another_cluster_is_not_cancelled_or_looked_up_here(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Two clusters mounting one storage root: job 101 was submitted to cluster `alpha`. On
    cluster `beta`, job 101 is someone else's job (ids are a cluster's own): `slurm cancel`
    scancelled it, and `status` showed its state as this job's."""
    mine, _ = _lab(tmp_path, monkeypatch)
    jobs_json = tmp_path / "lab" / "jobs" / "jobs.json"
    jobs = json.loads(jobs_json.read_text())["jobs"]
    jobs[0]["cluster"] = "alpha"
    jobs.insert(1, {**jobs[0], "job_id": "103", "run": "run_mine2", "cluster": "beta"})
    jobs_json.write_text(json.dumps({"jobs": jobs}))
    (tmp_path / "bin" / "scontrol").write_text(
        '#!/bin/sh\nif [ "$2" = config ]; then echo "ClusterName             = beta"; exit 0; fi\n'
        'echo "JobId=$4 JobName=other JobState=RUNNING StdOut=/dev/null"\n')
    monkeypatch.chdir(mine)
    code, out, err = _main(monkeypatch, capsys, "slurm", "status", "--json")
    assert code == 0, err
    states = {row["job_id"]: row["state"] for row in json.loads(out)}
    assert states == {"101": "(on cluster alpha)", "103": "RUNNING"}, states
    code, out, err = _main(monkeypatch, capsys, "slurm", "cancel")
    assert code == 0 and out.strip() == "cancelled: 103", (out, err)
    assert (tmp_path / "cancelled").read_text().split() == ["103"]
    assert "job 101 was submitted to cluster alpha, not this one (beta)" in err
    code, out, err = _main(monkeypatch, capsys, "slurm", "logs", "run_mine")
    assert code == 0 and "log of mine" in out, (out, err)
