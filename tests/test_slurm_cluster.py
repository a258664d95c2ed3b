"""`loraforge slurm` and the job scripts against a real one-node SLURM cluster (slurm_cluster.py).

Every job really runs `loraforge train` / `loraforge generate` on the tiny model. To fit a 2-core
machine, all scenarios are submitted at once by one module fixture and run side by side; each
test then waits for its own jobs (polling `scontrol show job -o`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import assert_user_error, draw_character, run_cli, write_training_project
from slurm_cluster import (  # noqa: F401
    Cluster,
    _free_ports,
    missing_requirements,
    slurm_cluster,
)

pytestmark = pytest.mark.slurm
if missing_requirements():  # one line in the summary, not one per test
    pytest.skip(missing_requirements(), allow_module_level=True)

ACTIVATE = str(Path(sys.prefix) / "bin" / "activate")
FIXED_ENV = {"SOURCE_DATE_EPOCH": "1767225600"}
GENERATE = {"width": 128, "height": 96, "steps": 2}


def _project(root: Path, tiny_store: Path, train: dict[str, object],
             slurm: dict[str, object] | None = None, dataset: bool = True) -> Path:
    """A tiny training project whose jobs ask for little, with the test's Python environment."""
    config = write_training_project(root, tiny_store, train)
    if not dataset:
        for concept in (root / "master_dataset").iterdir():
            for file in concept.iterdir():
                file.unlink()
            concept.rmdir()
    values: dict[str, object] = {"cpus": 1, "gpus": 0, "mem": "1G", "time": "10",
                                 "grace_seconds": 60, "env_activate": ACTIVATE, **(slurm or {})}
    with open(config, "a") as fh:
        fh.write("[generate]\n" + "".join(f"{k} = {v}\n" for k, v in GENERATE.items()))
        fh.write("[slurm]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return root


def _submitted_ids(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stdout + result.stderr
    return re.findall(r"^submitted job (\d+)", result.stdout, re.MULTILINE)


def _sbatch(project: Path, *args: str) -> str:
    done = subprocess.run(["sbatch", "--parsable", *args], cwd=project, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def _log(project: Path, name: str, job_id: str) -> str:
    path = project / "logs" / f"{name}-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else f"(no log at {path})"


@dataclass
class Scenarios:
    root: Path
    ids: dict[str, list[str]] = field(default_factory=dict)
    projects: dict[str, Path] = field(default_factory=dict)
    nasty: str = ""


@pytest.fixture(scope="module")
def scenarios(slurm_cluster: Cluster, tiny_store: Path,  # noqa: F811
              tmp_path_factory: pytest.TempPathFactory) -> Scenarios:
    """Prepare every project and submit every job at once; the tests below wait for them."""
    root = tmp_path_factory.mktemp("slurm_jobs")
    s = Scenarios(root)

    # Preemption: the same run in two storage roots, one interrupted by SLURM's warning signal.
    for name in ("reference", "preempted"):
        project = _project(root / name, tiny_store, {"epochs": 2})
        s.projects[name] = project
        s.ids[name] = _submitted_ids(run_cli("slurm", "train", "--run", "same", cwd=project,
                                             env=FIXED_ENV))

    # The seed's ritual: `loraforge init` writes the scripts; sbatch them as they are.
    seed = root / "seed"
    _project(seed, tiny_store, {"max_steps": 1}, {"env_activate": "lora_env/bin/activate",
                                                  "gpus": 1})
    assert run_cli("init", seed).returncode == 0
    (seed / "lora_env").symlink_to(sys.prefix)
    s.projects["seed"] = seed
    train_id = _sbatch(seed, "submit_training.ssub")
    s.ids["seed"] = [train_id, _sbatch(seed, f"--dependency=afterok:{train_id}",
                                       "submit_inference.ssub")]

    # A pipeline whose prompt and caption prefix are full of shell syntax.
    s.nasty = (f"a knight $(touch {root}/pwned1) `touch {root}/pwned2`; touch {root}/pwned3 "
               "it's done")
    piped = _project(root / "piped", tiny_store, {"max_steps": 1})
    s.projects["piped"] = piped
    s.ids["piped"] = _submitted_ids(run_cli(
        "slurm", "pipeline", "--run", "piped", "--prompt", s.nasty, "--seed", "3",
        "--set", f"dataset.caption_prefix=$(touch {root}/pwned4) `touch {root}/pwned5`, ",
        cwd=piped))

    # A pipeline whose training fails (its concept folders moved away once it was submitted,
    # which `slurm pipeline` cannot foresee): generation must be cancelled.
    broken = _project(root / "broken", tiny_store, {"max_steps": 1})
    s.projects["broken"] = broken
    s.ids["broken"] = _submitted_ids(run_cli("slurm", "pipeline", "--run", "broken",
                                             cwd=broken))
    for concept in (broken / "master_dataset").iterdir():
        shutil.rmtree(concept)

    # A 2x2 sweep as one job array.
    sweep = _project(root / "sweep", tiny_store, {"max_steps": 1})
    s.projects["sweep"] = sweep
    s.ids["sweep"] = _submitted_ids(run_cli(
        "slurm", "sweep", "--run", "sw", "--param", "train.unet_lr=1e-4,5e-4",
        "--param", "train.network_dim=4,8", cwd=sweep))

    # Two nodes, one training process on each (no GPUs): srun starts them, gloo joins them.
    # Held until its test releases it, so that it is still running when the test signals it.
    wide = _project(root / "wide", tiny_store, {"epochs": 10, "batch_size": 1},
                    {"nodes": 2, "gpus": 0, "extra": ["--hold"]})
    s.projects["wide"] = wide
    s.ids["wide"] = _submitted_ids(run_cli("slurm", "train", "--run", "wide", cwd=wide))

    # Tagging as a CPU job: the job script runs `dataset tag --device cpu` on a node.
    tagged = _project(root / "tagged", tiny_store, {"max_steps": 1}, dataset=False)
    concept = tagged / "master_dataset" / "5_red_knight"
    concept.mkdir()
    draw_character(concept / "0.png", (200, 30, 30), "box", 0)
    draw_character(concept / "1.png", (200, 30, 30), "circle", 20)
    s.projects["tagged"] = tagged
    s.ids["tagged"] = _submitted_ids(run_cli("slurm", "tag", "--set", "models.tagger=tiny",
                                             cwd=tagged))

    for name, ids in s.ids.items():
        assert ids, name
    return s


def _wait_for_line(cluster: Cluster, project: Path, job_name: str, job_id: str,
                   pattern: str) -> None:
    """Until the job's log has a line matching `pattern` (the job must stay queued or running)."""
    log = project / "logs" / f"{job_name}-{job_id}.out"
    deadline = time.monotonic() + 300
    while not (log.exists() and re.search(pattern, log.read_text(errors="replace"),
                                          re.MULTILINE)):
        assert time.monotonic() < deadline, _log(project, job_name, job_id)
        assert cluster.job(job_id).get("JobState") in {"PENDING", "RUNNING"}, \
            _log(project, job_name, job_id)
        time.sleep(0.3)


def test_warning_signal_saves_requeues_and_resumes_to_an_identical_lora(
        scenarios: Scenarios, slurm_cluster: Cluster) -> None:  # noqa: F811
    project = scenarios.projects["preempted"]
    job_id = scenarios.ids["preempted"][0]
    _wait_for_line(slurm_cluster, project, "train-same", job_id, r"^step 1/")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=30)

    job = slurm_cluster.wait(job_id, timeout=400)
    text = _log(project, "train-same", job_id)
    assert job["JobState"] == "COMPLETED", text
    assert int(job["Restarts"]) >= 1, text
    assert "USR1" in text and "requeueing job" in text and "attempt 2" in text, text
    run_dir = project / "store" / "Multi_Concept_Output" / "same"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "finished"
    assert record["slurm"]["job_id"] == job_id and record["slurm"]["restart_count"] == "1"
    assert record["slurm"]["node"]

    reference_id = scenarios.ids["reference"][0]
    reference = slurm_cluster.wait(reference_id, timeout=300)
    assert reference["JobState"] == "COMPLETED", _log(scenarios.projects["reference"],
                                                      "train-same", reference_id)
    assert reference["Restarts"] == "0"
    ref_file = scenarios.projects["reference"] / "store" / "Multi_Concept_Output" / "same" \
        / "same.safetensors"
    assert (run_dir / "same.safetensors").read_bytes() == ref_file.read_bytes()


def test_init_scripts_train_then_generate_with_plain_sbatch(scenarios: Scenarios,
                                                            slurm_cluster: Cluster,  # noqa: F811
                                                            ) -> None:
    project = scenarios.projects["seed"]
    train_id, generate_id = scenarios.ids["seed"]
    job = slurm_cluster.wait(train_id, timeout=300)
    assert job["JobState"] == "COMPLETED", _log(project, "loraforge-train", train_id)
    assert job["Partition"] == "c3_accel"
    lora = project / "store" / "Multi_Concept_Output" / "multi_concept" / "multi_concept" \
        ".safetensors"
    assert lora.is_file()
    job = slurm_cluster.wait(generate_id, timeout=300)
    assert job["JobState"] == "COMPLETED", _log(project, "loraforge-generate", generate_id)
    assert (project / "store" / "Final_Images" / "final_command_scene.png").is_file()


def test_pipeline_generates_with_the_trained_lora_and_runs_no_injected_command(
        scenarios: Scenarios, slurm_cluster: Cluster) -> None:  # noqa: F811
    project = scenarios.projects["piped"]
    train_id, generate_id = scenarios.ids["piped"]
    pending = slurm_cluster.job(generate_id)
    assert f"afterok:{train_id}" in pending.get("Dependency", "") or \
        pending.get("JobState") != "PENDING"
    assert slurm_cluster.wait(train_id, timeout=300)["JobState"] == "COMPLETED", \
        _log(project, "train-piped", train_id)
    job = slurm_cluster.wait(generate_id, timeout=300)
    text = _log(project, "generate-piped", generate_id)
    assert job["JobState"] == "COMPLETED", text
    lora = project / "store" / "Multi_Concept_Output" / "piped" / "piped.safetensors"
    assert str(lora) in text  # generation used the LoRA training made
    image = project / "store" / "Final_Images" / "final_command_scene.png"
    from PIL import Image

    with Image.open(image) as png:
        assert scenarios.nasty in png.text.get("parameters", "")
    assert not list(scenarios.root.glob("pwned*"))
    caption_prefix = json.loads((lora.parent / "run.json").read_text())["config"]["dataset"][
        "caption_prefix"]
    assert caption_prefix.startswith("$(touch ")

    status = run_cli("slurm", "status", "piped", "--json", cwd=project)
    assert status.returncode == 0, status.stderr
    rows = {row["job_id"]: row for row in json.loads(status.stdout)}
    assert rows[train_id]["state"] == "COMPLETED" and rows[train_id]["run_status"] == "finished"
    assert rows[generate_id]["depends_on"] == train_id
    table = run_cli("slurm", "status", cwd=project)
    assert table.returncode == 0 and "generate-piped" in table.stdout, table.stderr
    logs = run_cli("slurm", "logs", train_id, cwd=project)
    assert logs.returncode == 0 and "LoRA:" in logs.stdout, logs.stderr
    tail = run_cli("slurm", "logs", "piped", "--lines", "1", cwd=project)
    assert tail.returncode == 0 and tail.stdout.count("\n") == 1, tail.stdout
    assert "exited with code 0" in tail.stdout


def test_failed_training_cancels_the_waiting_generation(scenarios: Scenarios,
                                                        slurm_cluster: Cluster,  # noqa: F811
                                                        ) -> None:
    project = scenarios.projects["broken"]
    train_id, generate_id = scenarios.ids["broken"]
    job = slurm_cluster.wait(train_id, timeout=300)
    text = _log(project, "train-broken", train_id)
    assert job["JobState"] == "FAILED", text
    assert "master_dataset" in text and "exited with code 1" in text
    assert "requeueing" not in text
    generate = slurm_cluster.wait(generate_id, timeout=60)
    assert generate["JobState"] == "CANCELLED", generate
    assert not (project / "logs" / f"generate-broken-{generate_id}.out").exists()


def test_sweep_runs_every_combination_and_runs_lists_them(scenarios: Scenarios,
                                                          slurm_cluster: Cluster,  # noqa: F811
                                                          ) -> None:
    project = scenarios.projects["sweep"]
    (array_id,) = scenarios.ids["sweep"]
    tasks = slurm_cluster.wait_all(array_id, timeout=400)
    logs = "\n".join(_log(project, "sweep-sw", f"{array_id}_{i}") for i in range(4))
    assert len(tasks) == 4, tasks
    assert all(t["JobState"] == "COMPLETED" for t in tasks), logs
    listed = run_cli("runs", "--json", cwd=project)
    assert listed.returncode == 0, listed.stderr
    runs = {r["name"]: r for r in json.loads(listed.stdout)}
    assert set(runs) == {"sw-unet_lr1e-4-network_dim4", "sw-unet_lr1e-4-network_dim8",
                         "sw-unet_lr5e-4-network_dim4", "sw-unet_lr5e-4-network_dim8"}
    for name, run in runs.items():
        assert run["status"] == "finished" and isinstance(run["final_loss"], float), name
        lr, dim = re.fullmatch(r"sw-unet_lr(.+)-network_dim(\d+)", name).groups()
        assert run["params"] == {"train.unet_lr": float(lr), "train.network_dim": int(dim)}
    table = run_cli("runs", cwd=project)
    assert all(name in table.stdout for name in runs) and "finished" in table.stdout
    # A task killed on its node (SIGKILL: the record still says running) shows stopped: its
    # record names the task's own job id, jobs.json the array's ARRAY_TASK.
    name = "sw-unet_lr5e-4-network_dim8"
    record_path = project / "store" / "Multi_Concept_Output" / name / "run.json"
    record = json.loads(record_path.read_text())
    assert record["slurm"]["job_id"] != f"{array_id}_3", record["slurm"]
    record_path.write_text(json.dumps({**record, "status": "running"}))
    (task,) = json.loads(run_cli("slurm", "status", name, "--json", cwd=project).stdout)
    assert (task["job_id"], task["run_status"]) == (f"{array_id}_3", "stopped"), task


def test_tag_job_captions_the_dataset_on_a_node(scenarios: Scenarios,
                                               slurm_cluster: Cluster) -> None:  # noqa: F811
    project = scenarios.projects["tagged"]
    (job_id,) = scenarios.ids["tagged"]
    log = _log(project, "tag", job_id)
    assert slurm_cluster.wait(job_id, timeout=300)["JobState"] == "COMPLETED", log
    log = _log(project, "tag", job_id)
    assert "tagger:" in log and " on CPU," in log, log
    concept = project / "master_dataset" / "5_red_knight"
    for name in ("0.txt", "1.txt"):
        assert (concept / name).read_text().startswith("red_knight"), log


def test_cancel_stops_a_pending_job(scenarios: Scenarios, slurm_cluster: Cluster,  # noqa: F811
                                    ) -> None:
    project = scenarios.projects["sweep"]
    (job_id,) = _submitted_ids(run_cli("slurm", "train", "--run", "later", "--set",
                                       'slurm.extra=["--begin=now+1hour"]', cwd=project))
    assert slurm_cluster.job(job_id)["JobState"] == "PENDING"
    recorded = json.loads((project / "store" / "jobs" / "jobs.json").read_text())["jobs"]
    (entry,) = [j for j in recorded if j["job_id"] == job_id]
    assert entry["cluster"] == "loraforge-test"  # job ids are a cluster's own
    cancelled = run_cli("slurm", "cancel", "later", cwd=project)
    assert cancelled.returncode == 0 and job_id in cancelled.stdout, cancelled.stderr
    assert slurm_cluster.wait(job_id, timeout=30)["JobState"] == "CANCELLED"
    again = run_cli("slurm", "cancel", "later", cwd=project)
    assert "nothing to cancel" in again.stdout


def test_two_node_job_trains_with_one_process_per_node_through_a_requeue(
        scenarios: Scenarios, slurm_cluster: Cluster) -> None:  # noqa: F811
    """srun passes SLURM's warning to both processes: they stop at the same step, rank 0 saves,
    the job is requeued and both resume."""
    project, job_id = scenarios.projects["wide"], scenarios.ids["wide"][0]
    subprocess.run(["scontrol", "release", job_id], check=True, timeout=30)
    _wait_for_line(slurm_cluster, project, "train-wide", job_id, r"^step 1/")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=30)
    job = slurm_cluster.wait(job_id, timeout=400)
    text = _log(project, "train-wide", job_id)
    assert job["JobState"] == "COMPLETED", text
    assert job["NodeList"] == "n[1-2]" and job["NumNodes"] == "2", job
    assert int(job["Restarts"]) >= 1 and "requeueing job" in text, text
    assert "2 training processes" in text, text
    run_dir = project / "store" / "Multi_Concept_Output" / "wide"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "finished"
    assert sorted(record["process_hosts"]) == ["n1", "n2"]
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert max(h["step"] for h in history) == 20  # 4 images / global batch 2, 10 epochs
    assert all(h["replica_spread"] == 0.0 for h in history)
    assert (run_dir / "wide.safetensors").is_file()


def test_a_controller_that_does_not_answer_is_named_and_the_script_kept(
        tmp_path: Path, tiny_store: Path) -> None:
    """Not a refusal of the job (no advice to edit [slurm]): SLURM is not reachable here."""
    conf = tmp_path / "slurm.conf"
    conf.write_text(f"ClusterName=nowhere\nSlurmctldHost=localhost\n"
                    f"SlurmctldPort={_free_ports(1)[0]}\n")
    project = _project(tmp_path / "p", tiny_store, {"max_steps": 1})
    result = run_cli("slurm", "train", cwd=project, env={"SLURM_CONF": str(conf)})
    assert_user_error(result, "sbatch could not reach the SLURM controller",
                      "Unable to contact slurm controller", "`sinfo`", "is kept")
    assert "[slurm] section" not in result.stderr
    scripts = list(project.rglob("jobs/train-multi_concept-*.ssub"))
    assert len(scripts) == 1 and str(scripts[0]) in result.stderr.replace("\n", "")
    assert "no jobs yet" in run_cli("slurm", "status", cwd=project).stdout


def test_a_training_killed_on_its_node_shows_stopped_with_where_it_resumes(
        slurm_cluster: Cluster, tiny_store: Path, tmp_path: Path) -> None:  # noqa: F811
    """The out-of-memory killer's SIGKILL gives the trainer no chance to update run.json: seen
    from the login node (another machine than the job's node n1), the run said `running`
    forever. SLURM knows its job has ended."""
    project = _project(tmp_path / "oom", tiny_store,
                       {"epochs": 1000, "batch_size": 1, "state_every_n_steps": 2})
    (job_id,) = _submitted_ids(run_cli("slurm", "train", "--run", "oom", cwd=project))
    _wait_for_line(slurm_cluster, project, "train-oom", job_id, r"^step [3-9]/")
    run_dir = project / "store" / "Multi_Concept_Output" / "oom"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "running" and record["process_hosts"] == ["n1"], record
    assert record["slurm"]["cluster"] == "loraforge-test", record  # job ids are per cluster
    listed = json.loads(run_cli("runs", "--json", cwd=project).stdout)
    assert listed[0]["status"] == "running", listed  # its job is running: not judged stopped

    os.kill(record["pid"], signal.SIGKILL)  # what the kernel's out-of-memory killer does
    job = slurm_cluster.wait(job_id, timeout=60)
    assert job["JobState"] == "FAILED", _log(project, "train-oom", job_id)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    (run,) = json.loads(run_cli("runs", "--json", cwd=project).stdout)
    assert run["status"] == "stopped", run
    newest = max(int(p.parent.name.split("-")[1])
                 for p in (run_dir / "state").glob("step-*/position.json"))
    assert f"its SLURM job {job_id} ended (FAILED)" in run["error"], run
    assert "`loraforge train --run oom`" in run["error"], run
    assert f"from its last state (step {newest})" in run["error"], run
    status = json.loads(run_cli("slurm", "status", "oom", "--json", cwd=project).stdout)
    assert status[0]["state"] == "FAILED" and status[0]["run_status"] == "stopped", status
    # Seen from another cluster mounting the same storage (here: from a job of it), whose SLURM
    # knows nothing of this cluster's job: not stopped, as for a run on a machine without SLURM.
    elsewhere = {"SLURM_CLUSTER_NAME": "other-cluster"}
    (run,) = json.loads(run_cli("runs", "--json", cwd=project, env=elsewhere).stdout)
    assert run["status"] == "running" and run["error"] is None, run
    status = json.loads(run_cli("slurm", "status", "oom", "--json", cwd=project,
                                env=elsewhere).stdout)
    assert status[0]["run_status"] == "running", status
