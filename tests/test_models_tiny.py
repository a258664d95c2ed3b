"""The embedded tiny model, the offline CLIP tokenizer and model path resolution."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli

from loraforge.config import ForgeConfig, ModelsConfig, Settings, StorageConfig
from loraforge.errors import ForgeError
from loraforge.models import folders, store, tiny
from loraforge.models.tokenizer import build_clip_tokenizer

KOHYA_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2",
                      "proj_in", "proj_out")
KOHYA_TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def module_tree(model: Any) -> list[tuple[str, str]]:
    return [(name, type(module).__name__) for name, module in model.named_modules()]


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def settings_for(root: Path, base: str = "tiny", controlnet: str = "tiny") -> Settings:
    config = ForgeConfig(storage=StorageConfig(root=str(root)),
                         models=ModelsConfig(base=base, controlnet=controlnet))
    return Settings(config, root, None)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _no_storage_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAFORGE_STORAGE_ROOT", raising=False)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1, and any attempt to open a connection fails the test."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --- tokenizer -----------------------------------------------------------------------------


def test_tokenizer_matches_sd15() -> None:
    tok = build_clip_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.model_max_length == 77
    assert build_clip_tokenizer() is tok  # cached in-process


def test_tokenizer_truncates_and_pads() -> None:
    tok = build_clip_tokenizer()
    long = tok(["cat " * 200, "a photo of a cat"], padding="max_length", truncation=True,
               max_length=tok.model_max_length).input_ids
    assert [len(ids) for ids in long] == [77, 77]
    assert long[0][0] == 49406 and long[0][-1] == 49407
    assert long[0][1:-1] == [2368] * 75  # "cat</w>"
    assert long[1][:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert long[1][7:] == [49407] * 70


def test_saved_tokenizer_reloads(tiny_store: Path) -> None:
    from transformers import CLIPTokenizer

    folder = tiny_store / tiny.BASE_NAME / "tokenizer"
    assert {"tokenizer.json", "vocab.json", "merges.txt"} <= {p.name for p in folder.iterdir()}
    tok = CLIPTokenizer.from_pretrained(folder)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(json.loads((folder / "vocab.json").read_text(encoding="utf-8"))) == 49408


# --- architecture ----------------------------------------------------------------------------


def test_module_trees_equal_real_sd15(tiny_store: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    base = tiny_store / tiny.BASE_NAME
    with torch.device("meta"):
        real = {
            "unet": UNet2DConditionModel.from_config(tiny.sd15_config("unet")),
            "vae": AutoencoderKL.from_config(tiny.sd15_config("vae")),
            "text_encoder": CLIPTextModel(tiny.clip_text_config(tiny.sd15_config("text_encoder"))),
        }
    small = {
        "unet": UNet2DConditionModel.from_pretrained(base / "unet"),
        "vae": AutoencoderKL.from_pretrained(base / "vae"),
        "text_encoder": CLIPTextModel.from_pretrained(base / "text_encoder"),
    }
    # The shipped configs are SD 1.5's: its published parameter counts.
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in real.items()}
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    for key in real:
        assert module_tree(small[key]) == module_tree(real[key]), key
        assert all(p.dtype == torch.float32 for p in small[key].parameters()), key
    assert small["text_encoder"].config.vocab_size == 49408
    assert small["text_encoder"].config.max_position_embeddings == 77


def _kohya_targets(model: Any, inside: str, names: tuple[str, ...]) -> list[str]:
    import torch

    found = []
    for name, module in model.named_modules():
        if inside not in name or not name.endswith(names):
            continue
        if isinstance(module, torch.nn.Linear) or (
                isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1)):
            found.append(name)
    return found


def test_kohya_target_counts(tiny_store: Path) -> None:
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from transformers import CLIPTextModel

    base = tiny_store / tiny.BASE_NAME
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder")

    unet_linear_in_transformers = set()
    for name, module in unet.named_modules():
        if isinstance(module, Transformer2DModel):
            for sub_name, sub in module.named_modules():
                if isinstance(sub, torch.nn.Linear) or (
                        isinstance(sub, torch.nn.Conv2d) and sub.kernel_size == (1, 1)):
                    unet_linear_in_transformers.add(f"{name}.{sub_name}")
    assert len(unet_linear_in_transformers) == 192
    assert set(_kohya_targets(unet, "attentions", KOHYA_UNET_TARGETS)) == \
        unet_linear_in_transformers
    te_targets = _kohya_targets(text_encoder, "encoder.layers", KOHYA_TE_TARGETS)
    assert len(te_targets) == 72
    assert "encoder.layers.11.mlp.fc2" in te_targets


# --- building --------------------------------------------------------------------------------


def test_build_is_deterministic_atomic_and_reused(tiny_store: Path, tmp_path: Path) -> None:
    root = tmp_path / "other"
    root.mkdir()
    # What a killed build or a broken copy leaves behind: never taken for a model.
    half = root / tiny.BASE_NAME
    (half / "unet").mkdir(parents=True)
    (half / "unet" / "config.json").write_text("{}", encoding="utf-8")
    stale = root / f".{tiny.BASE_NAME}.killed{tiny.PARTIAL_SUFFIX}"
    stale.mkdir()
    (stale / "model_index.json").write_text("{}", encoding="utf-8")
    os.utime(stale, (1_000_000_000, 1_000_000_000))
    assert not tiny.is_complete(half, "base")

    # Using the shared in-process tokenizer must not change what later builds save.
    build_clip_tokenizer()(["a cat"], padding="max_length", truncation=True, max_length=77)
    base, controlnet = tiny.ensure_tiny_models(root)
    assert (base, controlnet) == (root / tiny.BASE_NAME, root / tiny.CONTROLNET_NAME)
    assert not stale.exists()
    leftovers = {p.name for p in root.iterdir()} - {tiny.BASE_NAME, tiny.CONTROLNET_NAME,
                                                    tiny.LOCK_NAME}
    assert not leftovers

    ref_base, ref_cn = tiny_store / tiny.BASE_NAME, tiny_store / tiny.CONTROLNET_NAME
    for mine, ref in ((base, ref_base), (controlnet, ref_cn)):
        hashes = file_hashes(mine)
        assert any(name.endswith(".safetensors") for name in hashes)
        assert hashes == file_hashes(ref)  # every file bit-identical, weights included
        assert all(p.stat().st_mode & 0o777 == 0o644 for p in mine.rglob("*") if p.is_file())
    assert folders.read_marker(base) == tiny.marker("base")

    stamp = (base / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert tiny.ensure_tiny_models(root) == (base, controlnet)  # reused, not rebuilt
    assert (base / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp


def test_failed_build_leaves_nothing_behind(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(base_dir: Path, controlnet_dir: Path) -> None:
        (base_dir / "unet").mkdir()
        (base_dir / "model_index.json").write_text("{}", encoding="utf-8")
        raise KeyboardInterrupt  # as if the job were killed mid-build

    monkeypatch.setattr(tiny, "build_tiny_models", crash)
    with pytest.raises(KeyboardInterrupt):
        tiny.ensure_tiny_models(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} <= {tiny.LOCK_NAME}


def test_a_build_that_cannot_write_names_the_model_and_leaves_nothing(tmp_path: Path) -> None:
    def full_disk(folder: Path) -> None:
        (folder / "unet").mkdir()
        raise OSError(28, "No space left on device")

    with pytest.raises(ForgeError, match=r"cannot build the taught tiny model here .*No space"
                       ) as caught:
        folders.build_model(tmp_path, "tiny-taught", full_disk, lambda _: False,
                            "the taught tiny model")
    assert "storage.root" in str(caught.value.fix)
    assert list(tmp_path.iterdir()) == []  # no half folder, no model
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ForgeError, match="cannot build the embedded tiny detector here"):
        folders.build_model(tmp_path / "file", "tiny-detector", lambda _: None,
                            lambda _: False, "the embedded tiny detector")


def test_concurrent_builds_agree(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(tiny.ensure_tiny_models, [tmp_path, tmp_path]))
    base, controlnet = tmp_path / tiny.BASE_NAME, tmp_path / tiny.CONTROLNET_NAME
    assert results == [(base, controlnet)] * 2
    assert tiny.is_complete(base, "base") and tiny.is_complete(controlnet, "controlnet")

    # A folder from another recipe (older code, other widths) is rebuilt, not reused.
    (base / folders.MARKER).write_text(json.dumps(tiny.marker("base") | {"recipe": "old"}),
                                    encoding="utf-8")
    (base / "unet" / "config.json").write_text("{}", encoding="utf-8")
    assert tiny.ensure_tiny_models(tmp_path) == (base, controlnet)
    assert tiny.is_complete(base, "base")
    assert json.loads((base / "unet" / "config.json").read_text(encoding="utf-8"))


def test_pipeline_renders_offline_and_pose_matters(tiny_store: Path, no_network: None) -> None:
    import numpy as np
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    controlnet = ControlNetModel.from_pretrained(tiny_store / tiny.CONTROLNET_NAME)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_store / tiny.BASE_NAME,
                                                             controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"

    def pose(x: int) -> Image.Image:
        canvas = np.zeros((64, 64, 3), dtype=np.uint8)
        canvas[10:54, x:x + 6] = (255, 0, 85)
        canvas[20:24, 8:56] = (0, 255, 0)
        return Image.fromarray(canvas)

    def render(image: Image.Image) -> np.ndarray:
        result = pipe("a photo of a cat", image=image, num_inference_steps=4, height=64,
                      width=64, generator=torch.Generator().manual_seed(7), output_type="np")
        return result.images[0]

    left, right, again = render(pose(10)), render(pose(44)), render(pose(10))
    assert left.shape == (64, 64, 3)
    assert np.isfinite(left).all()
    np.testing.assert_array_equal(left, again)
    assert np.abs(left - right).max() > 0.02  # the ControlNet path is live


# --- store -----------------------------------------------------------------------------------


NO_TENSORS = "\x02\x00\x00\x00\x00\x00\x00\x00{}"  # a safetensors file: an empty header


def _skeleton(folder: Path, unet_config: dict[str, Any] | None = None,
              skip: tuple[str, ...] = ()) -> Path:
    """A diffusers-layout folder with configs and weight files of no tensors."""
    (folder).mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}',
                                             encoding="utf-8")
    files = {
        "unet/config.json": json.dumps(unet_config or tiny.sd15_config("unet")),
        "unet/diffusion_pytorch_model.safetensors": NO_TENSORS,
        "vae/config.json": "{}",
        "vae/diffusion_pytorch_model.safetensors": NO_TENSORS,
        "text_encoder/config.json": "{}",
        "text_encoder/model.safetensors": NO_TENSORS,
        "tokenizer/tokenizer.json": "{}",
        "scheduler/scheduler_config.json": "{}",
    }
    for name, text in files.items():
        if name.split("/")[0] in skip:
            continue
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_store_tiny_resolves(tiny_store: Path) -> None:
    settings = settings_for(tiny_store)
    base = store.resolve_base_model(settings)
    controlnet = store.resolve_controlnet(settings)
    assert base == tiny_store / tiny.BASE_NAME
    assert controlnet == tiny_store / tiny.CONTROLNET_NAME
    # The built folders also pass the checks when named by path.
    store.check_base_model(base)
    store.check_controlnet(controlnet)
    store.check_pair(base, controlnet)
    assert store.resolve_base_model(settings_for(tiny_store, base=str(base))) == base


@pytest.mark.slow
def test_taught_base_denoises_and_paints_the_colour_its_prompt_names(taught_store: Path) -> None:
    """`models.base = "tiny-taught"`: the tiny model after its lesson on flat colours. Its noise
    prediction for a red picture is far better under "red" than under "blue", and its latents
    have unit spread (the tiny VAE's under SD's scaling factor have 0.05: noise hides them)."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from loraforge.models.taught import COLOURS, LESSON
    from loraforge.text import chunk_token_ids, encode_token_ids

    settings = settings_for(taught_store, base="tiny-taught")
    base = store.resolve_base_model(settings)
    assert base == taught_store / "tiny-taught"
    store.check_base_model(base)
    store.check_pair(base, store.resolve_controlnet(settings))
    weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    built = weights.stat().st_mtime_ns
    assert store.resolve_base_model(settings) == base
    assert weights.stat().st_mtime_ns == built  # built once, then reused
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None,
                                                   requires_safety_checker=False)
    pixels = [np.asarray(Image.new("RGB", (64, 64), COLOURS[name]), dtype=np.float32)
              for name in ("red", "blue")]
    with torch.no_grad():
        latents = pipe.vae.encode(torch.from_numpy(np.stack(pixels) / 127.5 - 1).permute(
            0, 3, 1, 2)).latent_dist.mean * pipe.vae.config.scaling_factor
        assert 0.5 < float(latents.std()) < 2.0
        hidden = encode_token_ids(pipe.text_encoder, chunk_token_ids(
            pipe.tokenizer, ["red", "blue"], 1), LESSON["clip_skip"])
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
        alpha_bar = pipe.scheduler.alphas_cumprod[700]
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
        timesteps = torch.tensor([700, 700])
        right = pipe.unet(noisy, timesteps, encoder_hidden_states=hidden).sample
        wrong = pipe.unet(noisy, timesteps, encoder_hidden_states=hidden.flip(0)).sample
    right_loss, wrong_loss = ((p - noise).pow(2).mean(dim=(1, 2, 3)) for p in (right, wrong))
    assert (right_loss < 0.7 * wrong_loss).all(), (right_loss, wrong_loss)
    assert (right_loss < 0.2).all(), right_loss  # it denoises


