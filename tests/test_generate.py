"""`loraforge generate` on the tiny model: LoRAs stack and weigh, the ControlNet is live, every
sampler runs, prompts encode as in training, PNG info and sidecars, newest-finished discovery,
and one end-to-end run of the command with a scenes file."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import run_cli

from loraforge.config import load_settings
from loraforge.errors import ForgeError
from loraforge.generate import pnginfo
from loraforge.generate.loras import BaseWidths, LoraStack, LoraUse, inspect_lora
from loraforge.generate.loras import newest_finished_lora as newest_lora
from loraforge.generate.pipeline import (
    build_pipeline,
    compile_denoisers,
    encode_prompt_pair,
    load_pipeline,
    make_scheduler,
    render,
    render_batch,
)
from loraforge.generate.poses import draw_pose, random_pose
from loraforge.generate.scenes import Options
from loraforge.hashing import sha256_file
from loraforge.samplers import SAMPLERS
from loraforge.text import chunk_token_ids, encode_token_ids

# This machine's two cores are shared: one torch thread per process is several times faster.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SIZE = 96


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_lora(path: Path, base: Path, seed: int, *, text: bool = True, scale: float = 0.1,
              clip_skip: str = "2") -> Path:
    """A kohya-format LoRA for `base` with random non-zero up weights (a trained stand-in)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from loraforge.train import export, network

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder",
                                                 local_files_only=True)
    models = {"unet": unet, "text_encoder": text_encoder}
    torch.manual_seed(seed)
    targets = network.unet_targets(unet, 4, 4)
    network.inject(unet, targets)
    if text:
        text_targets = network.text_targets(text_encoder, 4, 4)
        network.inject(text_encoder, text_targets)
        targets += text_targets
    with torch.no_grad():
        for target in targets:
            network.lora_pair(models[target.component], target)[1].normal_(0, scale)
    tensors = export.kohya_state_dict(models, targets, "fp32")
    export.save_lora(path, tensors, {"ss_network_module": "networks.lora",
                                     "ss_base_model_version": "sd_v1",
                                     "ss_clip_skip": clip_skip}, 0o644)
    return path


@pytest.fixture(scope="module")
def base(tiny_store: Path) -> Path:
    return tiny_store / "tiny-sd15"


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory: pytest.TempPathFactory, base: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    return {"a": make_lora(folder / "style_a.safetensors", base, 1, clip_skip="1"),
            "b": make_lora(folder / "style_b.safetensors", base, 2, text=False)}


@pytest.fixture(scope="module")
def pipe(tiny_store: Path, base: Path) -> Any:
    return load_pipeline(base, tiny_store / "tiny-controlnet", torch.device("cpu"),
                         torch.float32)


@pytest.fixture(scope="module")
def stack(pipe: Any) -> LoraStack:
    return LoraStack(pipe)


@pytest.fixture()
def clean(stack: LoraStack) -> LoraStack:
    """The shared pipeline with no LoRA active and the default sampler."""
    stack.activate([])
    stack.pipe.scheduler = make_scheduler("DPM++ 2M Karras", stack.pipe.scheduler.config)
    return stack


def _pose(seed: int, figures: int = 1) -> Any:
    return draw_pose(random_pose(figures, SIZE, SIZE, seed))


def _render(pipe: Any, prompt: str = "a red knight", seed: int = 1, pose: Any = None,
            scale: float = 1.0, steps: int = 4, size: int = SIZE, clip_skip: int = 2,
            ) -> np.ndarray:
    embeds, negative = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, prompt, "lowres",
                                          clip_skip)
    if getattr(pipe, "controlnet", None) is not None and pose is None:
        pose = _pose(0)
    image = render(pipe, embeds, negative, size, size, steps, 7.0, seed, image=pose,
                   control_scale=scale)
    array = np.asarray(image, dtype=np.int16)
    assert array.shape == (size, size, 3)
    return array


def test_loras_change_the_image_stack_and_weight_zero_is_the_base(
        clean: LoraStack, lora_files: dict[str, Path], base: Path) -> None:
    widths = BaseWidths.of(base)
    a, b = (inspect_lora(lora_files[k], widths) for k in "ab")
    assert a.has_text_encoder and not b.has_text_encoder and a.clip_skip == 1
    plain = _render(clean.pipe)

    clean.activate([LoraUse(a, 0.0)])
    assert np.array_equal(_render(clean.pipe), plain)
    clean.activate([LoraUse(a, 1.0)])
    only_a = _render(clean.pipe)
    clean.activate([LoraUse(b, 1.0)])
    only_b = _render(clean.pipe)
    clean.activate([LoraUse(a, 1.0), LoraUse(b, 1.0)])
    both = _render(clean.pipe)
    clean.activate([])
    assert np.array_equal(_render(clean.pipe), plain)
    clean.activate([LoraUse(a, 1.0)])  # merged LoRAs are taken out exactly: same bits again
    assert np.array_equal(_render(clean.pipe), only_a)

    assert np.abs(only_a - plain).max() > 8
    assert np.abs(only_b - plain).max() > 8
    assert np.abs(both - only_a).max() > 8 and np.abs(both - only_b).max() > 8


def test_merged_loras_render_what_diffusers_adapters_render(
        clean: LoraStack, lora_files: dict[str, Path], base: Path, tiny_store: Path) -> None:
    """The stack merges LoRAs into the weights for speed; diffusers' own adapters, unmerged,
    with the same weights give the same picture."""
    widths = BaseWidths.of(base)
    a, b = (inspect_lora(lora_files[k], widths) for k in "ab")
    clean.activate([LoraUse(a, 0.7), LoraUse(b, -0.4)])
    merged = _render(clean.pipe)
    reference = load_pipeline(base, tiny_store / "tiny-controlnet", torch.device("cpu"),
                              torch.float32)
    reference.load_lora_weights(str(lora_files["a"]), adapter_name="a")
    reference.load_lora_weights(str(lora_files["b"]), adapter_name="b")
    reference.set_adapters(["a", "b"], [0.7, -0.4])
    assert np.abs(_render(reference) - merged).max() <= 2


