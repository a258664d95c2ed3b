"""The embedded default: a tiny pipeline with SD 1.5's module tree, and a ControlNet made from it.

Built from the shipped SD 1.5 configs with only the widths shrunk, from a fixed seed, so the same
code always produces bit-identical weight files. Saved in diffusers layout under the storage root,
so everything else loads it exactly like a real base model. No download is ever needed.

Building is atomic: everything is written into a hidden temporary folder beside the destination,
which is renamed into place only when complete; a killed build leaves a temporary folder that is
never mistaken for a model (the next build removes it). Concurrent builds are serialised by a
lock file. The marker file records the recipe, so a build from other widths is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.errors import ForgeError
from loraforge.fsutil import held_lock
from loraforge.models import folders
from loraforge.runtime import quiet_loading

if TYPE_CHECKING:
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig

BASE_NAME = "tiny-sd15"
CONTROLNET_NAME = "tiny-controlnet"
TINY_KIND = "tiny"
TINY_VERSION = 2  # 2: with manifest.json
SEED = 20240601
PARTIAL_SUFFIX = ".partial"
OLD_SUFFIX = ".old"
LOCK_NAME = ".tiny-models.lock"
STALE_PARTIAL_SECONDS = 6 * 3600
DIR_MODE = 0o755
FILE_MODE = 0o644

# The only values that differ from SD 1.5: widths (and what must follow from them).
UNET_OVERRIDES: dict[str, Any] = {
    "block_out_channels": [16, 32, 64, 64],  # 1:2:4:4 like SD 1.5 (keeps its shortcut convs)
    "norm_num_groups": 8,
    "cross_attention_dim": 32,  # = the tiny text encoder's hidden size
    "sample_size": 8,  # 64 px by default
}
TEXT_ENCODER_OVERRIDES: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "projection_dim": 32,
}
VAE_OVERRIDES: dict[str, Any] = {
    "block_out_channels": [8, 16, 32, 32],  # 1:2:4:4 like SD 1.5
    "norm_num_groups": 8,
    "sample_size": 64,
}
CONTROLNET_COND_CHANNELS = (8, 16, 32, 32)
CONTROLNET_ZERO_CONV_STD = 0.2
CONTROLNET_COND_GAIN = 2.0


def sd15_config(component: str) -> dict[str, Any]:
    """A shipped SD 1.5 config: unet, vae, text_encoder, scheduler or model_index."""
    names = {
        "unet": ("unet", "config.json"),
        "vae": ("vae", "config.json"),
        "text_encoder": ("text_encoder", "config.json"),
        "scheduler": ("scheduler", "scheduler_config.json"),
        "model_index": ("model_index.json",),
    }
    if component not in names:
        raise KeyError(f"no shipped SD 1.5 config for {component!r}")
    resource = resources.files("loraforge").joinpath("data", "sd15", *names[component])
    return json.loads(resource.read_text(encoding="utf-8"))


def sd15_config_dir() -> Path:
    """The shipped SD 1.5 config folder (diffusers layout, configs only, no weights)."""
    return Path(str(resources.files("loraforge").joinpath("data", "sd15")))


def tiny_config(component: str) -> dict[str, Any]:
    """The SD 1.5 config of `component` with the tiny widths applied."""
    overrides = {"unet": UNET_OVERRIDES, "text_encoder": TEXT_ENCODER_OVERRIDES,
                 "vae": VAE_OVERRIDES}.get(component, {})
    config = sd15_config(component)
    config.update(overrides)
    return config


def clip_text_config(config: dict[str, Any]) -> CLIPTextConfig:
    """A transformers CLIPTextConfig from a saved text_encoder/config.json's content."""
    from transformers import CLIPTextConfig

    values = {k: v for k, v in config.items()
              if k not in ("architectures", "transformers_version", "torch_dtype", "dtype")}
    return CLIPTextConfig(**values)


