"""`loraforge train` on the tiny model: it learns, writes the ecosystem's format, and resumes
bit-identically after a real SIGTERM."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, draw_character, run_cli, write_training_project
from safetensors import safe_open

from loraforge.config import load_settings
from loraforge.dataset.examples import pixel_tensor
from loraforge.errors import ForgeError
from loraforge.runtime import go_offline
from loraforge.text import chunk_token_ids, encode_token_ids
from loraforge.train.run import TrainResult, train
from loraforge.train.signals import RESUMABLE_EXIT

FIXED_ENV = {"SOURCE_DATE_EPOCH": "1767225600"}


def _modules(path: Path) -> dict[str, set[str]]:
    """kohya module name -> the tensor suffixes stored for it."""
    found: dict[str, set[str]] = {}
    with safe_open(str(path), "pt") as fh:
        for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
            name, _, rest = key.partition(".")
            found.setdefault(name, set()).add(rest)
    return found


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_store: Path) -> TrainResult:
    """One in-process training run, saved in fp32 so the file equals the in-memory weights."""
    root = tmp_path_factory.mktemp("trained")
    config = write_training_project(root, tiny_store, {
        "epochs": 12, "save_precision": "fp32", "keep_last_n": 2, "unet_lr": 1e-2,
        "text_encoder_lr": 2e-3})
    settings = load_settings(config)
    saved = dict(os.environ)
    go_offline(settings)
    try:
        return train(settings, "fmt", restart=False)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _pipeline(base: Path, lora: Path | None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None,
                                                   requires_safety_checker=False,
                                                   local_files_only=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    return pipe


def _fixed_loss(pipe, latents: torch.Tensor, captions: list[str], clip_skip: int) -> float:
    """Unweighted denoising loss over fixed noise and timesteps (the same for every model)."""
    generator = torch.Generator().manual_seed(1234)
    ids = chunk_token_ids(pipe.tokenizer, captions, 1)
    total = 0.0
    with torch.no_grad():
        hidden = encode_token_ids(pipe.text_encoder, ids, clip_skip)
        for t in (100, 300, 500, 700, 900):
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.full((latents.shape[0],), t)
            alpha_bar = pipe.scheduler.alphas_cumprod[t]
            noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
            prediction = pipe.unet(noisy, timesteps, encoder_hidden_states=hidden).sample
            total += torch.nn.functional.mse_loss(prediction, noise).item()
    return total / 5


def test_training_lowers_the_denoising_loss_on_the_training_images(trained: TrainResult,
                                                                     tiny_store: Path) -> None:
    trainer = trained.trainer
    assert trainer is not None
    base = tiny_store / "tiny-sd15"
    latents = trainer.inputs.encode_pixels(_vae(base), [pixel_tensor(e, flip=False)
                                                        for e in trainer.examples])
    captions = [", ".join(e.tags) for e in trainer.examples]
    before = _fixed_loss(_pipeline(base, None), latents, captions, 2)
    after = _fixed_loss(_pipeline(base, trained.final), latents, captions, 2)
    assert after < 0.8 * before, (before, after)


def _vae(base: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(base, subfolder="vae", local_files_only=True)


def test_final_file_has_kohya_keys_trained_alpha_and_metadata(trained: TrainResult) -> None:
    modules = _modules(trained.final)
    unet = [m for m in modules if m.startswith("lora_unet_")]
    text = [m for m in modules if m.startswith("lora_te_")]
    assert (len(unet), len(text), len(modules)) == (192, 72, 264)
    assert all(parts == {"lora_down.weight", "lora_up.weight", "alpha"}
               for parts in modules.values())
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert not any(m.startswith("lora_te1_") for m in modules)
    with safe_open(str(trained.final), "pt") as fh:
        alpha = fh.get_tensor("lora_unet_mid_block_attentions_0_proj_in.alpha")
        down = fh.get_tensor("lora_unet_mid_block_attentions_0_proj_in.lora_down.weight")
        meta = fh.metadata()
    assert alpha.item() == 2.0 and down.shape[0] == 4
    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
                "ss_tag_frequency", "ss_dataset_dirs", "ss_num_train_images", "ss_steps",
                "ss_clip_skip", "ss_sd_model_hash", "ss_new_sd_model_hash", "sshs_model_hash",
                "sshs_legacy_hash", "modelspec.architecture", "modelspec.trigger_phrase",
                "ss_training_started_at", "ss_optimizer", "ss_seed", "ss_min_snr_gamma"):
        assert key in meta, key
    assert meta["ss_network_alpha"] == "2.0" and meta["ss_network_dim"] == "4"
    assert json.loads(meta["ss_dataset_dirs"]) == {
        "1_blue_mage": {"n_repeats": 1, "img_count": 2},
        "1_red_knight": {"n_repeats": 1, "img_count": 2}}
    assert json.loads(meta["ss_tag_frequency"])["1_red_knight"]["red_knight"] == 2
    assert meta["modelspec.trigger_phrase"] == "blue_mage, red_knight"
    assert meta["ss_steps"] == "24" and meta["ss_epoch"] == "12"
    assert oct(trained.final.stat().st_mode & 0o777) == "0o644"


def test_epoch_files_are_kept_newest_n_and_state_is_cleared(trained: TrainResult) -> None:
    run_dir = trained.final.parent
    epochs = sorted(p.name for p in run_dir.glob("fmt-*.safetensors"))
    assert epochs == ["fmt-000010.safetensors", "fmt-000011.safetensors"]
    assert not (run_dir / "state").exists()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "finished" and record["step"] == 24
    assert record["final_loss"] > 0
    assert list((run_dir / "events").iterdir())
    assert "saved" in (run_dir / "train.log").read_text()


def test_a_finished_run_is_handed_back_only_for_its_own_settings(trained: TrainResult,
                                                                    tmp_path: Path) -> None:
    config = trained.final.parents[2].parent / "forge.toml"
    before = trained.final.read_bytes()
    # Settings that cannot change the weights (previews, the models generation uses, where
    # latents are cached, the precision files are saved in) still hand the finished run back;
    # one saved in another precision says so, and how to get the one asked for.
    again = run_cli("train", "--config", config, "--run", "fmt", "--set",
                    'train.sample_prompts=["red_knight --s 1"]', "--set",
                    "models.controlnet=elsewhere", "--set", "models.detector=elsewhere",
                    "--set", "train.cache_latents_to_disk=false", "--set",
                    "train.save_precision=fp16", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"LoRA: {trained.final}" in again.stdout and "already finished" in again.stderr
    assert "its LoRA was saved in fp32, not in the fp16 that train.save_precision asks for " \
        "now; pass --restart to train it again and save it in fp16" in again.stderr
    assert "these settings" not in again.stderr
    changed = run_cli("train", "--config", config, "--run", "fmt", "--set",
                      "train.epochs=13", "--set", "train.keep_last_n=3", cwd=tmp_path)
    assert_user_error(changed, "`fmt` already finished, with other settings",
                      "train.epochs: 12 -> 13", "--restart")
    assert "keep_last_n" not in changed.stderr  # it does not change the weights
    # Other pictures ask for another training as other settings do (the old LoRA lacks them).
    picture = config.parent / "master_dataset" / "1_red_knight" / "1.png"
    original = picture.read_bytes()
    draw_character(picture, (20, 160, 20), "circle", offset=0)
    extra = picture.with_name("extra.png")
    caption = picture.with_suffix(".txt")
    said = caption.read_text()
    try:
        swapped = run_cli("train", "--config", config, "--run", "fmt", cwd=tmp_path)
        assert_user_error(swapped, "`fmt` already finished, with other settings or images",
                          "images.content: 1_red_knight/1.png is another image now", "--restart")
        picture.write_bytes(original)
        extra.write_bytes(original)
        grown = run_cli("train", "--config", config, "--run", "fmt", cwd=tmp_path)
        assert_user_error(grown, "images: 1_red_knight/extra.png added", "--restart")
        assert "images.dataset" not in grown.stderr  # the image is named, not the list's hash
        extra.unlink()
        caption.write_text("red_knight, retagged")
        retagged = run_cli("train", "--config", config, "--run", "fmt", cwd=tmp_path)
        assert_user_error(retagged, "images.captions: 1_red_knight/1.png's caption changed")
    finally:
        picture.write_bytes(original)
        caption.write_text(said)
        extra.unlink(missing_ok=True)
    assert trained.final.read_bytes() == before
    assert json.loads((trained.final.parent / "run.json").read_text())["status"] == "finished"
    trained.final.write_bytes(before[:5000])  # cut short (a full quota while copying it back)
    try:
        cut = run_cli("train", "--config", config, "--run", "fmt", cwd=tmp_path)
        assert_user_error(cut, "fmt.safetensors", "the run finished, but its LoRA is "
                          "incomplete", "--restart")
    finally:
        trained.final.write_bytes(before)


def test_a_finished_run_is_handed_back_to_another_number_of_processes_as_a_resume_is(
        trained: TrainResult) -> None:
    """2 processes of 1 image train what 1 process of 2 did (a resume takes one for the
    other); with another global batch the refusal reads as a resume's does."""
    from loraforge.train.distributed import World

    config = trained.final.parents[2].parent / "forge.toml"

    def on_two(*overrides: str) -> TrainResult:
        settings = load_settings(config, ["train.gpus=2", *overrides])
        return train(settings, "fmt", restart=False, world=World(rank=0, size=2))

    again = on_two("train.batch_size=1")
    assert (again.final, again.trainer, again.note) == (trained.final, None, None)
    with pytest.raises(ForgeError) as doubled:
        on_two()
    said = str(doubled.value)
    assert "`fmt` already finished, with other settings" in said
    assert "train.global_batch_size: 2 -> 4" in said and "now 2 x 2" in said
    assert "train.gpus" not in said and "train.batch_size:" not in said