def test_loading_loras_prints_nothing(tiny_store: Path, base: Path, tmp_path: Path,
                                      capfd: pytest.CaptureFixture[str]) -> None:
    """A scene's LoRAs load without transformers' "Loading weights" bar or its "LOAD REPORT"
    table of missing adapter keys (which the bench's random LoRAs printed), also outside the
    command line."""
    stack = LoraStack(load_pipeline(base, tiny_store / "tiny-controlnet", torch.device("cpu"),
                                    torch.float32))
    files = [make_lora(tmp_path / f"{seed}.safetensors", base, seed) for seed in (1, 2)]
    capfd.readouterr()
    for path in files:
        stack.load(inspect_lora(path, BaseWidths.of(base)))
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_a_lora_that_does_not_fit_is_one_message_naming_the_mismatch(
        tiny_store: Path, base: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str],
) -> None:
    """A LoRA whose ranks disagree within a layer passes the header's checks and fails in
    diffusers: one message with the first mismatch, and not diffusers' own log of it too."""
    from safetensors.torch import load_file, save_file

    path = make_lora(tmp_path / "odd.safetensors", base, 3)
    tensors = load_file(path)
    down = next(k for k in tensors if k.startswith("lora_unet") and "lora_down" in k)
    tensors[down] = torch.zeros(tensors[down].shape[0] + 4, *tensors[down].shape[1:])
    save_file(tensors, path, metadata={"ss_base_model_version": "sd_v1"})
    stack = LoraStack(load_pipeline(base, tiny_store / "tiny-controlnet", torch.device("cpu"),
                                    torch.float32))  # its own: a failed load is not undone
    capfd.readouterr()
    with pytest.raises(ForgeError) as error:
        stack.load(inspect_lora(path, BaseWidths.of(base)))
    message = str(error.value)
    assert "could not be applied to the base model" in message
    assert "size mismatch for" in message and not message.rstrip().endswith(":"), message
    assert capfd.readouterr() == ("", "")


def _diffusers_lora(folder: Path, base: Path, alpha: float) -> dict[str, Path]:
    """A rank-4 LoRA as diffusers' training scripts save it (peft keys, `unet.`/`text_encoder.`
    prefixes), once with its peft config (where its alpha lives) and once without."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder",
                                                 local_files_only=True)
    torch.manual_seed(5)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=alpha, init_lora_weights="gaussian",
                                        target_modules=["q_proj", "k_proj", "v_proj"]))
    with torch.no_grad():
        for model in (unet, text_encoder):
            for key, param in model.named_parameters():
                if "lora_B" in key:
                    param.normal_(0, 0.3)
    layers = {"unet_lora_layers": get_peft_model_state_dict(unet),
              "text_encoder_lora_layers": get_peft_model_state_dict(text_encoder)}
    configs = {"unet_lora_adapter_metadata": unet.peft_config["default"].to_dict(),
               "text_encoder_lora_adapter_metadata":
                   text_encoder.peft_config["default"].to_dict()}
    for config in configs.values():
        config["target_modules"] = sorted(config["target_modules"])
    StableDiffusionPipeline.save_lora_weights(folder, weight_name="config.safetensors",
                                              **layers, **configs)
    StableDiffusionPipeline.save_lora_weights(folder, weight_name="bare.safetensors", **layers)
    return {"config": folder / "config.safetensors", "bare": folder / "bare.safetensors"}


def test_a_diffusers_lora_renders_at_the_strength_its_alpha_gives(
        clean: LoraStack, base: Path, tiny_store: Path, tmp_path: Path) -> None:
    """Its alpha is in the file's metadata, not in a tensor: loaded from its tensors alone it
    was applied at alpha = rank, twice its strength here, without a word."""
    files = _diffusers_lora(tmp_path, base, alpha=2)
    widths = BaseWidths.of(base)
    clean.activate([LoraUse(inspect_lora(files["config"], widths), 1.0)])
    ours = _render(clean.pipe)
    clean.activate([LoraUse(inspect_lora(files["bare"], widths), 1.0)])
    full_strength = _render(clean.pipe)
    reference = load_pipeline(base, tiny_store / "tiny-controlnet", torch.device("cpu"),
                              torch.float32)
    reference.load_lora_weights(str(files["config"]))  # diffusers, from the file
    scale = {m.scaling["default_0"] for m in reference.unet.modules() if hasattr(m, "scaling")
             and "default_0" in m.scaling}
    assert scale == {0.5}
    assert np.abs(_render(reference) - ours).max() <= 2
    assert np.abs(full_strength - ours).max() > 8


def test_modules_of_a_lora_that_match_no_layer_are_named(
        clean: LoraStack, base: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The loader leaves them out and says so only in a log we silence: a LoRA applied in part
    looked like one applied in full."""
    from safetensors.torch import load_file, save_file

    path = make_lora(tmp_path / "edited.safetensors", base, 4)
    tensors = load_file(path)
    module = next(k for k in tensors if k.endswith("attn1_to_q.lora_down.weight"))[
        :-len(".lora_down.weight")]
    for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
        tensors[module.replace("to_q", "to_qq") + suffix] = tensors[module + suffix].clone()
    save_file(tensors, path, metadata={"ss_base_model_version": "sd_v1"})
    widths = BaseWidths.of(base)
    with caplog.at_level("WARNING", logger="loraforge"):
        clean.activate([LoraUse(inspect_lora(path, widths), 1.0)])
    modules = sum(k.endswith(".lora_down.weight") for k in tensors)
    assert [r.getMessage() for r in caplog.records] == [
        f"edited.safetensors: 1 of its {modules} modules match no layer of the base model and "
        f"are left out (e.g. {module.replace('to_q', 'to_qq')}): it was made for another "
        "model, or edited"]


