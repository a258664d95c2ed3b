"""`loraforge slurm` without a cluster: value checks, quoting, the rendered scripts, --dry-run, the
missing-sbatch error, and the job script's signal -> requeue logic run by bash against fake
`loraforge` and `scontrol` programs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_user_error, run_cli, write_training_project

from loraforge.config import load_settings
from loraforge.errors import ForgeError
from loraforge.runs import this_host
from loraforge.slurm.jobs import parse_params, sweep_tasks
from loraforge.slurm.script import JobScript, render, resources, umask_for
from loraforge.slurm.validate import check_extra, check_mem, parse_gpus, parse_time

ACTIVATE = str(Path(sys.prefix) / "bin" / "activate")
NASTY = "knight $(touch {d}/pwned1) `touch {d}/pwned2`; touch {d}/pwned3 '\" \\ $HOME"


# --- value checks ---------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "seconds"), [
    ("30", 30 * 60), ("90", 90 * 60), ("5:30", 5 * 60 + 30), ("04:00:00", 4 * 3600),
    ("48:00:00", 48 * 3600), ("1-12", 36 * 3600), ("2-03:04", (51 * 60 + 4) * 60),
    ("1-00:00:01", 86401), (" 10 ", 600),
])
def test_slurm_time_formats_are_read(text: str, seconds: int) -> None:
    assert parse_time(text) == seconds


@pytest.mark.parametrize("text", [
    "", "abc", "4h", "1:2:3:4", "10:60", "1:60:00", "1-24", "1-1:60", "-5", "1.5", "0",
    "00:00:00", "1-", "12:", "$(reboot)", "10\n#SBATCH --x", "UNLIMITED",
])
def test_bad_slurm_times_are_refused_with_the_formats(text: str) -> None:
    with pytest.raises(ForgeError) as error:
        parse_time(text)
    assert "slurm.time" in str(error.value)
    assert ("MM:SS" in str(error.value)) or "zero" in str(error.value)


@pytest.mark.parametrize(("text", "expected"), [
    ("32G", "32G"), ("500M", "500M"), ("64000", "64000"), ("1t", "1T"), ("0", "0"),
])
def test_memory_sizes(text: str, expected: str) -> None:
    assert check_mem(text) == expected


@pytest.mark.parametrize("text", ["", "32GB", "1.5G", "G", "-1G", "32 G", "32G;ls", "32P"])
def test_bad_memory_sizes_are_refused(text: str) -> None:
    with pytest.raises(ForgeError, match=r"slurm\.mem.*not a SLURM memory size"):
        check_mem(text)


def test_gpu_requests() -> None:
    assert parse_gpus("2").gres() == "gpu:2"
    assert parse_gpus("a100:1").gres() == "gpu:a100:1"
    assert parse_gpus(0).count == 0
    for bad in ("", "two", "a100", "1:a100", "65", "gpu:1:2", "a100:1;ls", "-1"):
        with pytest.raises(ForgeError, match="not a GPU request"):
            parse_gpus(bad)


def test_extra_lines_must_be_single_options() -> None:
    assert check_extra(["--constraint=a100", "#SBATCH --mail-type=END"]) == [
        "--constraint=a100", "--mail-type=END"]
    for bad in (["echo hi"], ["--x\nrm -rf /"], ["--gres=gpu:lots"], [""]):
        with pytest.raises(ForgeError, match=r"slurm\.extra"):
            check_extra(bad)


@pytest.mark.parametrize(("line", "use"), [
    ("--gres=gpu:4", "slurm.gpus"), ("--gpus=2", "slurm.gpus"), ("-G 2", "slurm.gpus"),
    ("--time=48:00:00", "slurm.time"), ("-t 60", "slurm.time"), ("--tim=60", "slurm.time"),
    ("--partition=big", "slurm.partition"), ("-p big", "slurm.partition"),
    ("--part=big", "slurm.partition"), ("--mem-per-cpu=4G", "slurm.mem"),
    ("#SBATCH --cpus-per-task=2", "slurm.cpus"), ("-N 2", "slurm.nodes"),
    ("--account=x", "slurm.account"), ("--qos=x", "slurm.qos"),
    ("--ntasks=4", "one process per GPU"), ("--ntasks-per-node=4", "one process per GPU"),
    ("--output=/tmp/x.out", "`loraforge slurm logs`"), ("-o x", "`loraforge slurm logs`"),
    ("--signal=B:USR1@60", "slurm.grace_seconds"), ("--no-requeue", "slurm.max_requeues"),
    ("--requeue", "slurm.max_requeues"), ("--job-name=x", "named after its run"),
    ("--array=0-3", "slurm sweep"), ("--dependency=afterok:1", "slurm pipeline"),
    ("--chdir=/tmp", "project folder"),
])
def test_extra_lines_cannot_override_what_the_slurm_keys_set(line: str, use: str) -> None:
    """A later #SBATCH line wins: `extra = ["--gres=gpu:4"]` silently replaced slurm.gpus."""
    with pytest.raises(ForgeError) as error:
        check_extra(["--constraint=a100", line])
    assert str(error.value).startswith(f"`slurm.extra` = {line!r} sets --"), error.value
    assert "remove it from slurm.extra" in str(error.value) and use in str(error.value)


def test_extra_lines_the_slurm_keys_do_not_set_are_kept() -> None:
    lines = ["--export=NONE", "--time-min=30", "--gres-flags=enforce-binding", "-C a100",
             "--nodelist=n1", "--mem-bind=local", "--mail-type=END", "--exclusive",
             "--ntasks-per-core=1", "--gres=lscratch:10"]
    assert check_extra(lines) == lines
    with pytest.raises(ForgeError, match="sets --gres"):
        check_extra(["--gres=lscratch:10,gpu:a100:2"])


def test_generic_resources_in_extra_join_the_scripts_own_gres_line(tmp_path: Path) -> None:
    """`extra = ["--gres=lscratch:10"]` (local scratch, NVMe) was refused as if it asked for
    GPUs; as a line of its own it would replace the script's GPU request (a later --gres wins),
    so it joins the script's --gres line, and is the line in a job without GPUs."""
    project = _project(tmp_path, 'extra = ["--gres=lscratch:10", "--exclusive"]\n')
    train = run_cli("slurm", "train", "--dry-run", "--gpus", "a100:2", cwd=project)
    assert train.returncode == 0, train.stderr
    lines = [line for line in train.stdout.splitlines() if line.startswith("#SBATCH")]
    assert [line for line in lines if "--gres" in line] == [
        "#SBATCH --gres=gpu:a100:2,lscratch:10"]
    assert "#SBATCH --exclusive" in lines
    tag = run_cli("slurm", "tag", "--dry-run", "--gpus", "0", cwd=project)
    assert tag.returncode == 0, tag.stderr
    assert [line for line in tag.stdout.splitlines() if "--gres" in line] == [
        "#SBATCH --gres=lscratch:10"]


def _project(tmp_path: Path, slurm: str = "", tiny_store: Path | None = None,
             name: str = "proj") -> Path:
    """A project folder with a [slurm] section; with `tiny_store`, one that trains (a dataset
    and the tiny models): a job is submitted only when it would not fail on its inputs."""
    project = tmp_path / name
    project.mkdir(exist_ok=True)
    if tiny_store is None:
        (project / "forge.toml").write_text('[storage]\nroot = "store"\n')
    else:
        write_training_project(project, tiny_store)
    with open(project / "forge.toml", "a") as fh:
        fh.write(f'[slurm]\nenv_activate = "{ACTIVATE}"\n{slurm}')
    return project