def _import_other_weights(base: Path) -> None:
    """The model folder imported again under its name from another checkpoint: other U-Net
    weights, and a manifest listing them."""
    from safetensors.torch import load_file, save_file

    from loraforge.models.manifest import describe_files, read_manifest, write_manifest

    unet = base / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({key: value * 1.01 for key, value in load_file(unet).items()}, unet)
    manifest = read_manifest(base) or {}
    write_manifest(base, {**manifest, "files": describe_files(base)})


def test_a_base_model_with_other_weights_under_its_name_is_not_resumed_nor_handed_back(
        tmp_path: Path, tiny_store: Path) -> None:
    """Steps on two bases would mix in one LoRA, and a LoRA of the old base be handed back as
    the new one's. A state or run.json written before the base's hash was recorded goes on."""
    from loraforge.dataset.examples import build_examples
    from loraforge.dataset.scan import scan_dataset
    from loraforge.models.manifest import model_sha256
    from loraforge.train.distributed import World
    from loraforge.train.resume import check_resumable, semantic_config

    base = Path(shutil.copytree(tiny_store / "tiny-sd15", tmp_path / "models" / "tiny-sd15"))
    config = write_training_project(tmp_path / "project", tmp_path / "models", {"epochs": 1})
    settings = load_settings(config)
    examples = build_examples(scan_dataset(settings.dataset_dir, ".txt"),
                              settings.config.dataset, lambda _: None)
    first = train(settings, "r", restart=False)
    state = semantic_config(settings, examples, World())  # what a state of the run records
    old = model_sha256(base)
    assert old and json.loads((first.final.parent / "run.json").read_text()
                              )["base_model_sha256"] == old
    _import_other_weights(base)
    new = model_sha256(base)
    assert new and new != old

    changed = (f"models.base: {base} holds other weights than the run was trained on (model "
               f"hash {old[:10]} -> {new[:10]})")
    with pytest.raises(ForgeError) as finished:
        train(load_settings(config), "r", restart=False)
    assert changed in str(finished.value)
    assert "put the base model's old weights back in its folder" in str(finished.value)
    with pytest.raises(ForgeError) as resumed:
        check_resumable(state, first.final.parent / "state", settings, examples, World(),
                        first.final.parent)
    assert changed in str(resumed.value) and "--restart" in str(resumed.value)
    assert "undo those changes (put the base model's old weights back in its folder)" in str(
        resumed.value)

    older = {**state, "models": {k: v for k, v in state["models"].items() if k != "base_sha256"}}
    check_resumable(older, first.final.parent / "state", settings, examples, World(),
                    first.final.parent)
    record_file = first.final.parent / "run.json"
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({k: v for k, v in record.items()
                                       if k != "base_model_sha256"}))
    assert train(load_settings(config), "r", restart=False).final == first.final
    record_file.write_text(json.dumps(record))
    shutil.rmtree(base)
    shutil.copytree(tiny_store / "tiny-sd15", base)  # the old weights put back
    assert train(load_settings(config), "r", restart=False).final == first.final