def test_compiled_blocks_render_what_eager_models_render_as_loras_change(
        clean: LoraStack, tiny_store: Path, base: Path, lora_files: dict[str, Path]) -> None:
    """generate.compile = "blocks": the transformer blocks of the U-Net and the ControlNet are
    compiled, the compiled models see each scene's LoRAs merged into the weights, and loading
    or changing LoRAs compiles nothing anew (a recompile costs seconds to minutes)."""
    from torch._dynamo.utils import counters

    with_lora = [LoraUse(inspect_lora(lora_files["a"], BaseWidths.of(base)), 0.8)]
    eager_base = _render(clean.pipe, steps=2)
    clean.activate(with_lora)
    eager_lora = _render(clean.pipe, steps=2)
    assert np.abs(eager_lora - eager_base).max() > 20

    pipe = load_pipeline(base, tiny_store / "tiny-controlnet", torch.device("cpu"),
                         torch.float32)
    compile_denoisers(pipe, "blocks")
    compiled = {type(module).__name__ for model in (pipe.unet, pipe.controlnet)
                for module in model.modules()
                if getattr(module, "_compiled_call_impl", None) is not None}
    assert compiled == {"BasicTransformerBlock"}
    assert np.abs(_render(pipe, steps=2) - eager_base).max() <= 2
    graphs = counters["stats"]["unique_graphs"]
    stack = LoraStack(pipe)
    stack.activate(with_lora)  # the first LoRA this pipeline loads
    assert np.abs(_render(pipe, steps=2) - eager_lora).max() <= 2
    stack.activate([])
    assert np.abs(_render(pipe, steps=2) - eager_base).max() <= 2
    assert counters["stats"]["unique_graphs"] == graphs


def test_compile_true_compiles_the_whole_u_net_and_controlnet(tiny_store: Path,
                                                             base: Path) -> None:
    """generate.compile = true: both models as one graph each (compiled lazily, at the first
    image: nothing is compiled here); false leaves them as they are."""
    pipe = load_pipeline(base, tiny_store / "tiny-controlnet", torch.device("cpu"),
                         torch.float32)

    def compiled() -> set[str]:
        return {type(module).__name__ for model in (pipe.unet, pipe.controlnet)
                for module in model.modules()
                if getattr(module, "_compiled_call_impl", None) is not None}

    compile_denoisers(pipe, False)
    assert compiled() == set()
    compile_denoisers(pipe, True)
    assert compiled() == {"UNet2DConditionModel", "ControlNetModel"}