@pytest.mark.parametrize(("setting", "needles"), [
    ("slurm.time=4h", ["slurm.time", "'4h'", "MM:SS", "--set slurm.time=4h"]),
    ("slurm.time=\"5\"", ["slurm.time", "slurm.grace_seconds"]),
    ("slurm.mem=lots", ["slurm.mem", "32G"]),
    ("slurm.partition=gpu;ls", ["slurm.partition", "sinfo"]),
    ("slurm.account=lab x", ["slurm.account"]),
    ('slurm.extra=["--x=1\\nrm -rf ~"]', ["slurm.extra"]),
    ('slurm.extra=["--gres=gpu:4"]', ["slurm.extra", "sets --gres", "set `slurm.gpus`"]),
])
def test_bad_slurm_settings_stop_before_sbatch(tmp_path: Path, setting: str,
                                               needles: list[str]) -> None:
    project = _project(tmp_path)
    result = run_cli("slurm", "train", "--dry-run", "--set", setting, cwd=project)
    assert_user_error(result, *needles)


def test_bad_gpus_option_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("slurm", "train", "--dry-run", "--gpus", "lots", cwd=_project(tmp_path))
    assert_user_error(result, "--gpus", "a100:2")


def test_umask_follows_the_file_mode() -> None:
    assert umask_for(0o644) == "0022"
    assert umask_for(0o664) == "0002"
    assert umask_for(0o640) == "0026"
    assert umask_for(0o444) == "0022"  # the owner always keeps write access


# --- the rendered scripts -------------------------------------------------------------------
def test_init_writes_both_job_scripts_from_the_slurm_section(tmp_path: Path) -> None:
    project = _project(tmp_path, 'partition = "debug"\ngpus = 2\ncpus = 4\nmem = "16G"\n'
                                 'time = "1-00:00"\naccount = "lab1"\nqos = "high"\n'
                                 'grace_seconds = 120\nextra = ["--constraint=a100"]\n')
    result = run_cli("init", project)
    assert result.returncode == 0, result.stderr
    assert (project / "logs").is_dir()
    for name, call in (("submit_training.ssub", "loraforge train &"),
                       ("submit_inference.ssub", "loraforge generate &")):
        text = (project / name).read_text()
        assert os.access(project / name, os.X_OK)
        for line in ("#SBATCH --partition=debug", "#SBATCH --cpus-per-task=4",
                     "#SBATCH --mem=16G", "#SBATCH --time=1-00:00",
                     "#SBATCH --account=lab1", "#SBATCH --qos=high",
                     "#SBATCH --constraint=a100", "#SBATCH --output=logs/%x-%j.out",
                     "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", call,
                     f"source {ACTIVATE}", "export HF_HUB_OFFLINE=1",
                     'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"', "umask 0022"):
            assert line in text, (name, line)
        assert "HF_HOME=\"$PWD\"/store/cache/huggingface" in text
        assert subprocess.run(["bash", "-n", str(project / name)]).returncode == 0
    training = (project / "submit_training.ssub").read_text()
    assert "scontrol requeue" in training
    # Training: one process per GPU, started by srun; generation: one process, one GPU.
    for line in ("#SBATCH --gres=gpu:2", "#SBATCH --ntasks-per-node=2",
                 "srun --ntasks-per-node=2 --cpus-per-task=4 --kill-on-bad-exit=0 --wait=60 "
                 "loraforge train &", "export MASTER_ADDR MASTER_PORT"):
        assert line in training
    inference = (project / "submit_inference.ssub").read_text()
    for line in ("#SBATCH --gres=gpu:1", "#SBATCH --ntasks-per-node=1", "#SBATCH --nodes=1"):
        assert line in inference
    assert "srun" not in inference and "MASTER_ADDR" not in inference

    (project / "submit_training.ssub").write_text("# mine\n")
    again = run_cli("init", project)
    assert again.returncode == 0
    assert (project / "submit_training.ssub").read_text() == "# mine\n"
    assert "kept" in again.stdout


def test_two_nodes_of_four_gpus_start_eight_processes_that_meet_on_the_first(
        tmp_path: Path) -> None:
    project = _project(tmp_path, "nodes = 2\ngpus_per_node = 4\ncpus = 6\n")
    result = run_cli("slurm", "train", "--dry-run", "--run", "wide", cwd=project)
    assert result.returncode == 0, result.stderr
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gres=gpu:4",
                 "#SBATCH --cpus-per-task=6", "srun starts 8 processes (2 node(s) x 4)",
                 'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
                 "--ntasks-per-node=4", "--wait=60",
                 # srun would end the step on TERM: the trap asks every process to save instead.
                 "trap 'cancelled=1; [ -z \"$child\" ] || kill -USR1 \"$child\" 2>/dev/null' "
                 "TERM INT"):
        assert line in result.stdout, line
    script = result.stdout[result.stdout.index("#!/bin/bash"):]
    script = script[:script.index("\n# ---")] if "\n# ---" in script else script
    checked = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert checked.returncode == 0, checked.stderr


def test_default_init_scripts_match_the_seed_resources(tmp_path: Path) -> None:
    (tmp_path / "lora_env" / "bin").mkdir(parents=True)  # the seed's layout: the environment
    (tmp_path / "lora_env" / "bin" / "activate").write_text("")  # beside forge.toml
    assert run_cli("init", tmp_path).returncode == 0
    text = (tmp_path / "submit_training.ssub").read_text()
    for line in ("#SBATCH --partition=c3_accel", "#SBATCH --gres=gpu:1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32G", "#SBATCH --time=04:00:00",
                 "#SBATCH --signal=B:USR1@300", "source lora_env/bin/activate",
                 "MAX_REQUEUES=20"):
        assert line in text
    assert "--account" not in text and "--qos" not in text
    assert "srun" not in text and "#SBATCH --ntasks-per-node=1" in text  # one GPU, one process


@pytest.mark.parametrize("written", ["~/lora_env/bin/activate", "$HOME/lora_env/bin/activate"])
def test_init_expands_home_in_the_environment_as_slurm_train_does(tmp_path: Path,
                                                                  written: str) -> None:
    """init wrote `source '$HOME/lora_env/bin/activate'`, quoted, so the job looked for a
    folder named $HOME and failed; `slurm train` expanded it."""
    project = _project(tmp_path)
    config = project / "forge.toml"
    config.write_text(config.read_text().replace(f'"{ACTIVATE}"', f'"{written}"'))
    home = {"HOME": str(tmp_path)}
    assert run_cli("init", project, env=home).returncode == 0
    expected = f"if ! source {tmp_path}/lora_env/bin/activate; then"
    assert expected in (project / "submit_training.ssub").read_text().splitlines()
    assert expected in (project / "submit_inference.ssub").read_text().splitlines()
    train = run_cli("slurm", "train", "--dry-run", cwd=project, env=home)
    assert expected in train.stdout.splitlines()


def test_scripts_that_no_longer_ask_what_the_slurm_section_asks_are_said_and_rewritten(
        tmp_path: Path) -> None:
    """init writes the job scripts once; `sbatch submit_training.ssub` does not read forge.toml.
    A user who set the partition after init submitted to the old one without a word."""
    project = tmp_path / "p"
    assert run_cli("init", project).returncode == 0
    config = project / "forge.toml"
    config.write_text(config.read_text().replace('partition = "c3_accel"', 'partition = "gpu"'))
    script = project / "submit_training.ssub"
    script.write_text(script.read_text() + "# my own note\n")
    mine = script.read_text()

    checked = run_cli("dataset", "check", cwd=project)
    assert "submit_training.ssub lacks #SBATCH --partition=gpu" in checked.stderr
    assert "`loraforge init --scripts` writes them again" in checked.stderr
    again = run_cli("init", project)
    assert "it no longer asks what [slurm] asks: #SBATCH --partition=gpu;" in again.stdout
    assert script.read_text() == mine  # kept: init never overwrites
    rewritten = run_cli("init", project, "--scripts")
    assert rewritten.returncode == 0, rewritten.stderr
    assert "#SBATCH --partition=gpu" in script.read_text()
    assert (project / "submit_training.ssub.bak").read_text() == mine
    assert "no longer asks" not in run_cli("dataset", "check", cwd=project).stderr
    assert "kept      " + str(script) in run_cli("init", project, "--scripts").stdout
    # a request the user added ("edit freely") is no drift; nor is a [slurm] that is invalid,
    # which the dataset check does not need (the commands that submit say what is wrong)
    script.write_text(script.read_text() + "#SBATCH --mail-type=END,FAIL\n")
    assert "no longer asks" not in run_cli("dataset", "check", cwd=project).stderr
    assert "kept      " + str(script) in run_cli("init", project).stdout
    invalid = run_cli("dataset", "check", "--set", 'slurm.time="00:04:00"', cwd=project)
    assert "slurm.time" not in invalid.stderr and "has no concept folders" in invalid.stderr