def test_diffusers_load_reproduces_the_trained_model(trained: TrainResult,
                                                     tiny_store: Path) -> None:
    trainer = trained.trainer
    assert trainer is not None
    models = trainer.models
    pipe = _pipeline(tiny_store / "tiny-sd15", trained.final)
    ids = chunk_token_ids(pipe.tokenizer, ["red_knight, solo, standing"], 1)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((1, 4, 8, 8), generator=generator)
    timestep = torch.tensor([400])
    with torch.no_grad():
        ours_text = encode_token_ids(models.text_encoder, ids, 2)
        theirs_text = encode_token_ids(pipe.text_encoder, ids, 2)
        ours = models.unet(latents, timestep, encoder_hidden_states=ours_text).sample
        theirs = pipe.unet(latents, timestep, encoder_hidden_states=ours_text).sample
    assert (ours_text - theirs_text).abs().max().item() < 1e-5
    assert (ours - theirs).abs().max().item() < 1e-5
    base_pipe = _pipeline(tiny_store / "tiny-sd15", None)
    with torch.no_grad():
        untrained = base_pipe.unet(latents, timestep, encoder_hidden_states=ours_text).sample
    assert (ours - untrained).abs().max().item() > 1e-3


def _start_train(config: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "loraforge", "train", "--config", str(config),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})


def _interrupt_while_loading(process: subprocess.Popen[str]) -> str:
    """SIGTERM as the base model starts loading (before the first step); returns stderr."""
    assert process.stderr is not None
    for line in process.stderr:  # the signal handlers are in place from model loading on
        if "loading base model" in line:
            process.send_signal(signal.SIGTERM)
            break
    _, err = process.communicate(timeout=300)
    assert process.returncode == RESUMABLE_EXIT, err
    return err


def _train_meanwhile(config: Path, env: dict[str, str]) -> Callable[[], None]:
    """`loraforge train` started in the background, beside what the test does meanwhile (its
    output to a file beside the config, never a pipe that could fill); the returned call waits
    for it to finish training."""
    log = config.with_name("train.out")
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "loraforge", "train", "--config",
                                    str(config)], stdout=out, stderr=subprocess.STDOUT,
                                   text=True, env={**os.environ, **env})

    def finished() -> None:
        assert process.wait(timeout=600) == 0, log.read_text()
    return finished


def _interrupt_at(process: subprocess.Popen[str], step: int) -> tuple[str, str]:
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(f"step {step}/"):
            process.send_signal(signal.SIGTERM)
            break
    out, err = process.communicate(timeout=300)
    return "".join(seen) + out, err


def test_a_base_model_folder_moved_away_while_training_does_not_fail_its_state_save(
        tmp_path: Path, tiny_store: Path) -> None:
    """The state saved on SIGTERM records the base model's hash, taken as the training
    started: a model folder moved away meanwhile (the weights are in memory) must not turn the
    save into an error that loses the steps."""
    base = Path(shutil.copytree(tiny_store / "tiny-sd15", tmp_path / "models" / "tiny-sd15"))
    config = write_training_project(tmp_path / "project", tmp_path / "models")
    process = _start_train(config, FIXED_ENV)
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("step 2/"):
            process.send_signal(signal.SIGSTOP)
            base.rename(base.with_name("moved"))
            process.send_signal(signal.SIGCONT)
            break
    _, err = _interrupt_at(process, step=4)
    assert process.returncode == RESUMABLE_EXIT, err
    assert "state saved" in err, err
    run_dir = tmp_path / "project" / "store" / "Multi_Concept_Output" / "multi_concept"
    assert list((run_dir / "state").glob("step-*"))