def _unet_operations(pipe: Any) -> int:
    """Tensor operations one denoising call of the U-Net dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    latents = torch.zeros(1, 4, SIZE // 8, SIZE // 8)
    hidden = torch.zeros(1, 77, pipe.unet.config.cross_attention_dim)
    with torch.no_grad(), Count():
        pipe.unet(latents, torch.tensor([500]), hidden)
    return Count.calls


def test_active_loras_add_no_work_to_a_denoising_step(
        clean: LoraStack, lora_files: dict[str, Path], base: Path) -> None:
    """Merged into the weights, two LoRAs cost a denoising step nothing (as adapters each
    adapted layer would run two more matrix products per LoRA)."""
    widths = BaseWidths.of(base)
    plain = _unet_operations(clean.pipe)
    clean.activate([LoraUse(inspect_lora(lora_files[k], widths), 0.8) for k in "ab"])
    assert _unet_operations(clean.pipe) == plain


def test_controlnet_is_live_and_scale_zero_equals_no_controlnet(clean: LoraStack) -> None:
    pipe = clean.pipe
    zero_convs = [*pipe.controlnet.controlnet_down_blocks, pipe.controlnet.controlnet_mid_block]
    assert all(conv.weight.abs().sum() > 0 for conv in zero_convs)

    first = _render(pipe, pose=_pose(1, 1))
    second = _render(pipe, pose=_pose(2, 2))
    assert np.abs(first - second).max() > 8

    plain = build_pipeline(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet,
                           make_scheduler("DPM++ 2M Karras", pipe.scheduler.config))
    without = _render(plain)
    assert np.array_equal(_render(pipe, pose=_pose(1, 1), scale=0.0), without)
    assert np.array_equal(_render(pipe, pose=_pose(2, 2), scale=0.0), without)


def test_every_sampler_runs_and_repeats_per_seed(clean: LoraStack) -> None:
    pipe = clean.pipe
    plain = build_pipeline(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet,
                           pipe.scheduler)
    results = {}
    for name in SAMPLERS:
        plain.scheduler = make_scheduler(name, pipe.scheduler.config)
        results[name] = _render(plain, steps=3, size=64)
        if "SDE" in name or name == "Euler a":  # samplers that draw noise at every step
            assert np.array_equal(_render(plain, steps=3, size=64), results[name]), name
            assert not np.array_equal(_render(plain, steps=3, size=64, seed=2), results[name])
    assert type(make_scheduler("DPM++ SDE Karras", pipe.scheduler.config)).__name__ \
        == "DPMSolverSDEScheduler"
    assert len({arr.tobytes() for arr in results.values()}) >= len(SAMPLERS) - 1


@pytest.mark.parametrize("sampler", ["DPM++ 2M Karras", "Euler a", "DPM++ SDE Karras"])
def test_a_batch_renders_each_seed_as_it_renders_alone(clean: LoraStack, sampler: str) -> None:
    """Seeds denoised together give each seed its own image: its noise (initial, per-step,
    Brownian) and its pose, in order, as when rendered alone, up to rounding."""
    pipe = clean.pipe
    pipe.scheduler = make_scheduler(sampler, pipe.scheduler.config)
    embeds, negative = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder, "a red knight",
                                          "lowres", 2)
    seeds, poses = [3, 4, 5], [_pose(3), _pose(4), _pose(3)]
    alone = [np.asarray(render(pipe, embeds, negative, SIZE, SIZE, 3, 7.0, seed, image=pose),
                        dtype=np.int16) for seed, pose in zip(seeds, poses, strict=True)]
    together = [np.asarray(image, dtype=np.int16) for image in
                render_batch(pipe, embeds, negative, SIZE, SIZE, 3, 7.0, seeds, poses)]
    for single, batched in zip(alone, together, strict=True):
        assert np.abs(single - batched).max() <= 2
    assert np.abs(together[0] - together[1]).max() > 50
    assert np.abs(together[0] - together[2]).max() > 50


def test_prompt_encoding_matches_training_and_long_prompts_work(clean: LoraStack) -> None:
    pipe = clean.pipe
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    embeds, negative = encode_prompt_pair(tokenizer, text_encoder, "a red knight, solo", "", 2)
    with torch.no_grad():
        trained = encode_token_ids(text_encoder, chunk_token_ids(tokenizer,
                                                                 ["a red knight, solo"], 3), 2)
    assert torch.equal(embeds, trained)
    assert embeds.shape == negative.shape == (1, 77, 32)

    long_prompt = ", ".join(["knight"] * 100)
    long_embeds, long_negative = encode_prompt_pair(tokenizer, text_encoder, long_prompt,
                                                    "lowres", 2)
    assert len(tokenizer(long_prompt, add_special_tokens=False)["input_ids"]) > 150
    assert long_embeds.shape == long_negative.shape == (1, 3 * 77, 32)
    image = _render(pipe, prompt=", ".join(["knight"] * 50))  # 100 tokens: 2 chunks
    assert image.std() > 0

    weighted, _ = encode_prompt_pair(tokenizer, text_encoder, "a (red:1.5) knight", "", 2)
    plain, _ = encode_prompt_pair(tokenizer, text_encoder, "a red knight", "", 2)
    ratio = weighted[0].norm(dim=-1) / plain[0].norm(dim=-1)
    assert torch.allclose(ratio[2] / ratio[1], torch.tensor(1.5), atol=1e-4)  # bos, a, red
    assert torch.allclose(ratio[3] / ratio[1], torch.tensor(1.0), atol=1e-4)


def _write_run(runs_dir: Path, name: str, status: str, finished_at: str | None,
               lora: Path | None) -> Path:
    run_dir = runs_dir / name
    run_dir.mkdir(parents=True)
    record = {"name": name, "status": status, "updated_at": finished_at or "2026-01-01T00:00:00"}
    if finished_at:
        record["finished_at"] = finished_at
    (run_dir / "run.json").write_text(json.dumps(record))
    if lora is not None:
        shutil.copy(lora, run_dir / f"{name}.safetensors")
    return run_dir


def test_newest_finished_lora_skips_unfinished_runs_and_half_written_files(
        tmp_path: Path, lora_files: dict[str, Path]) -> None:
    runs_dir = tmp_path / "Multi_Concept_Output"
    old = _write_run(runs_dir, "old", "finished", "2026-01-01T10:00:00+0000", lora_files["a"])
    _write_run(runs_dir, "newer", "interrupted", None, lora_files["b"])
    _write_run(runs_dir, "busy", "running", None, None)
    (runs_dir / "busy" / ".busy.safetensors.x1y2.tmp").write_bytes(
        lora_files["b"].read_bytes())
    cut = _write_run(runs_dir, "cut", "finished", "2026-01-03T10:00:00+0000", None)
    data = lora_files["b"].read_bytes()
    (cut / "cut.safetensors").write_bytes(data[: len(data) // 2])
    assert newest_lora(runs_dir, tmp_path).run_dir == old

    _write_run(runs_dir, "fresh", "finished", "2026-01-02T10:00:00+0000", lora_files["b"])
    assert newest_lora(runs_dir, tmp_path).run_dir == runs_dir / "fresh"

    for name in ("old", "fresh"):
        shutil.rmtree(runs_dir / name)
    with pytest.raises(ForgeError) as info:
        newest_lora(runs_dir, tmp_path)
    message = str(info.value)
    for part in ("newer (interrupted)", "busy (running)", "cut (finished, but is incomplete"):
        assert part in message, message
    lost = _write_run(runs_dir, "lost", "finished", None, lora_files["a"])
    (lost / "run.json").write_text('{"status": "fini')  # cut short: the LoRA is still usable
    with pytest.raises(ForgeError) as info:
        newest_lora(runs_dir, tmp_path)
    assert "lost (damaged)" in str(info.value)
    (runs_dir / "bare").mkdir()  # a record without a status: listed as unknown, no KeyError
    (runs_dir / "bare" / "run.json").write_text('{"name": "bare", "step": 3}')
    with pytest.raises(ForgeError, match=r"bare \(unknown\)"):
        newest_lora(runs_dir, tmp_path)
    assert f"a damaged run's LoRA is still usable: pass --lora {lost / 'lost.safetensors'}" in (
        info.value.fix or "")


def _project(root: Path, tiny_store: Path, generate: dict[str, object]) -> Path:
    from loraforge.project import toml_value

    root.mkdir(parents=True, exist_ok=True)
    lines = ["[storage]", 'root = "store"', "[models]",
             f'base = "{tiny_store / "tiny-sd15"}"',
             f'controlnet = "{tiny_store / "tiny-controlnet"}"', "[generate]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in generate.items()]
    config = root / "forge.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


@pytest.fixture()
def own_environment() -> Iterator[None]:
    """generate() sets the offline switches and HF_HOME for its process: keep them out of the
    tests that run after this one (their subprocesses inherit os.environ)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_generate_writes_png_info_sidecar_pose_and_final_image(
        tmp_path: Path, tiny_store: Path, lora_files: dict[str, Path],
        own_environment: None) -> None:
    from loraforge.generate.run import generate

    config = _project(tmp_path, tiny_store, {"width": SIZE, "height": SIZE, "steps": 3,
                                             "figures": 1, "lora_weight": 0.7})
    runs_dir = tmp_path / "store" / "Multi_Concept_Output"
    run = _write_run(runs_dir, "blake", "finished", "2026-01-02T10:00:00+0000", lora_files["a"])
    style = _write_run(runs_dir, "style", "finished", "2026-01-01T10:00:00+0000",
                       lora_files["b"])
    _write_run(runs_dir, "later", "interrupted", None, lora_files["b"])
    settings = load_settings(config)
    lines: list[str] = []
    prompt = "a (red:1.2) knight <lora:style:0.3>"
    written = generate(settings, Options(prompt=prompt, negative="lowres", seed=7, count=2,
                                         cfg=6.5), lines.append)
    images = tmp_path / "store" / "Final_Images"
    assert written == [images / "scene-7.png", images / "scene-8.png"]

    lora = run / "blake.safetensors"
    info = pnginfo.parse_parameters(pnginfo.read_parameters(written[0]) or "")
    unet_sha = sha256_file(tiny_store / "tiny-sd15" / "unet" /
                           "diffusion_pytorch_model.safetensors")
    lora_file = inspect_lora(lora, BaseWidths.of(tiny_store / "tiny-sd15"))
    style_file = inspect_lora(style / "style.safetensors", BaseWidths.of(tiny_store /
                                                                          "tiny-sd15"))
    # pasted into A1111 (>= 1.9) it applies both LoRAs at these weights, with this sampler
    assert info["prompt"] == "a (red:1.2) knight <lora:blake:0.7> <lora:style:0.3>"
    assert info["negative_prompt"] == "lowres"
    assert (info["Steps"], info["Sampler"], info["Schedule type"], info["CFG scale"],
            info["Seed"]) == (3, "DPM++ 2M", "Karras", 6.5, 7)
    assert (info["width"], info["height"], info["Clip skip"]) == (SIZE, SIZE, 1)
    assert info["Model"] == "tiny-sd15" and info["Model hash"] == unet_sha[:10]
    assert info["lora_hashes"] == [("blake", lora_file.sha256[:12]),
                                   ("style", style_file.sha256[:12])]
    assert "tiny-controlnet" in info["ControlNet 0"]
    assert info["Version"].startswith("loraforge ")

    sidecar = json.loads((images / "scene-7.json").read_text())
    assert sidecar["parameters"] == pnginfo.read_parameters(written[0])
    assert (sidecar["prompt"], sidecar["steps"], sidecar["cfg_scale"], sidecar["seed"],
            sidecar["clip_skip"], sidecar["sampler"]) == (prompt, 3, 6.5, 7, 1,
                                                          info["sampler"])
    assert sidecar["model"]["hash"] == info["Model hash"]
    assert sidecar["loras"][0] == {"name": "blake", "path": str(lora.resolve()), "weight": 0.7,
                                   "hash": lora_file.short_hash, "sha256": lora_file.sha256}
    assert (sidecar["loras"][1]["name"], sidecar["loras"][1]["weight"]) == ("style", 0.3)
    assert sidecar["image"] == str(written[0])
    assert sidecar["batch_size"] == 2  # count 2 within the default generate.batch_size

    from PIL import Image

    with Image.open(images / "scene-7.pose.png") as pose:
        assert np.array_equal(np.asarray(pose.convert("RGB")),
                              np.asarray(draw_pose(random_pose(1, SIZE, SIZE, 7))))
    assert (images / "final_command_scene.png").read_bytes() == written[1].read_bytes()
    assert not list(images.glob(".*"))
    assert any("no pose map" in line for line in lines)