def test_init_elsewhere_points_the_jobs_at_the_environment_that_ran_it(tmp_path: Path) -> None:
    """The README's recipe: setup_forge.sh builds lora_env/ in the checkout, `loraforge init
    my_project` makes a folder inside it; the jobs run in my_project/ and must still find the
    environment."""
    project = tmp_path / "my_project"
    result = run_cli("init", project)
    assert result.returncode == 0, result.stderr
    activate = Path(sys.prefix) / "bin" / "activate"
    assert activate.is_file()
    assert f"slurm.env_activate = {activate}" in result.stdout
    for name in ("submit_training.ssub", "submit_inference.ssub"):
        assert f"if ! source {activate}; then" in (project / name).read_text()
    shown = run_cli("config", "show", "--json", cwd=project)
    assert json.loads(shown.stdout)["config"]["slurm"]["env_activate"] == str(activate)


def test_dry_run_prints_the_script_and_the_sbatch_call_and_writes_nothing(tmp_path: Path,
                                                                            ) -> None:
    project = _project(tmp_path, 'time = "2:00:00"\n')
    result = run_cli("slurm", "train", "--dry-run", "--run", "blake_v2", "--gpus", "a100:2",
                     "--set", "train.epochs=3", cwd=project)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for needle in ("#SBATCH --job-name=train-blake_v2", "#SBATCH --gres=gpu:a100:2",
                   "#SBATCH --time=2:00:00", "--set train.epochs=3", "--run blake_v2",
                   f"--config {project / 'forge.toml'}", "sbatch --parsable",
                   "loraforge slurm mark-failed"):
        assert needle in out, needle
    assert not (project / "store").exists() and not (project / "logs").exists()


def test_pipeline_dry_run_chains_generation_after_training(tmp_path: Path) -> None:
    project = _project(tmp_path)
    result = run_cli("slurm", "pipeline", "--dry-run", "--run", "r1", "--prompt", "two knights",
                     "--seed", "7", cwd=project)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "loraforge train" in out and "loraforge generate" in out
    assert "--dependency=afterok:" in out and "--kill-on-invalid-dep=yes" in out
    lora = project / "store" / "Multi_Concept_Output" / "r1" / "r1.safetensors"
    assert f"--lora {lora}" in out
    assert "--prompt 'two knights'" in out and "--seed 7" in out


def test_tag_dry_run_renders_one_tagging_process_with_its_options(tmp_path: Path) -> None:
    project = _project(tmp_path)
    result = run_cli("slurm", "tag", "--dry-run", "--append", "--threshold", "0.5", "--gpus",
                     "a100:2", "blake", "20_mira", cwd=project)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for needle in ("#SBATCH --job-name=tag", "#SBATCH --gres=gpu:a100:1",
                   "#SBATCH --ntasks-per-node=1", "export HF_HUB_OFFLINE=1",
                   "loraforge dataset tag", f"--config {project / 'forge.toml'}",
                   "--threshold 0.5", "--append", "-- blake 20_mira", "sbatch --parsable"):
        assert needle in out, (needle, out)
    assert "srun" not in out and not (project / "store").exists()
    # A threshold that is no probability is refused before a job is written, not in the job.
    nan = run_cli("slurm", "tag", "--dry-run", "--threshold", "nan", cwd=project)
    assert_user_error(nan, "'--threshold': must be a number from 0 to 1, got nan")


def test_sweep_names_one_run_per_combination() -> None:
    params = parse_params(["train.unet_lr=1e-4,5e-4", "train.network_dim=8,16"])
    tasks = sweep_tasks("multi_concept", params)
    assert [t.run for t in tasks] == [
        "multi_concept-unet_lr1e-4-network_dim8", "multi_concept-unet_lr1e-4-network_dim16",
        "multi_concept-unet_lr5e-4-network_dim8", "multi_concept-unet_lr5e-4-network_dim16"]
    assert tasks[3].sets == ["train.unet_lr=5e-4", "train.network_dim=16"]


@pytest.mark.parametrize(("params", "needle"), [
    ([], "at least one --param"),
    (["unet_lr=1,2"], "section.key"),
    (["train.unet_lr=1e-4,,2"], "empty value"),
    (["train.unet_lr=1,1"], "repeats"),
    (["train.unet_lr"], "--param `train.unet_lr` is not key=value"),
    (["train.run_name=a,b"], "run_name` cannot be swept"),
    (["train.epochs=1,2", "train.epochs=3"], "`train.epochs` is given twice"),
    (["train.unet_lr=0.0001,1e-4"], "repeats a value"),
    (["slurm.mem=16G,32G"], "one job array"),
    (["models.base=tiny,/x/y"], "the sweep names each run from its values"),
    (["train.caption_prefix=a b,c"], "not allowed"),
])
def test_bad_sweeps_are_refused(params: list[str], needle: str) -> None:
    with pytest.raises(ForgeError, match=needle):
        sweep_tasks("multi_concept", parse_params(params))