def test_a_killed_run_repeats_only_the_steps_since_its_last_periodic_state(
        tmp_path: Path, tiny_store: Path) -> None:
    """SIGKILL (SLURM's KillWait ran out before a state could be saved): nothing is lost but
    the steps since the last periodic state (train.state_every_n_steps), which the rerun
    trains again."""
    config = write_training_project(tmp_path, tiny_store, {"state_every_n_steps": 2})
    process = _start_train(config, FIXED_ENV)
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("step 3/"):
            process.send_signal(signal.SIGSTOP)  # held at this step while `runs` looks
            alive = json.loads(run_cli("runs", "--json", "--config", config).stdout)
            process.kill()
            break
    process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL
    # `runs` tells the killed run (its process gone from this machine) from a live one
    assert [(r["status"], r["error"]) for r in alive] == [("running", None)]
    (killed,) = json.loads(run_cli("runs", "--json", "--config", config).stdout)
    assert killed["status"] == "stopped", killed
    assert "ended without updating its record" in killed["error"]
    assert "--run multi_concept" in killed["error"]
    assert "resumes it from its last state (step 2)" in killed["error"]  # not step 3, logged
    # and so do the other commands that name a run's status (they said "running")
    generate = run_cli("generate", "--config", config, "--lora", "multi_concept")
    assert_user_error(generate, "has no final LoRA yet (status: stopped)")
    assert_user_error(run_cli("eval", "multi_concept", "--config", config),
                      "has not finished (status: stopped)")
    report = run_cli("report", "multi_concept", "--config", config)
    assert report.returncode == 0, report.stderr
    run_dir = tmp_path / "store" / "Multi_Concept_Output" / "multi_concept"
    assert 'class="status status-stopped">stopped<' in (run_dir / "report.html").read_text()
    rerun = run_cli("train", "--config", config)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from" in rerun.stderr and "(step 2 of 6)" in rerun.stderr, rerun.stderr
    # The loss history of the steps the state holds survived the kill: the curve in the
    # report and TensorBoard has no hole.
    steps = [json.loads(line)["step"] for line in (run_dir / "history.jsonl").read_text(
        ).splitlines()]
    assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6], steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "events"))
    events.Reload()
    assert {e.step for e in events.Scalars("loss/step")} >= {1, 2}  # flushed with the state


def test_what_a_killed_or_signalled_ending_leaves_does_not_spoil_the_run(
        tmp_path: Path, tiny_store: Path) -> None:
    """A LoRA save cut short by SIGKILL left its hidden copy (as large as the LoRA) on the
    quota for good: the next attempt removes it. SIGTERM between the trainer's end and the
    command's (its handler already gone) raised Interrupted after run.json said finished: the
    run was then recorded as interrupted, the rerun refused its LoRA files ("no state") and
    --restart would have replaced them. Here the report callback, which runs once the run is
    finished, raises it."""
    from loraforge.train.signals import Interrupted

    def stopped_as_it_ends(run_dir: Path, _mode: int) -> None:
        if json.loads((run_dir / "run.json").read_text())["status"] == "finished":
            raise Interrupted(saved=False)

    config = write_training_project(tmp_path, tiny_store, {"max_steps": 2, "epochs": 1})
    settings = load_settings(config)
    go_offline(settings)
    run_dir = tmp_path / "store" / "Multi_Concept_Output" / "multi_concept"
    run_dir.mkdir(parents=True)
    killed = run_dir / ".multi_concept.safetensors.k1ll3d.tmp"  # a save SIGKILL cut short
    killed.write_bytes(b"\0" * 4096)
    result = train(settings, None, restart=False, report=stopped_as_it_ends)
    assert result.final.is_file() and not killed.exists()  # no dead copy left on the quota
    record = json.loads((result.final.parent / "run.json").read_text())
    assert record["status"] == "finished", record
    again = run_cli("train", "--config", config)
    assert again.returncode == 0 and "had already finished" in again.stderr, again.stderr


def test_sigterm_then_resume_gives_a_bit_identical_lora(tmp_path: Path,
                                                       tiny_store: Path) -> None:
    """The resume also turns previews on and changes the models only generation uses and
    where latents are cached: none of them changes the weights, so none blocks it."""
    previews = {"sample_prompts": ["red_knight, solo --s 2 --d 3"], "sample_steps": 2}
    straight = write_training_project(tmp_path / "straight", tiny_store, previews)
    resumed = write_training_project(tmp_path / "resumed", tiny_store)

    first = run_cli("train", "--config", straight, env=FIXED_ENV)
    assert first.returncode == 0, first.stderr
    assert "\r" not in first.stdout and "step 6/6" in first.stdout

    process = _start_train(resumed, FIXED_ENV)
    out, err = _interrupt_at(process, step=3)
    assert process.returncode == RESUMABLE_EXIT, (out, err)
    run_dir = tmp_path / "resumed" / "store" / "Multi_Concept_Output" / "multi_concept"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted", (out, err)
    assert "state saved" in err and "rerun the same command" in err
    states = sorted((run_dir / "state").iterdir())
    assert [s.name for s in states][-1].startswith("step-")
    # `loraforge runs` shows the step the saved state holds, where the rerun resumes.
    assert record["step"] == int(states[-1].name.removeprefix("step-")) >= 3, record
    assert not (run_dir / "multi_concept.safetensors").exists()

    again = run_cli("train", "--config", resumed, "--set",
                    f"train.sample_prompts={json.dumps(previews['sample_prompts'])}", "--set",
                    "train.sample_steps=2", "--set", "models.controlnet=elsewhere", "--set",
                    "models.detector=elsewhere", "--set", "train.cache_latents_to_disk=false",
                    env=FIXED_ENV)
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stderr
    straight_dir = tmp_path / "straight" / "store" / "Multi_Concept_Output" / "multi_concept"
    a = (straight_dir / "multi_concept.safetensors").read_bytes()
    b = (run_dir / "multi_concept.safetensors").read_bytes()
    assert a == b
    # previews were on from the start in one run, from the resume on in the other, and did
    # not disturb training (epoch 2's ended before or after the stop, as the signal landed)
    assert not (run_dir / "samples" / "epoch-001").exists()
    assert list((run_dir / "samples" / "epoch-003").glob("0-*.png"))


