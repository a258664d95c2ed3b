"""The training data pipeline inside real (tiny) runs: buckets, caches, per-concept overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_user_error, draw_character, run_cli, write_training_project

from loraforge.config import load_settings
from loraforge.report.html import write_report
from loraforge.runtime import go_offline
from loraforge.train.run import TrainResult, train


def _train(config: Path, run: str, *overrides: str) -> TrainResult:
    settings = load_settings(config, list(overrides))
    go_offline(settings)
    return train(settings, run, restart=False, report=write_report)


def _record(result: TrainResult) -> dict:
    return json.loads((result.final.parent / "run.json").read_text())


def _losses(result: TrainResult) -> list[float]:
    lines = (result.final.parent / "history.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.fixture()
def project(tmp_path: Path, tiny_store: Path) -> Path:
    return write_training_project(tmp_path, tiny_store, {"epochs": 1})


def test_second_run_encodes_no_image_and_a_changed_image_only_itself(project: Path) -> None:
    first = _record(_train(project, "one"))
    assert first["latent_cache"]["encoded"] == 4 and first["latent_cache"]["reused"] == 0
    second = _record(_train(project, "two"))
    assert second["latent_cache"] == {**second["latent_cache"], "encoded": 0, "reused": 4}
    draw_character(project.parent / "master_dataset" / "1_red_knight" / "0.png", (10, 200, 10),
                   "box", offset=5)
    third = _record(_train(project, "three"))
    assert third["latent_cache"]["encoded"] == 1 and third["latent_cache"]["reused"] == 3


def test_flip_augmentation_caches_a_second_latent(project: Path) -> None:
    record = _record(_train(project, "flip", "dataset.flip_aug=true"))
    assert record["latent_cache"]["encoded"] == 8


def test_text_cache_frees_the_encoder_and_keeps_the_loss_curve(project: Path) -> None:
    frozen = ("train.text_encoder_lr=0", "dataset.shuffle_caption=false", "train.epochs=2")
    cached = _train(project, "cached", *frozen)
    plain = _train(project, "plain", *frozen, "train.cache_text_encoder_outputs=false")
    assert cached.trainer is not None and cached.trainer.models.text_encoder is None
    assert plain.trainer is not None and plain.trainer.models.text_encoder is not None
    assert _record(cached)["text_cache"] is True
    a, b = _losses(cached), _losses(plain)
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5


def test_buckets_reach_the_dataset_summary_and_metadata(tmp_path: Path, tiny_store: Path) -> None:
    config = write_training_project(tmp_path, tiny_store, {"epochs": 1})
    wide = tmp_path / "master_dataset" / "1_red_knight" / "wide.png"
    from PIL import Image

    Image.new("RGB", (512, 128), (200, 30, 30)).save(wide)
    result = _train(config, "buckets", "dataset.resolution=128", "dataset.min_bucket=64")
    summary = json.loads((result.final.parent / "dataset.json").read_text())
    knight = next(c for c in summary["concepts"] if c["name"] == "red_knight")
    assert knight["buckets"] == {"128x128": 2, "256x64": 1}
    from safetensors import safe_open

    with safe_open(str(result.final), "pt") as fh:
        info = json.loads(fh.metadata()["ss_bucket_info"])
    counts = {tuple(b["resolution"]): b["count"] for b in info["buckets"].values()}
    assert counts == {(128, 128): 4, (256, 64): 1}


def test_unknown_concept_override_lists_the_real_concepts(project: Path) -> None:
    with project.open("a") as fh:
        fh.write('\n[dataset.concepts.green_elf]\nflip_aug = true\n')
    result = run_cli("train", "--config", project)
    assert_user_error(result, "green_elf", "not a concept folder", "blue_mage, red_knight")


def test_random_crop_with_cached_latents_is_refused_clearly(project: Path) -> None:
    result = run_cli("train", "--config", project, "--set", "dataset.random_crop=true")
    assert_user_error(result, "dataset.random_crop (--set dataset.random_crop=true)",
                      "cannot be cached", "train.cache_latents = false")
    assert "forge.toml" not in result.stderr  # the value came from the command line
    # refused before anything trained: no record of a failed run that never was
    assert not (project.parent / "store" / "Multi_Concept_Output" / "multi_concept" / "run.json"
                ).exists()


def test_random_crop_trains_without_the_cache(project: Path) -> None:
    result = _train(project, "crop", "dataset.random_crop=true", "dataset.color_aug=true",
                    "train.cache_latents=false")
    assert result.final.is_file() and "latent_cache" not in _record(result)


def test_keep_tokens_beyond_a_caption_warns_once_per_concept(project: Path) -> None:
    result = run_cli("train", "--config", project, "--set", "dataset.keep_tokens=9")
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "keep_tokens is 9" in line]
    assert len(warned) == 2  # one line per concept, not per image


def test_unwritable_cache_folder_trains_without_a_disk_cache(project: Path) -> None:
    store = project.parent / "store"
    store.mkdir()
    (store / "cache").write_text("a file where the cache folder should be")
    result = run_cli("train", "--config", project)
    assert result.returncode == 0, result.stderr
    assert "not writable" in result.stderr and "without a disk cache" in result.stderr


def test_corrupt_cache_entry_is_re_encoded_with_a_warning(project: Path) -> None:
    _train(project, "warm")
    entries = sorted((project.parent / "store" / "cache" / "latents").rglob("*.safetensors"))
    assert len(entries) == 4
    entries[0].write_bytes(entries[0].read_bytes()[:40])
    result = run_cli("train", "--config", project, "--run", "again")
    assert result.returncode == 0, result.stderr
    record = json.loads((project.parent / "store" / "Multi_Concept_Output" / "again"
                         / "run.json").read_text())
    assert record["latent_cache"]["encoded"] == 1
    assert "cache" in result.stderr.lower() and "warning" not in result.stdout.lower()


def test_previews_grid_and_report_reference_only_existing_files(project: Path) -> None:
    import re

    result = _train(project, "previews", "train.epochs=2", "train.sample_steps=2",
                    'train.sample_prompts=["red_knight, solo --d 7", "blue_mage --n lowres '
                    '--w 64 --h 128"]')
    run_dir = result.final.parent
    for epoch in (1, 2):
        images = sorted((run_dir / "samples" / f"epoch-{epoch:03d}").glob("*.png"))
        assert [p.name.split("-")[0] for p in images] == ["0", "1"]
    from PIL import Image

    tall = next((run_dir / "samples" / "epoch-002").glob("1-*.png"))
    assert Image.open(tall).size == (64, 128)
    first = Image.open(run_dir / "samples" / "grid-epoch-001.png")
    second = Image.open(run_dir / "samples" / "grid-epoch-002.png")
    assert second.height == first.height and second.width > first.width  # a column per epoch
    report = run_dir / "report.html"
    html = report.read_text()
    links = re.findall(r'(?:src|href)="([^"#]+)"', html)
    assert any(link.endswith("previews.safetensors") for link in links)
    assert any(link.endswith(".png") for link in links)
    from urllib.parse import unquote

    for link in links:
        assert (run_dir / unquote(link)).exists(), link


def test_max_steps_inside_an_epoch_still_previews_the_final_weights(project: Path) -> None:
    # 4 images at batch 2: two steps per epoch, so step 3 ends in the middle of epoch 2.
    result = _train(project, "cut", "train.max_steps=3", "train.sample_steps=2",
                    'train.sample_prompts=["red_knight, solo"]')
    samples = result.final.parent / "samples"
    assert sorted(p.name for p in samples.glob("epoch-*")) == ["epoch-001", "epoch-002"]
    assert list((samples / "epoch-002").glob("0-*.png"))
    assert (samples / "grid-epoch-002.png").is_file()


def test_a_preview_that_cannot_be_saved_is_a_warning_and_training_goes_on(
        project: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Previews are a courtesy: a full or unwritable samples folder must not cost the run."""
    run_dir = load_settings(project).runs_dir / "blocked"
    run_dir.mkdir(parents=True)
    (run_dir / "samples").write_text("a file where the previews' folder would go\n")
    with caplog.at_level("WARNING", logger="loraforge"):
        result = _train(project, "blocked", "train.max_steps=1", "train.sample_steps=2",
                        'train.sample_prompts=["red_knight, solo"]')
    assert result.final.is_file() and _record(result)["status"] == "finished"
    assert "previews of epoch 1 not made" in caplog.text
    assert (run_dir / "samples").read_text().startswith("a file")