def test_sweep_dry_run_is_one_array_and_checks_every_value(tmp_path: Path) -> None:
    project = _project(tmp_path)
    result = run_cli("slurm", "sweep", "--dry-run", "--param", "train.unet_lr=1e-4,5e-4",
                     "--param", "train.network_dim=8,16", "--max-parallel", "2", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --array=0-3%2" in result.stdout
    assert "#SBATCH --output=logs/%x-%A_%a.out" in result.stdout
    assert "RUN=multi_concept-unet_lr5e-4-network_dim16" in result.stdout
    bad = run_cli("slurm", "sweep", "--dry-run", "--param", "train.network_dim=8,-1",
                  cwd=project)
    assert_user_error(bad, "`--param train.network_dim=-1`", "greater than or equal to 1")
    assert "--set" not in bad.stderr
    unknown = run_cli("slurm", "sweep", "--dry-run", "--param", "train.network_dims=8,16",
                      cwd=project)
    assert_user_error(unknown, "unknown key `train.network_dims` (--param train.network_dims=8)",
                      "did you mean `train.network_dim`?")


def test_no_sbatch_is_a_clear_error_that_keeps_the_script(tmp_path: Path,
                                                           tiny_store: Path) -> None:
    project = _project(tmp_path, tiny_store=tiny_store)
    bare = tmp_path / "bin"
    bare.mkdir()
    result = run_cli("slurm", "train", cwd=project, env={"PATH": str(bare)})
    assert_user_error(result, "sbatch", "not found", "login node")
    scripts = list((project / "store" / "jobs").glob("train-multi_concept-*.ssub"))
    assert len(scripts) == 1
    assert str(scripts[0]) in result.stderr.replace("\n", "")


def test_a_job_that_would_fail_on_its_inputs_is_not_submitted(tmp_path: Path,
                                                             tiny_store: Path) -> None:
    """An empty dataset, a base model not in the store, an unknown concept: the job waited in
    the queue, took a node (a GPU) and failed in its first seconds, where `train` refuses at
    once. Said before sbatch now; a dry run notes it above the script."""
    project = _project(tmp_path, tiny_store=tiny_store)
    shutil.rmtree(project / "master_dataset" / "1_blue_mage")
    shutil.rmtree(project / "master_dataset" / "1_red_knight")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    called = tmp_path / "sbatch-called"
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ntouch {called}\necho 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    for args, needle, noted in (
            (["train"], "has no concept folders", True),
            (["pipeline"], "has no concept folders", True),
            (["sweep", "--param", "train.unet_lr=1e-4,2e-4"], "has no concept folders", True),
            (["generate", "--set", "models.base=no_such_model"], "no_such_model", False),
            (["tag", "nosuch", "--gpus", "0"], "nosuch", True)):
        result = run_cli("slurm", *args, cwd=project, env=env)
        assert_user_error(result, needle, "nothing was submitted: the job would fail on it")
        dry = run_cli("slurm", *args, "--dry-run", cwd=project, env=env)
        assert dry.returncode == 0, dry.stderr  # a dry run checks what it can without writing
        assert (needle in dry.stdout and "# note: this job would fail: " in dry.stdout) == noted
    assert not called.exists() and not (project / "store").exists()
    # a sweep checks each run's own dataset (a --param may set dataset.path)
    write_training_project(tmp_path / "other", tiny_store)
    for name in ("ds_a", "ds_b"):
        shutil.copytree(tmp_path / "other" / "master_dataset", project / name)
    swept = run_cli("slurm", "sweep", "--param", "dataset.path=ds_a,ds_b", cwd=project, env=env)
    assert swept.returncode == 0 and called.exists(), swept.stderr


def test_missing_environment_is_named_before_submitting(tmp_path: Path,
                                                        tiny_store: Path) -> None:
    project = _project(tmp_path, tiny_store=tiny_store)
    result = run_cli("slurm", "train", "--set", "slurm.env_activate=nowhere/bin/activate",
                     cwd=project)
    assert_user_error(result, "nowhere/bin/activate", "slurm.env_activate")


# --- the job script, run by bash against fake programs ---------------------------------------
FAKE_LORAFORGE = """\
#!{python}
import json, os, signal, sys, time
log = os.environ["FAKE_LOG"]
with open(log, "a") as fh:
    fh.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1:3] == ["slurm", "mark-failed"]:
    sys.exit(0)
mode = os.environ.get("FAKE_MODE", "exit:0")
if mode.startswith("exit:"):
    sys.exit(int(mode[5:]))
if mode == "plain":  # still importing: no handler yet, USR1 kills it
    open(os.environ["FAKE_LOG"] + ".started", "w").close()
    time.sleep(30)
    sys.exit(0)
got = []
for name in ("SIGUSR1", "SIGTERM"):
    signal.signal(getattr(signal, name), lambda n, f: got.append(signal.Signals(n).name))
open(os.environ["FAKE_LOG"] + ".started", "w").close()
deadline = time.time() + 30
while not got and time.time() < deadline:
    time.sleep(0.05)
time.sleep(0.5)  # "saving state"
with open(log, "a") as fh:
    fh.write(json.dumps(["signal", got]) + "\\n")
sys.exit(75)
"""


@pytest.fixture
def fake_job(tmp_path: Path):
    """Render a training job script whose `loraforge` and `scontrol` are fakes that log calls."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    (bin_dir / "loraforge").write_text(FAKE_LORAFORGE.format(python=sys.executable))
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\necho \"scontrol $*\" >> \"$FAKE_LOG.scontrol\"\n")
    for program in bin_dir.iterdir():
        program.chmod(0o755)
    activate = tmp_path / "activate"
    activate.write_text(f'export PATH="{bin_dir}:$PATH"\n')
    project = _project(tmp_path, 'max_requeues = 3\ntime = "10"\ngrace_seconds = 60\n')
    settings = load_settings(project / "forge.toml")
    job = JobScript(kind="train", job_name="train-x", title="test", res=resources(settings),
                    command=["loraforge", "train", "--run", "x"], activate=str(activate),
                    umask="0022", hf_home="/tmp/hf", workdir=project,
                    failed_command=["loraforge", "slurm", "mark-failed", "--run", "x"])
    script = tmp_path / "job.ssub"
    script.write_text(render(job))
    log = tmp_path / "calls.log"

    def start(mode: str, **env: str) -> subprocess.Popen[str]:
        full = {**os.environ, "FAKE_LOG": str(log), "FAKE_MODE": mode, **env}
        return subprocess.Popen(["bash", str(script)], env=full, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] \
            if log.exists() else []

    def scontrol() -> list[str]:
        path = Path(f"{log}.scontrol")
        return path.read_text().splitlines() if path.exists() else []

    def wait_started(proc: subprocess.Popen[str]) -> None:
        deadline = time.monotonic() + 20
        while not Path(f"{log}.started").exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "fake loraforge never started"
            time.sleep(0.05)

    return start, calls, scontrol, wait_started


def test_usr1_is_forwarded_and_the_job_requeued(fake_job) -> None:
    start, calls, scontrol, wait_started = fake_job
    proc = start("wait", SLURM_JOB_ID="4242")
    wait_started(proc)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 75, out
    assert ["signal", ["SIGUSR1"]] in calls()
    assert scontrol() == ["scontrol requeue 4242"], out
    assert "requeue 1 of at most 3" in out


def test_usr1_before_loraforge_catches_it_still_requeues(fake_job) -> None:
    start, _, scontrol, wait_started = fake_job
    proc = start("plain", SLURM_JOB_ID="7", SLURM_RESTART_COUNT="1")
    wait_started(proc)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 75, out
    assert scontrol() == ["scontrol requeue 7"], out
    assert "requeue 2 of at most 3" in out


def test_too_many_requeues_marks_the_run_failed(fake_job) -> None:
    start, calls, scontrol, wait_started = fake_job
    proc = start("wait", SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="3")
    wait_started(proc)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1, out
    assert scontrol() == []
    failed = [c for c in calls() if c[:2] == ["slurm", "mark-failed"]]
    assert failed and failed[0][-2] == "--reason" and "max_requeues = 3" in failed[0][-1]
    assert "--run" in failed[0]


def test_cancel_is_passed_on_and_not_requeued(fake_job) -> None:
    start, calls, scontrol, wait_started = fake_job
    proc = start("wait", SLURM_JOB_ID="4242")
    wait_started(proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 75, out
    assert ["signal", ["SIGTERM"]] in calls()
    assert scontrol() == []


@pytest.mark.parametrize("code", [0, 1, 2])
def test_exit_codes_pass_through_without_requeue(fake_job, code: int) -> None:
    start, calls, scontrol, _ = fake_job
    proc = start(f"exit:{code}", SLURM_JOB_ID="4242")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == code, out
    assert scontrol() == []
    assert calls() == [["train", "--run", "x"]]


def test_a_hostile_prompt_reaches_loraforge_as_one_literal_argument(tmp_path: Path,
                                                                      fake_job) -> None:
    """Render `slurm generate` with shell syntax in the prompt, then run the script for real."""
    _, calls, _, _ = fake_job
    project = _project(tmp_path)
    nasty = NASTY.format(d=tmp_path)
    result = run_cli("slurm", "generate", "--dry-run", "--prompt", nasty, "--set",
                     f"generate.negative={nasty}", "--figure", f"blake: {nasty}", cwd=project)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    script_text = text[text.index("#!/bin/bash"):text.index("# would run")]
    fake_activate = tmp_path / "activate"
    script_text = script_text.replace(f"source {ACTIVATE}", f"source {fake_activate}")
    script = tmp_path / "generate.ssub"
    script.write_text(script_text)
    env = {**os.environ, "FAKE_LOG": str(tmp_path / "calls.log"), "FAKE_MODE": "exit:0"}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    argv = calls()[-1]
    assert argv[argv.index("--prompt") + 1] == nasty
    assert argv[argv.index("--figure") + 1] == f"blake: {nasty}"
    assert f"generate.negative={nasty}" in argv
    assert not list(tmp_path.glob("pwned*"))


def _run_printed_script(dry_run: str, tmp_path: Path, env: dict[str, str]) -> str:
    """Run the job script a `--dry-run` printed with bash, from `tmp_path`, in exactly the
    environment `env` (as `--export=NONE` gives a job), with a stand-in `loraforge` that prints
    its folder, the storage root it was given and its arguments, one a line; return the output."""
    bin_dir = tmp_path / "standin"
    bin_dir.mkdir()
    (bin_dir / "loraforge").write_text('#!/bin/sh\nprintf "%s\\n" "cwd=$PWD" '
                                       '"root=${LORAFORGE_STORAGE_ROOT-}" "$@"\n')
    (bin_dir / "loraforge").chmod(0o755)
    (tmp_path / "standin.activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    text = dry_run[dry_run.index("#!/bin/bash"):dry_run.index("# would run")]
    script = tmp_path / "printed.ssub"
    script.write_text(text.replace(f"source {ACTIVATE}", f"source {tmp_path}/standin.activate"))
    done = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_a_newline_in_the_project_folder_name_stays_inside_the_comment(tmp_path: Path) -> None:
    """`# Project: ...` and `# Config: ...` held the raw path: after a newline in a folder's
    name the rest ran as a command, and sbatch stopped reading #SBATCH lines above it."""
    project = _project(tmp_path, name="lab\ntouch pwned")
    result = run_cli("slurm", "train", "--dry-run", cwd=project)
    assert result.returncode == 0, result.stderr
    script = result.stdout[result.stdout.index("#!/bin/bash"):result.stdout.index("# would")]
    lines = script.splitlines()
    last_sbatch = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    assert all(line.startswith("#") for line in lines[:last_sbatch]), script
    assert f"# Project: {tmp_path}/lab\\ntouch pwned" in lines
    assert f"# would run (in {tmp_path}/lab\\ntouch pwned): sbatch" in result.stdout
    output = _run_printed_script(result.stdout, tmp_path, {"PATH": os.environ["PATH"]})
    assert f"cwd={project}" in output
    assert not (tmp_path / "pwned").exists()


def test_the_job_uses_the_storage_root_the_submission_used(tmp_path: Path) -> None:
    """A relative LORAFORGE_STORAGE_ROOT was resolved again in the job, from the project folder
    (another root), and a job that inherits no environment (`--export=NONE`) used storage.root."""
    project = _project(tmp_path, 'extra = ["--export=NONE"]\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_cli("slurm", "train", "--dry-run", "--config", project / "forge.toml",
                     cwd=elsewhere, env={"LORAFORGE_STORAGE_ROOT": "shared"})
    assert result.returncode == 0, result.stderr
    output = _run_printed_script(result.stdout, tmp_path, {"PATH": os.environ["PATH"]})
    assert f"cwd={project}" in output
    assert f"root={elsewhere / 'shared'}" in output.splitlines()


def test_a_lora_with_a_weight_given_from_another_folder_reaches_the_job(tmp_path: Path) -> None:
    """`--lora mylora.safetensors:0.7` stayed relative (no file `mylora.safetensors:0.7`
    exists), so the job, in the project folder, missed it or used another file of that name."""
    project = _project(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mylora.safetensors").write_bytes(b"")
    result = run_cli("slurm", "generate", "--dry-run", "--config", project / "forge.toml",
                     "--lora", "mylora.safetensors:0.7", "--lora", "mylora.safetensors",
                     cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    args = _run_printed_script(result.stdout, tmp_path, dict(os.environ)).splitlines()
    loras = [args[i + 1] for i, word in enumerate(args) if word == "--lora"]
    assert loras == [f"{elsewhere}/mylora.safetensors:0.7", f"{elsewhere}/mylora.safetensors"]


# --- the config as submitted: a queued job does not read forge.toml as edited since ---------
def _submit(tmp_path: Path, project: Path, *args: str) -> Path:
    """`loraforge slurm ARGS` with a stand-in sbatch (job 42); the job script it wrote."""
    result = run_cli("slurm", *args, cwd=project, env=_stand_in(tmp_path, "sbatch", "echo 42"))
    assert result.returncode == 0, result.stderr
    (job,) = json.loads((project / "store" / "jobs" / "jobs.json").read_text())["jobs"]
    return Path(job["script"])


def _run_job(script: Path) -> subprocess.CompletedProcess[str]:
    """The written job script run by bash, as the node runs it (no SLURM: no requeue)."""
    env = {k: v for k, v in os.environ.items() if k != "LORAFORGE_STORAGE_ROOT"}
    return subprocess.run(["bash", str(script)], cwd=script.parent, capture_output=True,
                          text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})


def _exported_copy(script: Path) -> Path:
    """The copy of the config the job script tells loraforge to read."""
    prefix = "export LORAFORGE_SUBMITTED_CONFIG="
    lines = [line for line in script.read_text().splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, f"{script} exports no copy of the config it was submitted with"
    return Path(lines[0][len(prefix):])


def _one_epoch(project: Path) -> Path:
    config = project / "forge.toml"
    config.write_text(config.read_text().replace("epochs = 3\n", "epochs = 1\n"))
    return config


def test_a_queued_job_trains_the_config_as_submitted_not_as_edited_since(
        tmp_path: Path, tiny_store: Path) -> None:
    """The job ran `loraforge train --config forge.toml` and read the file when it started:
    edits made while it waited in the queue (the next experiment being tuned) were trained,
    silently. It trains what was submitted, and its log names what was edited since."""
    project = _project(tmp_path, tiny_store=tiny_store)
    config = _one_epoch(project)
    script = _submit(tmp_path, project, "train")
    config.write_text(config.read_text().replace("network_dim = 4\n", "network_dim = 8\n")
                      .replace("[train]\n", "[train]\nseed = 7\n"))
    done = _run_job(script)
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((project / "store" / "Multi_Concept_Output" / "multi_concept"
                         / "run.json").read_text())
    assert record["status"] == "finished"
    assert record["config"]["train"]["network_dim"] == 4
    assert record["config"]["train"]["seed"] != 7
    note = (f"note: {config} was edited after this job was submitted; this job uses the config "
            f"as it was submitted (kept in {_exported_copy(script)}); the edits apply to the "
            "next submission.")
    assert note in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    changed = lines[lines.index(next(line for line in lines if line.startswith(note))) + 1:][:2]
    assert changed == ["  train.network_dim: 4 -> 8", "  train.seed: (not set) -> 7"], lines


def test_a_job_whose_config_was_not_edited_says_nothing_of_it(tmp_path: Path,
                                                              tiny_store: Path) -> None:
    project = _project(tmp_path, tiny_store=tiny_store)
    config = _one_epoch(project)
    script = _submit(tmp_path, project, "train")
    done = _run_job(script)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "edited" not in done.stdout + done.stderr
    # a comment (or spacing) edited changes no setting: the requeued job says nothing either
    config.write_text("# tuning the next run\n" + config.read_text())
    again = _run_job(script)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already finished" in again.stderr and "edited" not in again.stdout + again.stderr


def test_a_job_whose_submitted_config_is_gone_says_so_and_how_to_resubmit(
        tmp_path: Path, tiny_store: Path) -> None:
    project = _project(tmp_path, tiny_store=tiny_store)
    script = _submit(tmp_path, project, "train")
    copy = _exported_copy(script)
    copy.unlink()
    done = _run_job(script)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    error = done.stderr.replace("\n", " ")
    for needle in (f"{copy}: cannot be read (No such file or directory)",
                   f"this job runs with this copy of {project / 'forge.toml'} as it was "
                   "submitted", "fix: submit the job again"):
        assert needle in error, (needle, done.stderr)
    assert not (project / "store" / "Multi_Concept_Output").exists()


@pytest.mark.parametrize("command", [  # a generation reading forge.toml is small: it fails fast
    ["generate", "--lora", "none", "--set", "generate.steps=1", "--set", "generate.width=128",
     "--set", "generate.height=128"], ["tag", "--gpus", "0"]])
def test_generation_and_tagging_jobs_read_the_submitted_config_too(
        tmp_path: Path, tiny_store: Path, command: list[str]) -> None:
    """The script a dry run prints names the copy a submission would keep; run without it,
    `loraforge generate` and `dataset tag` refuse as `train` does: they read the copy."""
    project = _project(tmp_path, tiny_store=tiny_store)
    dry = run_cli("slurm", *command, "--dry-run", cwd=project)
    assert dry.returncode == 0, dry.stderr
    script = tmp_path / "printed.ssub"
    script.write_text(dry.stdout[dry.stdout.index("#!/bin/bash"):dry.stdout.index("# would")])
    copy = _exported_copy(script)
    assert not copy.exists()
    done = _run_job(script)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert f"{copy}: cannot be read (No such file or directory)" in done.stderr, done.stderr
    assert "fix: submit the job again" in done.stderr.replace("\n", " ")


def test_a_queued_generation_renders_the_config_as_submitted(tmp_path: Path,
                                                            tiny_store: Path) -> None:
    """`slurm generate`, then forge.toml's generate.seed edited while the job waits: the job
    renders with the seed it was submitted with, and its log names the edit."""
    project = _project(tmp_path, tiny_store=tiny_store)
    config = project / "forge.toml"
    config.write_text(config.read_text() + "[generate]\nseed = 5\n")
    script = _submit(tmp_path, project, "generate", "--lora", "none", "--set",
                     "generate.steps=1", "--set", "generate.width=128", "--set",
                     "generate.height=128")
    config.write_text(config.read_text().replace("seed = 5", "seed = 7"))
    done = _run_job(script)
    assert done.returncode == 0, done.stdout + done.stderr
    images = sorted(p.name for p in (project / "store" / "Final_Images").glob("scene-*.png"))
    assert images == ["scene-5.png", "scene-5.pose.png"], images  # the image and its pose
    assert "  generate.seed: 5 -> 7" in done.stderr, done.stderr


def test_each_submission_keeps_the_config_it_submitted_for_its_job(tmp_path: Path,
                                                                  tiny_store: Path) -> None:
    """The script exports where the copy is; submissions of the same file share one copy, an
    edited file gets its own and the copy a queued job reads stays as it was."""
    project = _project(tmp_path, tiny_store=tiny_store)
    config = project / "forge.toml"
    submitted = config.read_bytes()
    env = _stand_in(tmp_path, "sbatch", "echo 42")
    for _ in range(2):
        assert run_cli("slurm", "train", cwd=project, env=env).returncode == 0
    configs = project / "store" / "jobs" / "configs"
    (copy,) = configs.iterdir()
    assert copy.read_bytes() == submitted
    assert copy.stat().st_mode & 0o777 == 0o644
    for script in (project / "store" / "jobs").glob("*.ssub"):
        lines = script.read_text().splitlines()
        assert f"export LORAFORGE_SUBMITTED_CONFIG={copy}" in lines
        assert f"export LORAFORGE_SUBMITTED_FROM={config}" in lines
    config.write_text(config.read_text().replace("epochs = 3", "epochs = 4"))
    assert run_cli("slurm", "train", cwd=project, env=env).returncode == 0
    (edited,) = set(configs.iterdir()) - {copy}
    assert edited.read_bytes() == config.read_bytes() and copy.read_bytes() == submitted
    # a pipeline's generation reads the copy its training reads; a dry run writes none
    config.write_text(config.read_text().replace("epochs = 4", "epochs = 5"))
    dry = run_cli("slurm", "pipeline", "--dry-run", cwd=project)
    assert dry.returncode == 0, dry.stderr
    exports = [line for line in dry.stdout.splitlines()
               if line.startswith("export LORAFORGE_SUBMITTED_CONFIG=")]
    assert len(exports) == 2 and exports[0] == exports[1]
    assert set(configs.iterdir()) == {copy, edited}


def test_mark_failed_records_the_reason(tmp_path: Path) -> None:
    project = _project(tmp_path)
    run_dir = project / "store" / "Multi_Concept_Output" / "r9"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"name": "r9", "status": "interrupted"}))
    result = run_cli("slurm", "mark-failed", "--run", "r9", "--reason", "gave up", cwd=project)
    assert result.returncode == 0, result.stderr
    record = json.loads((run_dir / "run.json").read_text())
    assert (record["status"], record["error"]) == ("failed", "gave up")
    # In its job, with forge.toml half edited since the submission: the submitted copy serves.
    config = project / "forge.toml"
    copy = tmp_path / "submitted.toml"
    copy.write_bytes(config.read_bytes())
    config.write_text(config.read_text() + "[train\n")
    result = run_cli("slurm", "mark-failed", "--config", config, "--run", "r9", "--reason",
                     "requeued too often", cwd=project,
                     env={"LORAFORGE_SUBMITTED_CONFIG": str(copy),
                          "LORAFORGE_SUBMITTED_FROM": str(config)})
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "run.json").read_text())["error"] == "requeued too often"