def test_resume_with_the_speed_options_on_gives_a_bit_identical_lora(tmp_path: Path,
                                                                    tiny_store: Path) -> None:
    """Channels-last order (a GPU's default), gradient checkpointing (the memory saver) and
    compiled transformer blocks change how the arithmetic runs; a run interrupted and resumed
    with all three on still ends on the uninterrupted run's file, byte for byte (the resumed
    process compiles again)."""
    speed = {"channels_last": True, "gradient_checkpointing": True, "compile_unet": "blocks"}
    straight = write_training_project(tmp_path / "straight", tiny_store, speed)
    resumed = write_training_project(tmp_path / "resumed", tiny_store, speed)
    first = _train_meanwhile(straight, FIXED_ENV)  # the uninterrupted run, beside the other
    process = _start_train(resumed, FIXED_ENV)
    _, err = _interrupt_at(process, step=4)
    assert process.returncode == RESUMABLE_EXIT, err
    again = run_cli("train", "--config", resumed, env=FIXED_ENV)
    assert again.returncode == 0, again.stderr
    assert "(step 4 of 6)" in again.stderr, again.stderr
    first()
    # The long first step is announced, then timed, in the log (not only on the terminal).
    log = (straight.parent / "store" / "Multi_Concept_Output" / "multi_concept" / "train.log"
           ).read_text()
    assert 'train.compile_unet = "blocks": the first step compiles the U-Net' in log
    assert re.search(r"first step: \d+\.\d s \(compiling included\)", log), log
    files = [root / "store" / "Multi_Concept_Output" / "multi_concept" / "multi_concept.safetensors"
             for root in (tmp_path / "straight", tmp_path / "resumed")]
    record = json.loads((files[1].parent / "run.json").read_text())
    assert {k: record["config"]["train"][k] for k in speed} == speed
    assert files[0].read_bytes() == files[1].read_bytes()


def test_a_signal_before_the_first_step_says_nothing_was_saved(tmp_path: Path,
                                                               tiny_store: Path) -> None:
    config = write_training_project(tmp_path, tiny_store)
    err = _interrupt_while_loading(_start_train(config, FIXED_ENV))
    assert "before the first step (nothing to save)" in err and "state saved" not in err
    run_dir = tmp_path / "store" / "Multi_Concept_Output" / "multi_concept"
    assert not (run_dir / "state").exists()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"


def _catches(pid: int, number: int) -> bool:
    """Whether the process has a handler for signal `number` (Linux: SigCgt in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (number - 1) & 1)
    return False


def test_a_signal_while_the_libraries_load_is_a_clean_resumable_exit(tmp_path: Path,
                                                                    tiny_store: Path) -> None:
    """SIGTERM as soon as `train` catches it (long before model loading): exit 75 and the
    message, not a silent 143; nothing of the run is written yet."""
    config = write_training_project(tmp_path, tiny_store)
    process = _start_train(config, FIXED_ENV)
    while process.poll() is None and not _catches(process.pid, signal.SIGTERM):
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == RESUMABLE_EXIT, err
    assert "before the first step (nothing to save)" in err and "Traceback" not in err
    assert not (tmp_path / "store" / "Multi_Concept_Output" / "multi_concept" / "run.json"
                ).exists()


#: `python -m loraforge ARGS...` as run by `python -c HELD_IMPORT MODULE FIFO ARGS...`, whose
#: import of MODULE waits (a slow file system) until the FIFO it reads is closed.
HELD_IMPORT = """
import runpy, sys

class Hold:
    def __init__(self, module, fifo):
        self.module, self.fifo = module, fifo

    def find_spec(self, name, path=None, target=None):
        if name == self.module:
            sys.meta_path.remove(self)
            with open(self.fifo) as fifo:
                fifo.read()