def recipe_hash() -> str:
    """A short fingerprint of everything that decides the weights (widths, seeds, inits)."""
    recipe = [TINY_VERSION, SEED, UNET_OVERRIDES, TEXT_ENCODER_OVERRIDES, VAE_OVERRIDES,
              CONTROLNET_COND_CHANNELS, CONTROLNET_ZERO_CONV_STD, CONTROLNET_COND_GAIN]
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def marker(component: str) -> dict[str, Any]:
    """The content of `loraforge.json` in a finished tiny model folder."""
    return {"kind": TINY_KIND, "component": component, "seed": SEED, "version": TINY_VERSION,
            "recipe": recipe_hash()}


def is_complete(folder: Path, component: str) -> bool:
    """A finished tiny build of the current version (the marker is written last)."""
    return folder.is_dir() and folders.read_marker(folder) == marker(component)


def tiny_folders(storage_root: Path) -> tuple[Path, Path]:
    """(base_dir, controlnet_dir) where the tiny model lives under `storage_root`, built or not."""
    root = Path(storage_root)
    return root / BASE_NAME, root / CONTROLNET_NAME


def ensure_tiny_models(storage_root: Path) -> tuple[Path, Path]:
    """Return (base_dir, controlnet_dir) under `storage_root`, building them first if missing.

    Safe to call from several processes at once (e.g. every rank of a distributed job): builds
    are serialised by a lock file where the file system supports it, and a model is only ever
    installed by renaming a complete folder into place.
    """
    root = Path(storage_root)
    base_dir, cn_dir = tiny_folders(root)
    if is_complete(base_dir, "base") and is_complete(cn_dir, "controlnet"):
        return base_dir, cn_dir
    try:
        _build_and_install(root, base_dir, cn_dir)
    except OSError as exc:
        raise ForgeError(f"cannot build the embedded tiny model here ({exc})", path=root,
                         fix="make the storage root writable, or point `storage.root` (or "
                             "LORAFORGE_STORAGE_ROOT) at a writable folder") from exc
    return base_dir, cn_dir


def _build_and_install(root: Path, base_dir: Path, cn_dir: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with build_lock(root) as locked:
        if is_complete(base_dir, "base") and is_complete(cn_dir, "controlnet"):
            return  # another process built them while we waited
        _remove_partials(root, stale_only=not locked)
        base_tmp = _make_partial(root, BASE_NAME)
        cn_tmp = _make_partial(root, CONTROLNET_NAME)
        try:
            build_tiny_models(base_tmp, cn_tmp)
            for tmp, dest, component in ((cn_tmp, cn_dir, "controlnet"),
                                         (base_tmp, base_dir, "base")):
                if not is_complete(dest, component):
                    folders.install(tmp, dest,
                                    keep_if=lambda d, c=component: is_complete(d, c))
        finally:
            for tmp in (base_tmp, cn_tmp):
                shutil.rmtree(tmp, ignore_errors=True)


def build_tiny_models(base_dir: Path, controlnet_dir: Path) -> None:
    """Build and save the tiny pipeline into `base_dir` and its ControlNet into `controlnet_dir`.

    Both folders must exist and be empty. Each ends with its marker file and manifest.json.
    """
    import torch

    with quiet_loading():  # importing diffusers' pipelines makes transformers talk
        from diffusers import (
            AutoencoderKL,
            PNDMScheduler,
            StableDiffusionPipeline,
            UNet2DConditionModel,
        )
        from transformers import CLIPTextModel

    from loraforge.models.manifest import describe_files, write_manifest
    from loraforge.models.tokenizer import new_clip_tokenizer, write_vocab_files

    with seeded(SEED + 1):
        unet = UNet2DConditionModel.from_config(tiny_config("unet"))
    with seeded(SEED + 2):
        vae = AutoencoderKL.from_config(tiny_config("vae"))
    with seeded(SEED + 3):
        text_encoder = CLIPTextModel(clip_text_config(tiny_config("text_encoder")))
    scheduler = PNDMScheduler.from_config(sd15_config("scheduler"))
    with seeded(SEED + 4):
        controlnet = make_controlnet(unet)

    for model in (unet, vae, text_encoder, controlnet):
        model.eval()
        if any(p.dtype != torch.float32 for p in model.parameters()):
            raise RuntimeError(f"{type(model).__name__} was not built in float32")

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=new_clip_tokenizer(), unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    with quiet_loading():
        pipe.save_pretrained(base_dir, safe_serialization=True)
        controlnet.save_pretrained(controlnet_dir, safe_serialization=True)
    write_vocab_files(base_dir / "tokenizer")
    for folder, component in ((base_dir, "base"), (controlnet_dir, "controlnet")):
        strip_volatile(folder)
        (folder / folders.MARKER).write_text(json.dumps(marker(component), indent=2) + "\n",
                                     encoding="utf-8")
        write_manifest(folder, {"kind": component, "files": describe_files(folder),
                                "source": {"type": "embedded", "recipe": recipe_hash()}})
        fix_modes(folder)


def make_controlnet(unet: UNet2DConditionModel) -> ControlNetModel:
    """A ControlNet from the tiny U-Net whose zero convolutions are small random values instead.

    A freshly made ControlNet ignores its conditioning image (its output convolutions are zero);
    a trained one does not, so the tiny one must not either, or pose handling could not be tested.
    """
    import torch
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=CONTROLNET_COND_CHANNELS)
    with torch.no_grad():
        # The conditioning encoder: an init that carries a pose map through its 8 SiLU
        # convolutions (the default one shrinks it ~1000x) to about the scale of conv_in's output.
        embedding = controlnet.controlnet_cond_embedding
        for conv in [embedding.conv_in, *embedding.blocks]:
            _normal_conv(conv, CONTROLNET_COND_GAIN / math.sqrt(conv.weight[0].numel()), bias=0.0)
        conv_out = embedding.conv_out
        _normal_conv(conv_out, 1.0 / math.sqrt(conv_out.weight[0].numel()), bias=0.0)
        # The "zero convolutions" that feed the U-Net: small, not zero.
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            _normal_conv(conv, CONTROLNET_ZERO_CONV_STD, bias=CONTROLNET_ZERO_CONV_STD / 10)
    return controlnet