def test_runs_lists_status_loss_and_the_swept_values(tmp_path: Path) -> None:
    project = _project(tmp_path)
    runs = project / "store" / "Multi_Concept_Output"
    for name, status, loss, lr in (("a", "finished", 0.1234, 1e-4), ("b", "failed", None, 5e-4),
                                   ("c", "running", None, 1e-4)):
        (runs / name).mkdir(parents=True)
        record = {"name": name, "status": status, "final_loss": loss, "step": 3,
                  "total_steps": 4, "updated_at": f"2026-01-0{ord(name) - 96}",
                  "config": {"train": {"unet_lr": lr, "epochs": 2, "run_name": name}},
                  "slurm": {"job_id": "77"}}
        if status == "failed":
            record["error"] = "out of memory"
        (runs / name / "run.json").write_text(json.dumps(record))
    table = run_cli("runs", cwd=project)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    row = next(line for line in lines if " a " in line)
    assert "finished" in row and "0.1234" in row and "0.0001" in row
    assert "unet_lr" in table.stdout and "epochs" not in table.stdout
    assert "out of memory" in table.stdout
    data = json.loads(run_cli("runs", "--json", cwd=project).stdout)
    assert [r["name"] for r in data] == ["a", "b", "c"]
    assert data[0]["params"] == {"train.unet_lr": 1e-4}
    assert data[0]["job_id"] == "77"