def test_unknown_preview_flag_is_named(project: Path) -> None:
    result = run_cli("train", "--config", project, "--set",
                     'train.sample_prompts=["red_knight --q 3"]')
    assert_user_error(result, "--q", "red_knight --q 3")


def test_report_command_rebuilds_the_report(project: Path) -> None:
    result = _train(project, "rep")
    (result.final.parent / "report.html").unlink()
    rebuilt = run_cli("report", "rep", "--config", project)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert (result.final.parent / "report.html").is_file()


def test_regularisation_concepts_are_weighted_by_the_prior_loss_weight(project: Path) -> None:
    """One image per step: a step on the regularisation concept's image weighs 0, the others
    not (a dataset of regularisation concepts only is refused: nothing would be trained)."""
    with project.open("a") as fh:
        fh.write("\n[dataset.concepts.red_knight]\nis_reg = true\n")
    result = _train(project, "reg", "train.prior_loss_weight=0", "train.batch_size=1")
    losses = _losses(result)
    assert len(losses) == 4 and sum(loss == 0.0 for loss in losses) == 2, losses
    from safetensors import safe_open

    with safe_open(str(result.final), "pt") as fh:
        assert fh.metadata()["ss_prior_loss_weight"] == "0.0"


def test_latents_are_encoded_in_batches_of_vae_batch_size(project: Path) -> None:
    """The VAE's memory grows with the images per call (~0.6 GB each at 512 px in fp32): the
    default encodes one at a time, a larger vae_batch_size groups them, with the same latents."""
    import torch
    from diffusers.models.autoencoders.vae import Encoder

    seen: list[int] = []

    def watch(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, Encoder):
            seen.append(args[0].shape[0])

    hook = torch.nn.modules.module.register_module_forward_pre_hook(watch)
    try:
        one = _train(project, "one", "dataset.flip_aug=true", "train.max_steps=1")
        ones = list(seen)
        seen.clear()
        three = _train(project, "three", "dataset.flip_aug=true", "train.max_steps=1",
                       "train.vae_batch_size=3", "train.cache_latents_to_disk=false")
    finally:
        hook.remove()
    assert ones == [1] * 8
    assert sorted(seen) == [2, 3, 3]
    assert one.trainer is not None and three.trainer is not None
    assert one.trainer.inputs.latents is not None and three.trainer.inputs.latents is not None
    assert one.trainer.inputs.latents.keys() == three.trainer.inputs.latents.keys()
    for key, latent in one.trainer.inputs.latents.items():
        torch.testing.assert_close(three.trainer.inputs.latents[key], latent, rtol=1e-4, atol=1e-5)


def test_results_take_storage_file_mode_and_the_logs_follow_the_umask(project: Path) -> None:
    """As the README says: results (LoRA, run.json) are written with storage.file_mode, the
    logs appended in place (train.log, history.jsonl) with the umask."""
    import os
    import stat

    previous = os.umask(0o022)
    try:
        result = _train(project, "modes", "storage.file_mode=0640", "train.max_steps=1")
    finally:
        os.umask(previous)
    run_dir = result.final.parent
    for name in (result.final.name, "run.json"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o640, name
    for name in ("train.log", "history.jsonl"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o644, name