sys.meta_path.insert(0, Hold(sys.argv[1], sys.argv[2]))
sys.argv = ["loraforge", *sys.argv[3:]]
runpy.run_module("loraforge", run_name="__main__", alter_sys=True)
"""


def _signal_while_importing(module: str, config: Path) -> tuple[int, str]:
    """`loraforge train`, given SIGTERM while its import of `module` is held; returns its exit
    code and stderr."""
    fifo = config.with_name("held-import")
    os.mkfifo(fifo)
    process = subprocess.Popen([sys.executable, "-c", HELD_IMPORT, module, str(fifo), "train",
                                "--config", str(config)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, **FIXED_ENV})
    while process.poll() is None:
        try:  # opens once the process reads the FIFO: inside the import
            held = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            time.sleep(0.01)
            continue
        process.send_signal(signal.SIGTERM)
        os.close(held)
        break
    _, err = process.communicate(timeout=120)
    return process.returncode, err


@pytest.mark.parametrize("module", ["torch", "numpy"])
def test_a_signal_in_the_middle_of_an_import_is_a_clean_exit_that_leaves_no_run(
        tmp_path: Path, tiny_store: Path, module: str) -> None:
    """SIGTERM while torch is imported (the run's folder made, nothing recorded yet): the exit
    was clean, but a folder with only its lock and an empty train.log stayed behind. While
    numpy is imported inside torch's import: the exception the handler raised was swallowed
    by torch, and the run trained to its end as if no signal had come (a half-imported numpy
    could also crash it later, a "failed" run)."""
    config = write_training_project(tmp_path, tiny_store)
    code, err = _signal_while_importing(module, config)
    assert code == RESUMABLE_EXIT, err
    assert "before the first step (nothing to save)" in err and "Traceback" not in err, err
    assert list((tmp_path / "store" / "Multi_Concept_Output").iterdir()) == []


def test_a_run_killed_before_its_first_state_goes_on_with_the_same_command(
        tmp_path: Path, tiny_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL (out of memory, SLURM's KillWait) after an epoch's LoRA file, before the first
    periodic state: `runs` said the same command trains it from the start, yet that command
    was refused ("pass --restart"), and so was the requeued job. Its record shows the same
    settings and images, which write those files again, byte for byte; other settings are
    refused, saying so."""
    from loraforge.slurm.control import runs_table

    config = write_training_project(tmp_path, tiny_store, {"epochs": 2})
    process = _start_train(config, FIXED_ENV)
    assert process.stderr is not None
    for line in process.stderr:
        if "multi_concept-000001.safetensors" in line:
            process.kill()
            break
    process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL
    run_dir = tmp_path / "store" / "Multi_Concept_Output" / "multi_concept"
    epoch_one = run_dir / "multi_concept-000001.safetensors"
    written = epoch_one.read_bytes()
    assert not (run_dir / "state").exists()
    (row,) = runs_table(load_settings(config))
    assert "trains it from the start (no state was saved yet)" in row["error"], row
    record = run_dir / "run.json"
    kept = record.read_text()  # as versions before records said what trained a run wrote it:
    record.write_text(json.dumps({k: v for k, v in json.loads(kept).items()
                                  if k != "trained_from_sha256"}))
    (row,) = runs_table(load_settings(config))
    assert "`loraforge train --run multi_concept --restart` trains it" in row["error"], row
    record.write_text(kept)
    with pytest.raises(ForgeError) as other:
        train(load_settings(config, ["train.unet_lr=3e-3"]), None, restart=False)
    assert "no state to resume it from, and other settings or images" in other.value.message
    assert "undo those changes" in (other.value.fix or "")
    for key, value in FIXED_ENV.items():
        monkeypatch.setenv(key, value)
    rerun = train(load_settings(config), None, restart=False)
    assert rerun.final.is_file() and epoch_one.read_bytes() == written
    assert "training it again from step 0 with the same settings" in (run_dir / "train.log"
                                                                       ).read_text()


def test_resume_with_a_changed_config_is_refused(tmp_path: Path, tiny_store: Path) -> None:
    config = write_training_project(tmp_path, tiny_store, {"epochs": 20})
    process = _start_train(config, FIXED_ENV)
    assert process.stdout is not None
    for line in process.stdout:  # until the first step is logged (or the process ends)
        if line.startswith("step 1/"):
            break
    # The same run started again while it trains (a job submitted twice) is turned away.
    twice = run_cli("train", "--config", config)
    assert_user_error(twice, "another process is busy with training run `multi_concept`")
    _interrupt_at(process, step=2)
    assert process.returncode == RESUMABLE_EXIT
    record = tmp_path / "store" / "Multi_Concept_Output" / "multi_concept" / "run.json"
    interrupted = record.read_bytes()

    # the same images named another way are no difference (the images themselves are compared)
    changed = run_cli("train", "--config", config, "--set", "train.unet_lr=0.01", "--set",
                      f"dataset.path={tmp_path / 'master_dataset'}/")
    assert_user_error(changed, "cannot resume", "train.unet_lr: 0.002 -> 0.01", "--restart")
    assert "the list of images" not in changed.stderr  # said only when the images changed
    assert "dataset.path" not in changed.stderr
    assert record.read_bytes() == interrupted  # still an interrupted run, with no error
    with pytest.raises(ForgeError, match="AdamW8bit"):  # refused before anything trains
        train(load_settings(config, ["train.optimizer=AdamW8bit"]), None, restart=False)
    assert record.read_bytes() == interrupted  # not marked failed: its state still resumes
    # A speed setting that changes the arithmetic would not resume bit for bit.
    for key, old, new in (("compile_unet", "False", '"blocks"'),
                          ("channels_last", "None", "true")):
        faster = run_cli("train", "--config", config, "--set", f"train.{key}={new}")
        assert_user_error(faster, "cannot resume", f"train.{key}: {old} -> ")
    extra = tmp_path / "master_dataset" / "1_red_knight" / "extra.png"
    extra.write_bytes((tmp_path / "master_dataset" / "1_red_knight" / "0.png").read_bytes())
    grown = run_cli("train", "--config", config)
    assert_user_error(grown, "cannot resume", "images: 1_red_knight/extra.png added", "--restart")
    extra.unlink()
    replaced = tmp_path / "master_dataset" / "1_red_knight" / "1.png"
    original = replaced.read_bytes()
    draw_character(replaced, (20, 160, 20), "circle", offset=0)  # another image, same name
    swapped = run_cli("train", "--config", config)
    assert_user_error(swapped, "cannot resume", "images.content: 1_red_knight/1.png is another "
                      "image now", "undo those changes to resume", "--restart")
    assert record.read_bytes() == interrupted
    replaced.write_bytes(original)
    caption = replaced.with_suffix(".txt")  # retagged mid-run: two trainings mixed
    said = caption.read_text()
    caption.write_text(said.replace("standing", "sitting"))
    retagged = run_cli("train", "--config", config)
    assert_user_error(retagged, "cannot resume", "images.captions: 1_red_knight/1.png's caption "
                      "changed", "--restart")
    caption.write_text(said)

    run_dir = tmp_path / "store" / "Multi_Concept_Output" / "multi_concept"
    stale = run_dir / "multi_concept-000007.safetensors"
    stale.write_bytes(b"from the attempt before")
    mine = run_dir / "multi_concept_merged.safetensors"  # a file of the user's, kept there
    mine.write_bytes(b"merged by hand")
    restarted = run_cli("train", "--config", config, "--restart", "--set", "train.epochs=1")
    assert restarted.returncode == 0, restarted.stderr
    assert "Loading weights" not in restarted.stderr  # no progress bars in a job's log
    assert not stale.exists()
    assert mine.read_bytes() == b"merged by hand"
    history = (tmp_path / "store" / "Multi_Concept_Output" / "multi_concept"
               / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in history] == [1, 2]  # the old run's are gone


def test_a_loss_that_is_not_finite_stops_the_run_before_any_file_is_saved(
        tmp_path: Path, tiny_store: Path) -> None:
    """A base model with a NaN weight (a damaged file) makes every loss NaN: the run stops at
    once, saying so, instead of training on and writing LoRA files of NaN."""
    from safetensors.torch import load_file, save_file

    store = tmp_path / "models"
    shutil.copytree(tiny_store / "tiny-sd15", store / "tiny-sd15")
    (store / "tiny-controlnet").symlink_to(tiny_store / "tiny-controlnet")
    weights = store / "tiny-sd15" / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    good = tensors["conv_in.weight"][0, 0, 0, 0].item()
    tensors["conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(tensors, weights)
    config = write_training_project(tmp_path / "project", store, {"state_every_n_steps": 1})
    result = run_cli("train", "--config", config)
    assert_user_error(result, "the loss became nan at step 1", "training diverged",
                      "--restart")
    run_dir = tmp_path / "project" / "store" / "Multi_Concept_Output" / "multi_concept"
    assert not list(run_dir.glob("*.safetensors")) and not (run_dir / "state").exists()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"

    # the base mended, the same command trains the run; its record no longer shows the error
    tensors["conv_in.weight"][0, 0, 0, 0] = good
    save_file(tensors, weights)
    train(load_settings(config, ["train.max_steps=1"]), None, restart=False)
    record = json.loads((run_dir / "run.json").read_text())
    assert (record["status"], record["error"]) == ("finished", None)
    listed = json.loads(run_cli("runs", "--json", "--config", config).stdout)
    assert [(r["status"], r["error"]) for r in listed] == [("finished", None)]


def test_run_name_with_a_path_separator_is_refused(tmp_path: Path, tiny_store: Path) -> None:
    config = write_training_project(tmp_path, tiny_store)
    result = run_cli("train", "--config", config, "--run", "../escape")
    assert_user_error(result, "run name `../escape`", "letters, digits")
    assert not (tmp_path / "store" / "escape").exists()


def test_missing_base_model_names_the_commands_that_provide_it(tmp_path: Path,
                                                               tiny_store: Path) -> None:
    config = write_training_project(tmp_path, tiny_store)
    result = run_cli("train", "--config", config, "--set", "models.base=AnyLoRA")
    assert_user_error(result, "AnyLoRA", "loraforge models fetch anylora", "models import")


def test_sdxl_base_model_is_refused(tmp_path: Path, tiny_store: Path) -> None:
    config = write_training_project(tmp_path, tiny_store)
    fake = tmp_path / "store" / "sdxl"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (fake / part).mkdir(parents=True)
    (fake / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (fake / "unet" / "config.json").write_text(json.dumps(
        {"cross_attention_dim": 2048, "addition_embed_type": "text_time", "in_channels": 4}))
    result = run_cli("train", "--config", config, "--set", "models.base=sdxl")
    assert_user_error(result, "sdxl", "SD 1.x")


def test_an_optimizer_that_cannot_run_here_is_a_clear_error(tmp_path: Path,
                                                           tiny_store: Path) -> None:
    config = write_training_project(tmp_path, tiny_store)
    result = run_cli("train", "--config", config, "--set", "train.optimizer=AdamW8bit")
    assert_user_error(result, "AdamW8bit", "CUDA", "train.optimizer")
    result = run_cli("train", "--config", config, "--set", "train.optimizer=nosuch.Optim")
    assert_user_error(result, "nosuch.Optim", "cannot be imported")
    # the refused new run leaves no empty folder behind (generate took it for a run)
    assert list((tmp_path / "store" / "Multi_Concept_Output").iterdir()) == []


def test_a_finished_run_is_not_trained_over_by_a_refused_restart_or_without_one(
        tmp_path: Path, tiny_store: Path) -> None:
    """`train --restart` removed the run's LoRAs, history and states, then refused the settings
    (an optimizer that needs a GPU, arguments it rejects, a base model cut short): the work was
    lost. And with its final
    file deleted, or its run.json unreadable, a finished run was trained again from the start
    without a word: its epoch files were overwritten or mixed with new ones."""
    config = write_training_project(tmp_path, tiny_store, {"epochs": 2})
    assert run_cli("train", "--config", config).returncode == 0
    run_dir = tmp_path / "store" / "Multi_Concept_Output" / "multi_concept"

    def files() -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != "lock"}

    def refused(restart: bool, *overrides: str) -> ForgeError:
        with pytest.raises(ForgeError) as caught:
            train(load_settings(config, list(overrides)), None, restart=restart)
        return caught.value

    before = files()
    assert any(p.suffix == ".safetensors" for p in before)
    assert "CUDA" in refused(True, "train.optimizer=AdamW8bit").message
    assert "rejected its arguments" in refused(True, "train.optimizer_args={bogus=1}").message
    # a learning rate there was silently overridden by train.unet_lr (yet recorded in the LoRA)
    rate = refused(True, "train.optimizer_args={lr=0.1, weight_decay=0.01}")
    assert "train.optimizer_args sets `lr`" in rate.message
    assert "train.unet_lr and train.text_encoder_lr" in (rate.fix or "")
    bad_base = tmp_path / "cut-base"  # a download or copy that stopped short
    shutil.copytree(tiny_store / "tiny-sd15", bad_base)
    weights = bad_base / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    cut = refused(True, f"models.base={json.dumps(str(bad_base))}")
    assert cut.message == "is an incomplete or damaged weights file" and cut.path == weights
    assert "loraforge models verify" in (cut.fix or "")
    assert files() == before

    (run_dir / "multi_concept.safetensors").unlink()
    kept = {p: p.read_bytes() for p in run_dir.glob("*.safetensors")}
    assert [p.name for p in kept] == ["multi_concept-000001.safetensors"]
    cli = run_cli("train", "--config", config, "--set", "train.epochs=3")
    assert_user_error(cli, "holds LoRA files of an earlier training "
                      "(multi_concept-000001.safetensors)", "--restart")
    (run_dir / "run.json").write_text("{not json")
    assert "the run's record cannot be read" in refused(False).message
    assert {p: p.read_bytes() for p in run_dir.glob("*.safetensors")} == kept

    # A restart of the finished run, preempted before its first step: its record kept the old
    # attempt's loss, finish and LoRA file (deleted by the restart), which `runs` showed; and
    # the old LoRA's concept separation (`loraforge eval`) stayed for the report to show.
    for path in (run_dir / "run.json", run_dir / "multi_concept.safetensors"):
        path.write_bytes(before[path])
    separation = run_dir / "separation.json"
    separation.write_text('{"concepts": {}}')
    _interrupt_while_loading(_start_train(config, FIXED_ENV, "--restart"))
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted"
    assert not {"final_loss", "final_lora", "finished_at", "images"} & set(record), record
    assert not separation.exists() and not list(run_dir.glob("*.safetensors"))
    shown = run_cli("runs", "--json", "--config", config)
    assert [run.get("final_loss") for run in json.loads(shown.stdout)] == [None], shown.stdout


def test_full_disk_while_saving_is_clear_and_keeps_the_previous_checkpoint(
        tmp_path: Path, tiny_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first state could not be saved: the message said that the rerun resumes from the
    last state saved completely, and the rerun was refused for the epoch file it had kept
    ("pass --restart"). It trains the run again from step 0, as the message says now."""
    # Epoch files (fp16, dim 4) are ~0.3 MB; the fp32 state with its optimizer is over 1 MB.
    config = write_training_project(tmp_path, tiny_store, {"state_every_n_steps": 3,
                                                           "epochs": 2})
    limit = 1_000_000

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run([sys.executable, "-m", "loraforge", "train", "--config", str(config)],
                          capture_output=True, text=True, preexec_fn=small_files, timeout=600,
                          env={**os.environ, **FIXED_ENV})
    assert_user_error(done, "could not write", "quota is full", "rerun the same command: "
                      "training starts over from step 0 (no state was saved yet)")
    run_dir = tmp_path / "store" / "Multi_Concept_Output" / "multi_concept"
    epoch_one = run_dir / "multi_concept-000001.safetensors"
    assert len(_modules(epoch_one)) == 264
    assert not list((run_dir / "state").glob(".tmp-*"))
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    written = epoch_one.read_bytes()
    for key, value in FIXED_ENV.items():
        monkeypatch.setenv(key, value)
    assert train(load_settings(config), None, restart=False).final.is_file()
    assert epoch_one.read_bytes() == written


def test_unet_only_run_logs_plain_lines_and_saves_no_text_encoder(tmp_path: Path,
                                                                  tiny_store: Path) -> None:
    config = write_training_project(tmp_path, tiny_store, {"epochs": 1,
                                                           "log_every_seconds": 3600})
    result = run_cli("train", "--config", config, "--set", "train.text_encoder_lr=0")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert lines == [lines[-1]] and lines[-1].startswith("step 2/2 epoch 1 loss ")
    assert "img/s" in lines[-1] and "eta" in lines[-1] and "\r" not in result.stdout
    final = tmp_path / "store" / "Multi_Concept_Output" / "multi_concept" / \
        "multi_concept.safetensors"
    modules = _modules(final)
    assert len(modules) == 192 and all(m.startswith("lora_unet_") for m in modules)