def test_a_run_whose_record_cannot_be_read_is_listed_as_damaged_not_hidden(
        tmp_path: Path) -> None:
    """Such a run vanished from `runs` ("no runs yet"), though its LoRA was on disk."""
    project = _project(tmp_path)
    run_dir = project / "store" / "Multi_Concept_Output" / "lost"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text('{"name": ')
    (run_dir / "lost.safetensors").write_bytes(b"kept")
    (data,) = json.loads(run_cli("runs", "--json", cwd=project).stdout)
    assert (data["name"], data["status"]) == ("lost", "damaged")
    assert data["error"].startswith("run.json cannot be read (not JSON: "), data
    table = run_cli("runs", cwd=project).stdout
    assert "damaged" in table and "run.json cannot be read" in table
    # Beside it, the runs' settings that differ are the ones that differ between readable runs
    # (the damaged one records none), and a record's impossible pid is no crash.
    for name, lr in (("a", 1e-4), ("b", 5e-4)):
        (run_dir.parent / name).mkdir()
        (run_dir.parent / name / "run.json").write_text(json.dumps({
            "name": name, "status": "running", "pid": 2**63, "process_hosts": [this_host()],
            "config": {"train": {"unet_lr": lr, "seed": 1}, "dataset": {"resolution": 512}}}))
    data = json.loads(run_cli("runs", "--json", cwd=project).stdout)
    assert {r["name"]: (r["status"], r["params"]) for r in data} == {
        "a": ("running", {"train.unet_lr": 1e-4}), "b": ("running", {"train.unet_lr": 5e-4}),
        "lost": ("damaged", {"train.unet_lr": None})}
    (lost,) = [line for line in run_cli("runs", cwd=project).stdout.splitlines()
               if line.startswith("│ lost")]
    assert "None" not in lost and "│ ?" in lost  # its settings are unknown, not None