def test_two_lora_files_of_one_name_keep_a_hash_each_and_are_warned_of(
        tmp_path: Path, tiny_store: Path, lora_files: dict[str, Path], own_environment: None,
        caplog: pytest.LogCaptureFixture) -> None:
    """`--lora multi_concept:0.6 --lora other/multi_concept.safetensors:0.4` (every project's
    run is `multi_concept`): the PNG info named both alike, its `Lora hashes` kept only the
    second file's, and nothing said that A1111 cannot tell them apart."""
    from loraforge.generate.run import generate

    config = _project(tmp_path, tiny_store, {"width": SIZE, "height": SIZE, "steps": 1,
                                             "figures": 1})
    run = _write_run(tmp_path / "store" / "Multi_Concept_Output", "multi_concept", "finished",
                     "2026-01-02T10:00:00+0000", lora_files["a"])
    other = tmp_path / "other" / "multi_concept.safetensors"
    other.parent.mkdir()
    shutil.copy(lora_files["b"], other)
    (made,) = generate(load_settings(config),
                       Options(loras=["multi_concept:0.6", f"{other}:0.4"]), lambda line: None)
    info = pnginfo.parse_parameters(pnginfo.read_parameters(made) or "")
    assert info["prompt"].endswith("<lora:multi_concept:0.6> <lora:multi_concept:0.4>")
    widths = BaseWidths.of(tiny_store / "tiny-sd15")
    hashes = [inspect_lora(path, widths).short_hash
              for path in (run / "multi_concept.safetensors", other)]
    assert info["Lora hashes"] == f"multi_concept: {hashes[0]}, multi_concept: {hashes[1]}"
    said = f"{(run / 'multi_concept.safetensors').resolve()} and {other} share the name " \
           "`multi_concept`, the one A1111 knows a LoRA by: the image's PNG info cannot tell " \
           "them apart"
    assert said in caplog.text
    (warning,) = json.loads(made.with_suffix(".json").read_text())["warnings"]
    assert said in warning and "rename one of the files" in warning