def _normal_conv(conv: torch.nn.Conv2d, std: float, bias: float) -> None:
    """Weights drawn from N(0, std²); biases from N(0, bias²) (zero when `bias` is 0)."""
    conv.weight.normal_(0.0, std)
    if conv.bias is not None:
        if bias:
            conv.bias.normal_(0.0, bias)
        else:
            conv.bias.zero_()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG for one component and restore the caller's RNG state afterwards."""
    import torch

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def strip_volatile(folder: Path) -> None:
    """Drop the `_name_or_path` keys that would record the temporary folder in saved configs."""
    for config in folder.rglob("*.json"):
        data = json.loads(config.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "_name_or_path" in data:
            del data["_name_or_path"]
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def fix_modes(folder: Path) -> None:
    """Group-readable files and folders (safetensors writes 0600, mkdtemp makes 0700)."""
    os.chmod(folder, DIR_MODE)
    for path in folder.rglob("*"):
        os.chmod(path, DIR_MODE if path.is_dir() else FILE_MODE)


def _make_partial(root: Path, name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=PARTIAL_SUFFIX, dir=root))


def build_lock(root: Path) -> contextlib.AbstractContextManager[bool]:
    """Hold an exclusive lock on `<root>/.tiny-models.lock`; yield whether it could be taken."""
    return held_lock(root / LOCK_NAME)


def _remove_partials(root: Path, stale_only: bool) -> None:
    """Delete temporary folders left by killed builds (only old ones when builds may overlap)."""
    now = time.time()
    for name in (BASE_NAME, CONTROLNET_NAME):
        leftovers = [*root.glob(f".{name}.*{PARTIAL_SUFFIX}"), *root.glob(f".{name}.*{OLD_SUFFIX}")]
        for path in leftovers:
            with contextlib.suppress(OSError):
                if not stale_only or now - path.stat().st_mtime > STALE_PARTIAL_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)


__all__ = ["clip_text_config", "ensure_tiny_models", "sd15_config", "sd15_config_dir",
           "tiny_config"]