def test_a_copied_run_folder_is_listed_by_its_own_name(tmp_path: Path) -> None:
    """Both rows read "a" before, though `--run a-backup` is what reaches the copy."""
    project = _project(tmp_path)
    runs = project / "store" / "Multi_Concept_Output"
    (runs / "a").mkdir(parents=True)
    (runs / "a" / "run.json").write_text(json.dumps({"name": "a", "status": "finished",
                                                    "updated_at": "2026-01-01"}))
    shutil.copytree(runs / "a", runs / "a-backup")
    data = json.loads(run_cli("runs", "--json", cwd=project).stdout)
    assert sorted((r["name"], r["moved"]) for r in data) == [
        ("a", None), ("a-backup", "copied or renamed from a")]
    assert "copied or renamed from a" in run_cli("runs", cwd=project).stdout


def test_runs_and_report_skip_a_run_json_that_is_not_a_run_record(tmp_path: Path) -> None:
    """A hand-edited or foreign run.json (a list; a config that is not a table): the other
    runs are still listed, and `report` still finds them, without a traceback; the list is a
    damaged run."""
    project = _project(tmp_path)
    runs = project / "store" / "Multi_Concept_Output"
    for name, text in (("good", json.dumps({"name": "good", "status": "finished", "config": {
            "train": {"unet_lr": 1e-4}}})), ("listed", "[]"),
            ("odd", json.dumps({"name": "odd", "status": "failed", "config": "zz"}))):
        (runs / name).mkdir(parents=True)
        (runs / name / "run.json").write_text(text)
    table = run_cli("runs", "--json", cwd=project)
    assert table.returncode == 0, table.stderr
    assert sorted((r["name"], r["status"]) for r in json.loads(table.stdout)) == [
        ("good", "finished"), ("listed", "damaged"), ("odd", "failed")]
    report = run_cli("report", "nosuch", cwd=project)
    assert_user_error(report, "nosuch", "good")


def test_a_file_system_refusal_no_check_foresaw_is_one_message(tmp_path: Path) -> None:
    """A folder where the report goes: an IsADirectoryError traceback before."""
    project = _project(tmp_path)
    run = project / "store" / "Multi_Concept_Output" / "r"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"name": "r", "status": "finished"}))
    (run / "report.html").mkdir()
    result = run_cli("report", "r", cwd=project)
    assert_user_error(result, "report.html", "that you may write there")
    assert (run / "report.html").is_dir()


def test_values_of_the_wrong_kind_in_a_run_json_count_as_absent(tmp_path: Path) -> None:
    """One hand-edited run.json (a time as a number, a status as a number, a section that is
    not a table) made `runs`, `report`, and a plain `generate` or `eval` crash for every run."""
    project = _project(tmp_path)
    runs = project / "store" / "Multi_Concept_Output"
    (runs / "odd").mkdir(parents=True)
    (runs / "odd" / "run.json").write_text(json.dumps({
        "name": "odd", "status": 5, "finished_at": 20260101, "slurm": "x", "error": 5,
        "final_loss": "low", "step": "3", "config": {"train": 5, "dataset": {"resolution": 64}}}))
    (runs / "good").mkdir()
    (runs / "good" / "run.json").write_text(json.dumps({
        "name": "good", "status": "finished", "finished_at": "2026-01-02T00:00:00+0000"}))
    listed = run_cli("runs", "--json", cwd=project)
    assert listed.returncode == 0, listed.stderr
    assert {r["name"]: r["status"] for r in json.loads(listed.stdout)} == {
        "odd": None, "good": "finished"}
    table = run_cli("runs", cwd=project)
    assert table.returncode == 0 and "Traceback" not in table.stderr, table.stderr
    report = run_cli("report", "odd", cwd=project)
    assert report.returncode == 0, report.stderr


def test_runs_under_a_storage_root_variable_that_points_nowhere_says_so(tmp_path: Path) -> None:
    project = _project(tmp_path)
    empty = run_cli("runs", cwd=project)  # a new project: its storage root comes with training
    assert empty.returncode == 0 and "no runs yet" in empty.stdout, empty.stderr
    nowhere = {"LORAFORGE_STORAGE_ROOT": str(tmp_path / "nope")}
    result = run_cli("runs", cwd=project, env=nowhere)
    assert_user_error(result, "nope", "is not a folder", "LORAFORGE_STORAGE_ROOT")
    for command in (["models", "list"], ["models", "verify"]):  # "no models under" before
        result = run_cli(*command, cwd=project, env=nowhere)
        assert_user_error(result, "nope", "no models to list", "LORAFORGE_STORAGE_ROOT")
    assert not (tmp_path / "nope").exists()