def test_a_random_seed_in_the_config_draws_the_seed_the_image_is_named_by(
        tmp_path: Path, tiny_store: Path, own_environment: None) -> None:
    """`generate.seed = -1` was refused when forge.toml was read, while `--seed -1` drew a
    random seed."""
    from loraforge.generate.run import generate

    config = _project(tmp_path, tiny_store, {"width": SIZE, "height": SIZE, "steps": 1,
                                             "figures": 1, "seed": -1})
    (made,) = generate(load_settings(config), Options(loras=["none"]), lambda line: None)
    seed = pnginfo.parse_parameters(pnginfo.read_parameters(made) or "")["Seed"]
    assert made.name == f"scene-{seed}.png" and seed >= 0


def test_from_renders_with_the_pose_map_saved_beside_the_image(
        tmp_path: Path, tiny_store: Path, own_environment: None,
        caplog: pytest.LogCaptureFixture) -> None:
    """A drawn pose map is recorded by its path: edited since, `--from` rendered another
    image; deleted, `--from` failed. The map saved beside the image is the one it renders
    with, so the image is kept as it is, and made again the same from a copy of the two."""
    from loraforge.generate.poses import draw_pose, random_pose
    from loraforge.generate.run import generate

    config = _project(tmp_path, tiny_store, {"width": SIZE, "height": SIZE, "steps": 2,
                                             "seed": 5})
    settings = load_settings(config)
    pose = tmp_path / "edit.png"
    draw_pose(random_pose(1, SIZE, SIZE, 7)).save(pose)
    (made,) = generate(settings, Options(loras=["none"], pose=str(pose)), lambda line: None)
    first = made.read_bytes()
    draw_pose(random_pose(1, SIZE, SIZE, 99)).save(pose)  # edited in a pose editor since
    lines: list[str] = []
    assert generate(settings, Options(source=made), lines.append) == [made]
    assert any(line.endswith("kept)") for line in lines) and made.read_bytes() == first
    pose.unlink()
    copy = tmp_path / "keep.png"  # the image and its pose map copied away, then deleted
    copy.write_bytes(first)
    (tmp_path / "keep.pose.png").write_bytes(made.with_name("scene-5.pose.png").read_bytes())
    for old in made.parent.glob("scene-5*"):
        old.unlink()
    assert generate(settings, Options(source=copy), lambda line: None) == [made]
    assert made.read_bytes() == first
    assert f"the pose map {pose} is gone" in caplog.text