def test_store_missing_models_name_the_fetch_commands(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, base="AnyLoRA", controlnet="controlnet-model")
    with pytest.raises(ForgeError) as err:
        store.resolve_base_model(settings)
    assert "loraforge models fetch anylora" in str(err.value)
    assert "loraforge models import" in str(err.value)
    assert err.value.path == tmp_path / "AnyLoRA"
    with pytest.raises(ForgeError) as err:
        store.resolve_controlnet(settings)
    assert "loraforge models fetch controlnet-openpose" in str(err.value)


def test_store_rejects_incomplete_and_foreign_models(tmp_path: Path) -> None:
    no_unet = _skeleton(tmp_path / "NoUnet", skip=("unet",))
    with pytest.raises(ForgeError, match=r"missing unet/"):
        store.resolve_base_model(settings_for(tmp_path, base="NoUnet"))
    assert no_unet.is_dir()  # nothing is touched

    _skeleton(tmp_path / "Sd15")
    assert store.resolve_base_model(settings_for(tmp_path, base="Sd15")) == tmp_path / "Sd15"

    sdxl = tiny.sd15_config("unet") | {"cross_attention_dim": 2048,
                                       "addition_embed_type": "text_time"}
    _skeleton(tmp_path / "Xl", sdxl)
    with pytest.raises(ForgeError, match="SDXL"):
        store.resolve_base_model(settings_for(tmp_path, base="Xl"))

    _skeleton(tmp_path / "Sd2", tiny.sd15_config("unet") | {"cross_attention_dim": 1024})
    with pytest.raises(ForgeError, match=r"SD 2\.x"):
        store.resolve_base_model(settings_for(tmp_path, base="Sd2"))

    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ForgeError, match="loraforge models import"):
        store.resolve_base_model(settings_for(tmp_path, base="model.safetensors"))