def test_slurm_status_without_submissions_says_how_to_submit(tmp_path: Path) -> None:
    """No jobs is an answer (exit 0), as `slurm cancel` with nothing to cancel is."""
    result = run_cli("slurm", "status", cwd=_project(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "no jobs yet" in result.stdout and "loraforge slurm train" in result.stdout


@pytest.mark.parametrize("ledger", ["[]", '{"jobs": 5}', '{"jobs": [5]}',
                                    '{"jobs": [{"job_id": 5}]}', "{bad"])
def test_a_damaged_job_record_is_named_and_nothing_is_queued(tmp_path: Path, ledger: str,
                                                             tiny_store: Path) -> None:
    """A record of the wrong shape crashed status, logs and cancel; a damaged one stopped a
    submission only after sbatch had queued the job, so a user who resubmitted ran it twice."""
    project = _project(tmp_path, tiny_store=tiny_store)
    record = project / "store" / "jobs" / "jobs.json"
    record.parent.mkdir(parents=True)
    record.write_text(ledger)
    for command in (["status"], ["logs"], ["cancel"]):
        assert_user_error(run_cli("slurm", *command, cwd=project), "jobs.json", "cannot be read",
                          "move it away")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch-calls"
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\necho 42\n")
    (bin_dir / "sbatch").chmod(0o755)
    result = run_cli("slurm", "train", cwd=project,
                     env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert_user_error(result, "jobs.json", "cannot be read")
    assert not calls.exists()
    assert record.read_text() == ledger


def _stand_in(tmp_path: Path, name: str, body: str) -> dict[str, str]:
    """A stand-in SLURM program on PATH (a shell script with `body`); the environment for it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
    (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_the_job_record_is_shared_with_the_group_by_the_file_mode(tmp_path: Path,
                                                                  tiny_store: Path) -> None:
    """With storage.file_mode "0664", jobs/, its scripts, jobs.json and .jobs.lock were made
    for their owner alone: the group's next member got Permission denied writing them."""
    project = _project(tmp_path, tiny_store=tiny_store)
    config = project / "forge.toml"
    config.write_text(config.read_text().replace('root = "store"\n',
                                                 'root = "store"\nfile_mode = "0664"\n'))
    result = run_cli("slurm", "train", cwd=project, env=_stand_in(tmp_path, "sbatch", "echo 42"))
    assert result.returncode == 0, result.stderr
    jobs = project / "store" / "jobs"
    (script,) = jobs.glob("*.ssub")
    (copy,) = (jobs / "configs").iterdir()  # the config as submitted, which the job reads
    modes = {path.name: path.stat().st_mode & 0o777
             for path in (jobs, script, jobs / "jobs.json", jobs / ".jobs.lock", copy.parent,
                          copy)}
    assert modes == {"jobs": 0o775, script.name: 0o764, "jobs.json": 0o664, ".jobs.lock": 0o664,
                     "configs": 0o775, copy.name: 0o664}


def test_a_queued_job_whose_record_fails_is_named_and_not_submitted_twice(
        tmp_path: Path, tiny_store: Path) -> None:
    """The record failing after sbatch queued the job showed an error without the job id, and
    the advice to run the command again queued it a second time."""
    project = _project(tmp_path, tiny_store=tiny_store)
    env = _stand_in(tmp_path, "sbatch", "mkdir -p store/jobs/jobs.json\necho 42")
    result = run_cli("slurm", "train", cwd=project, env=env)
    assert_user_error(result, "submitted job 42", "job 42 is queued; only its record failed",
                      "jobs.json", "do not submit it again", "scancel 42")
    assert "run the same command again" not in result.stderr
    assert "move it away" not in result.stderr


def test_a_job_record_another_user_keeps_to_himself_is_a_permission_not_damage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another member's jobs.json that may not be read was "damaged: move it away", which
    discards everyone's records. (The refusal is simulated: root reads any file.)"""
    from loraforge.slurm import jobs

    record = tmp_path / "jobs" / "jobs.json"
    record.parent.mkdir()
    record.write_text('{"jobs": []}')
    (record.parent / ".jobs.lock").touch()

    def refused(path: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "read_text", refused)
    monkeypatch.setattr(jobs, "open", refused, raising=False)
    for attempt in (lambda: jobs.load_jobs(tmp_path),
                    lambda: jobs.record_jobs(tmp_path, [], 0o664)):
        with pytest.raises(ForgeError) as error:
            attempt()
        text = str(error.value)
        assert "permission denied (it belongs to " in text and "chmod g+rw" in text, text
        assert 'storage.file_mode = "0664"' in text and "move it away" not in text, text
    assert record.read_bytes() == b'{"jobs": []}'


def test_a_half_submitted_pipeline_names_the_queued_training(tmp_path: Path,
                                                               tiny_store: Path) -> None:
    """sbatch refusing the generation after it queued the training said nothing of the queued
    job: running the command again queued a second training."""
    project = _project(tmp_path, tiny_store=tiny_store)
    env = _stand_in(tmp_path, "sbatch", 'case "$*" in *--dependency*) echo "sbatch: error: '
                    'invalid partition" >&2; exit 1;; esac\necho 42')
    result = run_cli("slurm", "pipeline", cwd=project, env=env)
    assert_user_error(result, "sbatch refused the job: sbatch: error: invalid partition",
                      "job 42 is already queued", "`loraforge slurm cancel 42`", "`scancel 42`",
                      "`loraforge slurm generate --lora multi_concept`")
    assert "submitted job 42: train-multi_concept" in result.stdout
    (job,) = json.loads((project / "store" / "jobs" / "jobs.json").read_text())["jobs"]
    assert job["job_id"] == "42"


def test_help_is_fast_and_lists_the_commands() -> None:
    started = time.monotonic()
    result = run_cli("slurm", "--help")
    assert result.returncode == 0
    for command in ("train", "generate", "pipeline", "sweep", "tag", "status", "cancel", "logs"):
        assert command in result.stdout
    assert "mark-failed" not in result.stdout
    assert time.monotonic() - started < 20


def test_script_words_are_quoted_for_bash() -> None:
    from loraforge.slurm.script import Raw, quote

    assert quote("a b") == "'a b'"
    assert quote("$(x)") == "'$(x)'"
    assert quote(Raw('"$RUN"')) == '"$RUN"'


def test_a_site_wrapper_that_hides_the_job_id_or_a_refused_scancel_is_named(
        tmp_path: Path, tiny_store: Path) -> None:
    """Sites wrap sbatch and scancel. A wrapper that drops --parsable answers prose: the user
    is told it may have queued the job and how to look. A scancel refused (another user's
    job), or a controller scontrol cannot reach, is named with its own words, exit 1."""
    project = _project(tmp_path, tiny_store=tiny_store)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = {"sbatch": 'echo "Submitted batch job 42"',
             "scontrol": 'echo "JobId=$4 JobName=lf JobState=RUNNING"',
             "scancel": 'echo "scancel: error: Kill job error on job id $1: Access/permission '
                        'denied" >&2; exit 1'}
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = run_cli("slurm", "train", cwd=project, env=env)
    assert_user_error(result, "sbatch answered 'Submitted batch job 42', not a job id",
                      "squeue --me", "must pass `--parsable` through")
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 42\n")
    assert run_cli("slurm", "train", cwd=project, env=env).returncode == 0
    result = run_cli("slurm", "cancel", cwd=project, env=env)
    assert_user_error(result, "scancel failed", "job id 42: Access/permission denied",
                      "squeue --me")
    # A controller that does not answer: the job may still run, so neither "nothing to cancel"
    # nor "gone from SLURM" may be said.
    (bin_dir / "scontrol").write_text(
        "#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller (connect "
        "failure)' >&2\nexit 1\n")
    for command in ("cancel", "status"):
        result = run_cli("slurm", command, cwd=project, env=env)
        assert_user_error(result, "scontrol could not reach the SLURM controller",
                          "state of job 42 is unknown", "sinfo")


def test_a_job_sbatch_sent_to_another_cluster_is_recorded_on_that_cluster(
        tmp_path: Path, tiny_store: Path) -> None:
    """`slurm.extra = ["--clusters=beta"]` from a login node of cluster alpha: sbatch answers
    `555;beta`. jobs.json recorded alpha, so `slurm cancel` scancelled alpha's job 555, a
    stranger's, and `status` showed its state."""
    project = _project(tmp_path, tiny_store=tiny_store)
    env = _stand_in(tmp_path, "sbatch", 'echo "555;beta"')
    _stand_in(tmp_path, "scontrol", 'if [ "$2" = config ]; then echo "ClusterName = alpha"; '
              'exit 0; fi\necho "JobId=$4 JobName=stranger JobState=RUNNING"')
    calls = tmp_path / "scancel.calls"
    _stand_in(tmp_path, "scancel", f'echo "$@" >> {calls}')
    result = run_cli("slurm", "train", cwd=project, env=env)
    assert result.returncode == 0, result.stderr
    assert "submitted job 555" in result.stdout
    (entry,) = json.loads((project / "store" / "jobs" / "jobs.json").read_text())["jobs"]
    assert (entry["job_id"], entry["cluster"]) == ("555", "beta")
    result = run_cli("slurm", "status", "--json", cwd=project, env=env)
    assert [row["state"] for row in json.loads(result.stdout)] == ["(on cluster beta)"]
    result = run_cli("slurm", "cancel", cwd=project, env=env)
    assert result.returncode == 0 and not calls.exists(), result.stdout + result.stderr
    assert "job 555 was submitted to cluster beta, not this one (alpha)" in result.stderr
    # not "nothing to cancel: no pending or running job", as if the job had ended
    assert "nothing to cancel: no pending or running job on this cluster" in result.stdout