def test_from_renders_from_anywhere_an_image_whose_prompt_tag_named_a_relative_file(
        tmp_path: Path, tiny_store: Path, lora_files: dict[str, Path], own_environment: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`--prompt "a knight <lora:ep1:0.7>"` with ep1.safetensors in the folder it ran in: the
    record kept the tag, and `--from` looked for the file beside the image ("LoRA file not
    found"), even in place. An image recorded before, its tag kept, still renders as it did."""
    from PIL import Image

    from loraforge.generate.run import generate

    config = _project(tmp_path, tiny_store, {"width": SIZE, "height": SIZE, "steps": 2,
                                             "figures": 1, "seed": 5})
    settings = load_settings(config)
    shutil.copy(lora_files["a"], tmp_path / "ep1.safetensors")
    monkeypatch.chdir(tmp_path)
    (made,) = generate(settings, Options(prompt="a knight <lora:ep1:0.7>", loras=["none"]),
                       lambda line: None)
    first = made.read_bytes()
    parameters = pnginfo.read_parameters(made)
    assert pnginfo.parse_parameters(parameters or "")["prompt"] == "a knight <lora:ep1:0.7>"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    copy = elsewhere / "keep.png"
    copy.write_bytes(first)
    for old in made.parent.glob("scene-5*"):
        old.unlink()
    monkeypatch.chdir(elsewhere)
    assert generate(settings, Options(source=copy), lambda line: None) == [made]
    assert made.read_bytes() == first

    before = pnginfo.read_scene(made) or {}
    before["scene"]["prompt"] = "a knight <lora:ep1:0.7>"  # relative to tmp_path, not here
    with Image.open(made) as image:
        pnginfo.save_png_with_scene(image, made, parameters, before)
    lines: list[str] = []
    assert generate(settings, Options(source=made), lines.append) == [made]
    assert f"[1/1] {made} (made before with the same settings: kept)" in lines


def test_from_says_when_a_lora_is_not_the_file_the_image_was_made_with(
        tmp_path: Path, tiny_store: Path, own_environment: None) -> None:
    """A LoRA retrained (or replaced) under the same path: `--from` rendered another image,
    beside the first, without a word about why."""
    from loraforge.generate.run import generate

    config = _project(tmp_path, tiny_store, {"width": SIZE, "height": SIZE, "steps": 2,
                                             "seed": 5})
    settings = load_settings(config)
    lora = make_lora(tmp_path / "style.safetensors", tiny_store / "tiny-sd15", 1)
    (made,) = generate(settings, Options(loras=[str(lora)]), lambda line: None)
    lines: list[str] = []
    assert generate(settings, Options(source=made), lines.append) == [made]
    assert not any("is not the file" in line for line in lines)
    make_lora(lora, tiny_store / "tiny-sd15", 2)  # retrained since
    lines.clear()
    assert generate(settings, Options(source=made), lines.append) == [
        made.with_name("scene-5-v2.png")]
    assert f"note: {lora} is not the file scene-5.png was made with" in lines[0]


def test_an_image_made_with_other_settings_is_kept_and_a_rerun_adds_nothing(
        tmp_path: Path, tiny_store: Path, own_environment: None) -> None:
    from loraforge.generate.run import generate

    config = _project(tmp_path, tiny_store, {"width": SIZE, "height": SIZE, "steps": 2,
                                             "figures": 1, "seed": 5})
    settings = load_settings(config)
    first = generate(settings, Options(loras=["none"]), lambda line: None)
    kept = first[0].read_bytes()
    other = generate(settings, Options(loras=["none"], cfg=3.0), lambda line: None)
    images = tmp_path / "store" / "Final_Images"
    assert other == [images / "scene-5-v2.png"] and first == [images / "scene-5.png"]
    assert first[0].read_bytes() == kept
    assert json.loads((images / "scene-5-v2.json").read_text())["image"] == str(other[0])
    assert (images / "scene-5-v2.pose.png").is_file()
    made = other[0].stat().st_mtime_ns
    lines: list[str] = []
    again = generate(settings, Options(loras=["none"], cfg=3.0), lines.append)
    assert again == other
    assert f"[1/1] {other[0]} (made before with the same settings: kept)" in lines
    assert other[0].stat().st_mtime_ns == made  # not made again
    assert (images / "final_command_scene.png").read_bytes() == other[0].read_bytes()
    # made alike but otherwise (VAE tiling here; the weights, device, precision): made again,
    # beside it (it was replaced: a GPU's image by a login node's rendering of it)
    tiled = load_settings(config, ["generate.vae_tiling=true"])
    lines.clear()
    v3 = [images / "scene-5-v3.png"]
    assert generate(tiled, Options(loras=["none"], cfg=3.0), lines.append) == v3
    assert not any("kept" in line for line in lines) and other[0].stat().st_mtime_ns == made
    assert json.loads((images / "scene-5-v3.json").read_text())["made_with"]["vae_tiling"]
    assert not json.loads((images / "scene-5-v2.json").read_text())["made_with"]["vae_tiling"]
    assert generate(tiled, Options(loras=["none"], cfg=3.0), lines.append) == v3  # and kept

    # one seed of a batch made again records the seeds denoised with it (--from renders it
    # bit for bit), not its whole batch's
    pair = Options(loras=["none"], seed=20, count=2)
    generate(settings, pair, lambda line: None)
    (images / "scene-21.png").unlink()
    lines.clear()
    generate(settings, pair, lines.append)
    assert [line.endswith("kept)") for line in lines if line.startswith("[")] == [True, False]
    assert pnginfo.read_scene(images / "scene-21.png")["scene"]["seeds"] == [21]
    assert pnginfo.read_scene(images / "scene-20.png")["scene"]["seeds"] == [20, 21]
    assert sorted(p.name for p in images.glob("scene-5*.png")) == [
        "scene-5-v2.png", "scene-5-v2.pose.png", "scene-5-v3.png", "scene-5-v3.pose.png",
        "scene-5.png", "scene-5.pose.png"]

    # a file of the user's under an image's name, beside no image of ours, is not replaced
    notes = images / "scene-6.json"
    notes.write_text('{"my": "notes"}')
    beside = generate(settings, Options(loras=["none"], seed=6), lambda line: None)
    assert beside == [images / "scene-6-v2.png"] and notes.read_text() == '{"my": "notes"}'


def _start_generate(config: Path) -> subprocess.Popen[str]:
    """`loraforge generate --lora none` of this project, its output read as it comes."""
    env = {k: v for k, v in os.environ.items() if k != "LORAFORGE_STORAGE_ROOT"}
    command = [sys.executable, "-m", "loraforge", "generate", "--config", str(config),
               "--lora", "none"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, **ONE_THREAD})


def test_a_time_limit_warning_stops_between_images_and_the_rerun_goes_on(
        tmp_path: Path, tiny_store: Path) -> None:
    """SLURM's SIGUSR1 ended `generate` on the spot, and its job script requeued the job, which
    made every image again from the first: a long job never finished. It now stops after the
    image in hand (exit 75, which the script requeues) and the rerun keeps what was made."""
    config = _project(tmp_path, tiny_store, {"width": SIZE, "height": SIZE, "steps": 6,
                                             "figures": 1, "seed": 10, "count": 6,
                                             "batch_size": 1})
    process = _start_generate(config)
    assert process.stdout is not None
    first = ""
    for line in process.stdout:
        if line.startswith("[1/6]"):
            first = line
            process.send_signal(signal.SIGUSR1)
            break
    rest, err = process.communicate(timeout=300)
    assert first and process.returncode == 75, (first, rest, err)
    done = [line.split()[1] for line in (first + rest).splitlines() if line.startswith("[")]
    assert 1 <= len(done) < 6, rest
    assert (f"stopped by SIGUSR1 (a time limit is near): {len(done)} of 6 images written; "
            "rerun the same command to go on") in err
    times = {path: Path(path).stat().st_mtime_ns for path in done}

    again = run_cli("generate", "--config", config, "--lora", "none", env=ONE_THREAD)
    assert again.returncode == 0, again.stderr
    lines = [line for line in again.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == 6
    assert [line.split()[1] for line in lines if line.endswith("kept)")] == done
    assert all(Path(path).stat().st_mtime_ns == made for path, made in times.items())
    images = tmp_path / "store" / "Final_Images"
    assert len(list(images.glob("scene-*.pose.png"))) == 6


def test_a_time_limit_warning_while_the_models_load_is_a_clean_resumable_exit(
        tmp_path: Path, tiny_store: Path) -> None:
    """SIGUSR1 while the models loaded ended `generate` with 138 (the signal's default action:
    its handler came only once they were loaded), not the resumable 75, and said nothing. Its
    seeds drawn at random (-1), the same command would draw others: the message says which
    seed to rerun with instead."""
    config = _project(tmp_path, tiny_store, {"width": SIZE, "height": SIZE, "steps": 2,
                                             "figures": 1, "count": 2, "seed": -1})
    process = _start_generate(config)
    assert process.stdout is not None
    for line in process.stdout:
        if "no LoRA (base model alone)" in line:  # said as the libraries and models load
            process.send_signal(signal.SIGUSR1)
            break
    _, err = process.communicate(timeout=120)
    assert process.returncode == 75, err
    assert "stopped by SIGUSR1 (a time limit is near): nothing rendered yet, 0 of 2 images " \
           "written; its seeds were drawn at random (-1)" in err and "Traceback" not in err
    assert re.search(r"rerun it with the seeds drawn in place of -1 \(scene: \d+\)", err)
    assert not list((tmp_path / "store" / "Final_Images").glob("*.png"))


def test_two_generates_on_one_folder_keep_each_others_images(
        tmp_path: Path, tiny_store: Path, own_environment: None) -> None:
    """Two generate jobs on one project (other prompts, the same seeds) both chose `scene-11`
    before either wrote it; the one that finished last replaced the other's image, and both
    said they had written it. The name is chosen again, under a lock, when the image is
    written: the second takes `scene-11-v2`."""
    from loraforge.generate.run import generate

    config = _project(tmp_path, tiny_store, {"width": SIZE, "height": SIZE, "steps": 2,
                                             "figures": 1, "batch_size": 2})
    settings = load_settings(config)
    images = tmp_path / "store" / "Final_Images"
    theirs = tmp_path / "theirs"
    generate(settings, Options(loras=["none"], prompt="a dog", seed=11), lambda line: None)
    theirs.mkdir()
    for path in images.glob("scene-11*"):
        path.rename(theirs / path.name)

    lines: list[str] = []

    def progress(line: str) -> None:
        lines.append(line)
        if line.startswith("[1/2]"):  # seeds 10 and 11 were named and rendered together; the
            for path in theirs.iterdir():  # other job's scene-11 lands before 11 is written
                path.rename(images / path.name)

    written = generate(settings, Options(loras=["none"], prompt="a cat", seed=10, count=2),
                       progress)
    assert written == [images / "scene-10.png", images / "scene-11-v2.png"], lines
    assert "a dog" in (pnginfo.read_parameters(images / "scene-11.png") or "")
    assert "a cat" in (pnginfo.read_parameters(images / "scene-11-v2.png") or "")
    record = json.loads((images / "scene-11-v2.json").read_text())
    assert record["image"] == str(images / "scene-11-v2.png")


def test_command_renders_a_scenes_file_end_to_end(tmp_path: Path, tiny_store: Path,
                                                   lora_files: dict[str, Path]) -> None:
    config = _project(tmp_path, tiny_store, {"width": SIZE, "height": SIZE, "steps": 2})
    pose_file = tmp_path / "poses" / "wide.png"
    pose_file.parent.mkdir()
    draw_pose(random_pose(2, 192, 96, 3)).save(pose_file)
    shutil.copy(lora_files["b"], tmp_path / "poses" / "style.safetensors")
    scenes = tmp_path / "poses" / "scenes.toml"
    scenes.write_text(
        '[[scene]]\nname = "Beach day"\nprompt = "two knights on a beach"\n'
        'pose = "wide.png"\nseeds = [3, 4]\nloras = ["style.safetensors:0.5"]\n\n'
        '[[scene]]\nname = "night"\nprompt = "a mage at night"\npose = "random"\n'
        'figures = 1\nsize = "100x98"\nsampler = "Euler a"\nseed = 5\nloras = ["none"]\n')
    result = run_cli("generate", "--config", config, "--scenes", scenes, "--lora", "missing",
                     "--batch-size", "1", env=ONE_THREAD, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "104x96" in result.stdout and "rounded" in result.stdout
    assert "[transformers]" not in result.stderr  # library chatter stays out of job logs
    images = tmp_path / "store" / "Final_Images"
    names = sorted(p.name for p in images.iterdir())
    assert names == ["Beach_day-3.json", "Beach_day-3.png", "Beach_day-3.pose.png",
                     "Beach_day-4.json", "Beach_day-4.png", "Beach_day-4.pose.png",
                     "final_command_scene.png", "night-5.json", "night-5.png",
                     "night-5.pose.png"]
    beach = pnginfo.parse_parameters(pnginfo.read_parameters(images / "Beach_day-4.png") or "")
    night = pnginfo.parse_parameters(pnginfo.read_parameters(images / "night-5.png") or "")
    assert beach["prompt"] == "two knights on a beach <lora:style:0.5>" and beach["Seed"] == 4
    assert [name for name, _ in beach["lora_hashes"]] == ["style"]
    assert (night["Sampler"], night["Schedule type"], night["Size"]) == \
        ("Euler a", "Automatic", "104x96")
    assert "Lora hashes" not in night
    assert (images / "final_command_scene.png").read_bytes() == \
        (images / "night-5.png").read_bytes()
    sidecar = json.loads((images / "Beach_day-3.json").read_text())
    assert sidecar["pose_source"] == str(pose_file.resolve())
    assert sidecar["loras"][0]["weight"] == 0.5
    assert sidecar["batch_size"] == 1
    from PIL import Image

    with Image.open(images / "Beach_day-3.pose.png") as pose:  # 192x96 letterboxed to 96x96
        bars = np.asarray(pose.convert("RGB"))
    assert bars.shape == (SIZE, SIZE, 3)
    assert bars[:20].max() == 0 and bars[-20:].max() == 0 and bars[24:72].max() > 0
    assert "letterboxed" in result.stderr