def test_store_tiny_marker_needed_for_narrow_models(tiny_store: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_store / tiny.BASE_NAME, copy)
    store.check_base_model(copy)
    (copy / folders.MARKER).unlink()
    with pytest.raises(ForgeError, match="cross_attention_dim is 32"):
        store.check_base_model(copy)
    with pytest.raises(ForgeError, match="does not fit"):
        store.check_pair(_skeleton(tmp_path / "Real"), tiny_store / tiny.CONTROLNET_NAME)


def test_a_damaged_tiny_model_is_named_with_its_repair(tiny_store: Path, tmp_path: Path) -> None:
    for name in (tiny.BASE_NAME, tiny.CONTROLNET_NAME):
        shutil.copytree(tiny_store / name, tmp_path / "store" / name)
    config = tmp_path / "forge.toml"
    config.write_text('[storage]\nroot = "store"\n[models]\nbase = "tiny"\ncontrolnet = "tiny"\n')
    weights = tmp_path / "store" / tiny.BASE_NAME / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    damaged = run_cli("models", "verify", "--config", config)
    assert damaged.returncode == 1
    assert f"delete {tmp_path / 'store' / tiny.BASE_NAME}" in damaged.stdout
    assert "loraforge models tiny" in damaged.stdout and "fetch or import" not in damaged.stdout
    shutil.rmtree(tmp_path / "store" / tiny.BASE_NAME)
    rebuilt = run_cli("models", "tiny", "--config", config)
    assert rebuilt.returncode == 0 and "[transformers]" not in rebuilt.stderr  # no chatter
    assert run_cli("models", "verify", "--config", config).returncode == 0
