"""Pieces of the training state a user sees: the smoothed loss, and why a resume is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_training_project

from loraforge.train.state import Position, config_differences


def test_smoothed_loss_starts_at_the_loss_not_near_zero() -> None:
    position = Position()
    for _ in range(3):
        position.step += 1
        position.loss_ema = 0.98 * position.loss_ema + 0.02 * 0.8
        assert position.smoothed_loss(0.98) == pytest.approx(0.8)


def _journal(run_dir: Path, losses: list[float], on_gpu: bool) -> tuple[list[dict], float,
                                                                        list[int]]:
    """Record `losses` as steps 1..n: the history lines (without their time), the moving
    average, and how many losses were still unread after each step."""
    import json

    import torch

    from loraforge.train.journal import Journal

    run_dir.mkdir()
    position = Position()
    journal = Journal(run_dir, position, len(losses), 30.0, True, on_gpu)
    unread = []
    for loss in losses:
        position.step += 1
        journal.step(1, torch.tensor(loss), [1e-4, 5e-5], 2, {})
        unread.append(len(journal.pending))
    journal.close()
    lines = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "seconds"} for line in lines], \
        position.loss_ema, unread


def test_a_gpu_run_reads_losses_in_groups_and_records_the_same_history(
        tmp_path: Path) -> None:
    """Reading a loss makes the CPU wait for the GPU, so a GPU run reads them a group at a
    time (the first at once: it shows the warm-up); every step still gets its line, with the
    same numbers as when each is read at once."""
    losses = [0.5 + 0.01 * i for i in range(20)]
    each, each_ema, each_unread = _journal(tmp_path / "cpu", losses, on_gpu=False)
    grouped, grouped_ema, grouped_unread = _journal(tmp_path / "gpu", losses, on_gpu=True)
    assert [line["step"] for line in grouped] == list(range(1, 21))
    assert grouped == each and grouped_ema == each_ema
    assert each_unread == [0] * 20
    assert grouped_unread[0] == 0 and max(grouped_unread) == 7


def test_config_differences_name_each_changed_key_but_not_ignored_ones() -> None:
    saved = {"train": {"unet_lr": 1e-3, "keep_last_n": 10}, "dataset": {"resolution": 512}}
    current = {"train": {"unet_lr": 5e-4, "keep_last_n": 3}, "dataset": {"resolution": 512}}
    assert config_differences(saved, current, {"train.keep_last_n"}) == [
        "train.unet_lr: 0.001 -> 0.0005"]


def test_learning_rates_equal_up_to_rounding_are_the_same() -> None:
    """3 processes at 1e-4 with linear scaling resume on 1 process at 3e-4."""
    assert config_differences({"train": {"unet_lr": 1e-4 * 3}}, {"train": {"unet_lr": 3e-4}},
                              set()) == []


def test_a_state_saved_by_the_single_process_version_still_resumes(tmp_path: Path,
                                                                   tiny_store: Path) -> None:
    """Before several processes a state kept `train.batch_size` and fingerprinted the images
    by absolute path; a run requeued across the upgrade must not be refused."""
    from loraforge.config import load_settings
    from loraforge.dataset.examples import build_examples
    from loraforge.dataset.scan import scan_dataset
    from loraforge.train.distributed import World
    from loraforge.train.resume import images_fingerprint, semantic_config, upgraded

    settings = load_settings(write_training_project(tmp_path, tiny_store), [])
    dataset = scan_dataset(settings.dataset_dir, ".txt")
    examples = build_examples(dataset, settings.config.dataset, lambda _: None)
    current = semantic_config(settings, examples, World())
    old_train = {k: v for k, v in current["train"].items() if k != "global_batch_size"}
    old = {**current, "train": {**old_train, "batch_size": 2},
           "images": {"dataset": images_fingerprint(examples, None)}}
    assert config_differences(upgraded(old, settings, examples), current, set()) == []
    doubled = {**old, "train": {**old_train, "batch_size": 4}}
    assert config_differences(upgraded(doubled, settings, examples), current, set()) == [
        "train.global_batch_size: 4 -> 2"]


def test_an_image_replaced_under_its_name_is_named_and_older_states_skip_the_check() -> None:
    content = {"1_x/a.png": "1111", "1_x/b.png": "2222"}
    saved = {"images": {"dataset": "abc", "content": content}}
    current = {"images": {"dataset": "abc", "content": {**content, "1_x/b.png": "3333"}}}
    assert config_differences(saved, current, set()) == [
        "images.content: 1_x/b.png is another image now (sha256 2222... -> 3333...)"]
    # a state written before image contents were recorded resumes as it did
    assert config_differences({"images": {"dataset": "abc"}}, current, set()) == []


def test_images_added_removed_or_in_a_renamed_folder_are_named_not_hashed() -> None:
    """A resume refused for other images says which, not two fingerprints of the list."""
    content = {"5_blake/0.png": "b0", "5_blake/1.png": "b1", "5_mira/0.png": "m0",
               "5_mira/7.png": "m7"}
    saved = {"images": {"dataset": "9241c2031409fbae", "content": content}}

    def differences(now: dict[str, str]) -> list[str]:
        return config_differences(saved, {"images": {"dataset": "0018611cd80b35c0",
                                                     "content": now}}, set())

    grown = {**content, "5_blake/new.png": "b0"}
    del grown["5_mira/7.png"]
    assert differences(grown) == ["images: 5_blake/new.png added", "images: 5_mira/7.png removed"]
    renamed = {name.replace("5_blake/", "10_blake/"): digest for name, digest in content.items()}
    assert differences(renamed) == ["images: concept folder 5_blake -> 10_blake"]
    many = {**content, **{f"5_mira/x{i:02d}.png": f"x{i}" for i in range(13)}}
    assert differences(many) == [f"images: 5_mira/x{i:02d}.png added" for i in range(10)] + [
        "images: and 3 more added or removed"]
    # a state written before image contents were recorded still names the list by its hash
    assert config_differences({"images": {"dataset": "9241c2031409fbae"}},
                              {"images": {"dataset": "0018611cd80b35c0", "content": grown}},
                              set()) == ["images.dataset: '9241c2031409fbae' -> '0018611cd80b35c0'"]


def test_every_allowed_seed_draws_and_small_seeds_draw_what_they_always_did() -> None:
    """The (seed, step) generator takes the config's largest seed (it overflowed torch's seed
    range, a traceback at the first step), and the seeds that trained before draw the same
    noise, so their saved states still resume exactly."""
    import torch

    from loraforge.sample_prompts import MAX_SEED
    from loraforge.train.objective import step_generator

    cpu = torch.device("cpu")
    largest = torch.randn(4, generator=step_generator(MAX_SEED, 7, cpu))
    assert torch.equal(largest, torch.randn(4, generator=step_generator(MAX_SEED, 7, cpu)))
    assert not torch.equal(largest, torch.randn(4, generator=step_generator(MAX_SEED, 8, cpu)))
    as_before = torch.Generator().manual_seed(42 * 1_000_003 + 7919 * 3 + 1)
    assert torch.equal(torch.randn(4, generator=step_generator(42, 3, cpu)),
                       torch.randn(4, generator=as_before))


@pytest.mark.parametrize("meta", [
    {"position": {"step": 3}},                                 # no config
    {"position": {"step": 3}, "config": None},
    {"position": {"step": "3"}, "config": {}},
    {"position": {"step": -5}, "config": {}},
    {"position": {"step": 3, "loss_ema": "low"}, "config": {}},
    {"position": {"steps": 3}, "config": {}},                  # a field it does not have
    {"position": {"step": 3, "loss_ema": float("nan")}, "config": {}},
    {"position": {"step": 9999}, "config": {}},                # not its folder's step
    [],
])
def test_a_hand_edited_position_file_is_a_damaged_state_not_a_traceback(
        tmp_path: Path, meta: object) -> None:
    """Each of these crashed a resume (KeyError, AttributeError, TypeError, ZeroDivisionError)."""
    import json

    import torch
    from safetensors.torch import save_file

    from loraforge.errors import ForgeError
    from loraforge.train.state import OPTIMIZER, POSITION, WEIGHTS, load_state

    state = tmp_path / "step-00000003"
    state.mkdir()
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(state / WEIGHTS))
    torch.save({"optimizer": {}}, state / OPTIMIZER)  # the rest of the state is sound
    (state / POSITION).write_text(json.dumps({"position": {"step": 3}, "config": {}}))
    assert load_state(state).position.step == 3
    (state / POSITION).write_text(json.dumps(meta))
    with pytest.raises(ForgeError, match="training state cannot be read") as refused:
        load_state(state)
    assert refused.value.path == state and "--restart" in str(refused.value.fix)


@pytest.mark.parametrize(("step", "epoch", "batch"), [
    (60, 99, 0),  # an epoch past the run's: it "finished" at once, 6 steps called final
    (9999, 5, 0),  # beyond the run's steps
    (7, 0, 1),  # a step beyond its epoch
    (12, 2, 50),  # a batch beyond an epoch's
])
def test_a_position_that_is_no_place_in_the_run_is_a_damaged_state(
        tmp_path: Path, step: int, epoch: int, batch: int) -> None:
    from loraforge.errors import ForgeError
    from loraforge.train.plan import Plan
    from loraforge.train.state import LoadedState, Position, check_position

    plan = Plan(batch_size=1, accumulation=1, batches_per_epoch=6, steps_per_epoch=6,
                total_steps=60, epochs=10)
    for fine in (Position(0, 0, 0), Position(6, 1, 0), Position(9, 1, 3), Position(60, 10, 0)):
        check_position(LoadedState(tmp_path, fine, {}, {}, {}), plan)
    with pytest.raises(ForgeError, match=r"position.json: step \d+, epoch \d+, batch \d+ is "
                       r"no place in this run of 60 steps, 10 epochs of 6") as refused:
        check_position(LoadedState(tmp_path, Position(step, epoch, batch), {}, {}, {}), plan)
    assert refused.value.path == tmp_path and "--restart" in str(refused.value.fix)
