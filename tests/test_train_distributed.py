"""Data-parallel training: real worker processes on CPU (gloo) train the tiny model exactly as one
process with the same global batch does, stay in step, and resume from a state saved mid-epoch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import assert_user_error, run_cli, write_training_project
from test_train import _interrupt_at, _start_train

from loraforge.errors import ForgeError
from loraforge.train.distributed import (
    World,
    check_local_gpus,
    device_for,
    launch_local,
    shard,
    world_from_env,
)
from loraforge.train.signals import RESUMABLE_EXIT

FIXED_ENV = {"SOURCE_DATE_EPOCH": "1767225600"}
# SGD with momentum (state to save and resume) compares the data-parallel arithmetic itself:
# two processes add their gradients in another order than one process does, and Adam divides
# every gradient by its own size, so on a gradient near its eps (1e-8) that rounding becomes a
# visible difference (5e-5 after one step with lr 5e-4 on the tiny model); SGD keeps it at 2e-9.
# fp32 files, so the comparison sees every bit.
TRAIN = {"epochs": 2, "optimizer": "torch.optim.SGD", "optimizer_args": {"momentum": 0.9},
         "unet_lr": 0.05, "text_encoder_lr": 0.01, "save_precision": "fp32"}
RUN = "multi_concept"


def _project(root: Path, tiny_store: Path, train: dict[str, object]) -> Path:
    """21 examples per epoch (red knight: 2 images x 9 repeats, blue mage: 3 images), so a global
    batch of 4 gives five batches of 4 and one of 1, which two processes split 1 + 0."""
    config = write_training_project(root, tiny_store, {**TRAIN, **train})
    data = root / "master_dataset"
    (data / "1_red_knight").rename(data / "9_red_knight")
    shutil.copy(data / "1_blue_mage" / "1.png", data / "1_blue_mage" / "2.png")
    (data / "1_blue_mage" / "2.txt").write_text("blue_mage, solo, sitting")
    return config


def _run_dir(config: Path) -> Path:
    return config.parent / "store" / "Multi_Concept_Output" / RUN


def _weights(config: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    return load_file(str(_run_dir(config) / f"{RUN}.safetensors"))


def _largest_difference(a: dict[str, object], b: dict[str, object]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)  # type: ignore[operator]


def _history(config: Path) -> list[dict[str, object]]:
    lines = (_run_dir(config) / "history.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@dataclass
class Runs:
    single: Path
    pair: Path
    pair_result: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def runs(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """One process with batch 4, and two processes with batch 2 each (global batch 4)."""
    root = tmp_path_factory.mktemp("distributed")
    single = _project(root / "single", tiny_store, {"batch_size": 4})
    pair = _project(root / "pair", tiny_store, {"batch_size": 2, "gpus": 2})
    done = run_cli("train", "--config", single, env=FIXED_ENV)
    assert done.returncode == 0, done.stderr
    pair_result = run_cli("train", "--config", pair, env=FIXED_ENV)
    assert pair_result.returncode == 0, pair_result.stderr
    return Runs(single, pair, pair_result)


def test_two_processes_train_what_one_process_trains_with_the_same_global_batch(
        runs: Runs) -> None:
    assert _largest_difference(_weights(runs.single), _weights(runs.pair)) < 1e-5
    history = _history(runs.pair)
    assert [h["step"] for h in history] == list(range(1, 13))  # 6 batches per epoch, 2 epochs
    # Both processes held identical weights after every step.
    assert all(h["replica_spread"] == 0.0 for h in history)
    record = json.loads((_run_dir(runs.pair) / "run.json").read_text())
    assert record["status"] == "finished"
    assert (record["processes"], record["global_batch_size"]) == (2, 4)
    assert len(record["process_hosts"]) == 2
    # Only rank 0 reports: one progress line per step, one final line.
    assert runs.pair_result.stdout.count("step 12/12") == 1
    assert runs.pair_result.stdout.count("LoRA: ") == 1
    assert "[rank 1]" not in runs.pair_result.stderr


def test_torchrun_launches_the_same_training(runs: Runs, tmp_path: Path) -> None:
    """`torchrun -m loraforge train` instead of train.gpus: the same two ranks, the same file."""
    project = tmp_path / "torchrun"
    shutil.copytree(runs.pair.parent, project, ignore=shutil.ignore_patterns("store"))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "loraforge", "train", "--config", str(project / "forge.toml")],
        capture_output=True, text=True, timeout=600, env={**os.environ, **FIXED_ENV,
                                                           "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((_run_dir(project / "forge.toml") / "run.json").read_text())
    assert record["processes"] == 2
    assert (_run_dir(project / "forge.toml") / f"{RUN}.safetensors").read_bytes() == \
        (_run_dir(runs.pair) / f"{RUN}.safetensors").read_bytes()


def test_lora_metadata_records_the_per_process_and_the_global_batch(runs: Runs) -> None:
    from safetensors import safe_open

    with safe_open(str(_run_dir(runs.pair) / f"{RUN}.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert (meta["ss_batch_size_per_device"], meta["ss_total_batch_size"]) == ("2", "4")
    assert meta["ss_num_batches_per_epoch"] == "6"


def test_two_process_run_resumed_mid_epoch_equals_the_uninterrupted_one(
        runs: Runs, tiny_store: Path, tmp_path: Path) -> None:
    config = _project(tmp_path / "pair", tiny_store, {"batch_size": 2, "gpus": 2})
    process = _start_train(config, FIXED_ENV)
    out, err = _interrupt_at(process, step=1)
    assert process.returncode == RESUMABLE_EXIT, (out, err)
    assert "rerun the same command" in err
    state = json.loads(next((_run_dir(config) / "state").glob("step-*/position.json"))
                       .read_text())["position"]
    assert state["epoch"] == 0 and 0 < state["batch_in_epoch"] < 6  # mid-epoch
    assert json.loads((_run_dir(config) / "run.json").read_text())["status"] == "interrupted"

    # The same state resumes on one process with the same global batch...
    alone = tmp_path / "alone"
    shutil.copytree(tmp_path / "pair", alone)
    alone_config = alone / "forge.toml"
    refused = run_cli("train", "--config", alone_config, "--set", "train.gpus=1")
    assert_user_error(refused, "cannot resume", "train.global_batch_size: 4 -> 2",
                      "raise train.batch_size")
    moved = run_cli("train", "--config", alone_config, "--set", "train.gpus=1",
                    "--set", "train.batch_size=4", env=FIXED_ENV)
    assert moved.returncode == 0, moved.stderr
    assert "resuming from" in moved.stderr
    assert _largest_difference(_weights(runs.pair), _weights(alone_config)) < 1e-5

    # ... and on two processes, where it gives the uninterrupted run's file, bit for bit.
    again = run_cli("train", "--config", config, env=FIXED_ENV)
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stderr
    straight = (_run_dir(runs.pair) / f"{RUN}.safetensors").read_bytes()
    assert (_run_dir(config) / f"{RUN}.safetensors").read_bytes() == straight


def test_linear_lr_scaling_is_explicit_and_recorded(tiny_store: Path, tmp_path: Path) -> None:
    config = _project(tmp_path, tiny_store, {"batch_size": 2, "gpus": 2, "scale_lr": "linear",
                                             "max_steps": 1})
    done = run_cli("train", "--config", config, env=FIXED_ENV)
    assert done.returncode == 0, done.stderr
    assert _history(config)[0]["lr"] == [0.1, 0.02]  # 0.05 and 0.01, times 2 processes
    from safetensors import safe_open

    with safe_open(str(_run_dir(config) / f"{RUN}.safetensors"), "pt") as fh:
        assert fh.metadata()["ss_unet_lr"] == "0.1"


def test_shards_are_disjoint_contiguous_and_cover_the_global_batch() -> None:
    for size in (1, 2, 3, 4):
        for length in range(0, 9):
            batch = list(range(100, 100 + length))
            parts = [shard(batch, World(rank, size)) for rank in range(size)]
            assert [i for _, part in parts for i in part] == batch
            assert [start for start, _ in parts] == [sum(len(p) for _, p in parts[:r])
                                                     for r in range(size)]
            sizes = [len(part) for _, part in parts]
            assert max(sizes) - min(sizes) <= 1


def test_world_comes_from_torchrun_or_srun_and_needs_a_meeting_point() -> None:
    assert world_from_env({}) == World()
    assert world_from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                           "MASTER_ADDR": "h", "MASTER_PORT": "1"}) == World(1, 4, 1)
    srun = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
            "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert world_from_env(srun) == World(5, 8, 1)
    # The batch script of a multi-node job is no step: it is not a training process.
    assert world_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) == World()
    with pytest.raises(ForgeError, match="MASTER_ADDR and MASTER_PORT"):
        world_from_env({k: v for k, v in srun.items() if not k.startswith("MASTER")})


def test_a_failing_worker_stops_the_others_and_its_exit_code_is_returned(tmp_path: Path) -> None:
    """Rank 1 fails at once; rank 0 would wait for it forever (as in a collective)."""
    script = ("import os, sys, time\n"
              "if os.environ['RANK'] == '1': sys.exit(3)\n"
              "time.sleep(120)\n")
    started = time.monotonic()
    assert launch_local(2, [sys.executable, "-c", script], grace=0.5) == 3
    assert time.monotonic() - started < 60  # rank 0 was stopped, not waited for


def test_ranks_disagreeing_on_the_weights_are_detected(tmp_path: Path) -> None:
    script = tmp_path / "spread.py"
    script.write_text(
        "import os, sys, torch\n"
        "from loraforge.train import distributed as d\n"
        "world = d.world_from_env()\n"
        "d.join(world, torch.device('cpu'))\n"
        "params = [torch.ones(3), torch.full((2,), 1.0 + world.rank)]\n"
        "spread = d.replica_spread(params, world)\n"
        "same = d.replica_spread(params[:1], world)\n"
        "d.leave(world, clean=True)\n"
        f"open('{tmp_path}/spread-' + str(world.rank), 'w').write(f'{{spread}} {{same}}')\n")
    assert launch_local(2, [sys.executable, str(script)]) == 0
    for rank in (0, 1):
        spread, same = map(float, (tmp_path / f"spread-{rank}").read_text().split())
        assert same == 0.0
        assert spread == pytest.approx(2 ** 0.5)  # |(2, 2)| - |(1, 1)|


def test_more_processes_than_gpus_is_refused_before_any_starts(monkeypatch: pytest.MonkeyPatch,
                                                               ) -> None:
    """A machine with 2 GPUs (the GPU is what cannot exist here, so it is faked)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_local_gpus(2)
    with pytest.raises(ForgeError, match=r"train\.gpus = 4 but this machine has 2 GPUs"):
        check_local_gpus(4)


def test_each_process_takes_its_own_gpu_or_the_one_slurm_bound_to_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A node with 4 GPUs, and a task SLURM bound to one (the GPUs are faked; set_device too)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for name in ("CUDA_VISIBLE_DEVICES", "SLURM_PROCID", "RANK"):
        monkeypatch.delenv(name, raising=False)
    assert device_for(World(3, 4, 3), 4) == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ForgeError, match="wants GPU 1 but this node has 1"):
        device_for(World(1, 2, 1), 2)  # torchrun with one visible GPU: a clear error
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert device_for(World(1, 2, 1), 2) == torch.device("cuda", 0)
