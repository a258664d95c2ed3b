"""The taught tiny model: the embedded tiny base after a short lesson, so it denoises and obeys.

The embedded tiny model's U-Net has random weights: it is no denoiser, so a LoRA trained on it
spends itself on generic denoising, and no LoRA, ours or a plain diffusers one, learns two
concepts apart on it (issue #21). Real bases already denoise and already draw what a prompt names;
a LoRA only has to bind a new trigger to a look. The taught base gives the tiny model that much,
in about a minute on a CPU, from the tiny base and a fixed seed:

- its text encoder's token embeddings are redrawn with unit spread (the tiny one's 0.02 leaves
  every prompt's hidden states nearly alike) and stay frozen;
- its VAE's `scaling_factor` gives latents of unit spread, as SD's 0.18215 does for SD's VAE
  (the tiny VAE's latents under 0.18215 spread 0.05, so noise hides every picture);
- its U-Net is trained whole for LESSON steps on 64 px flat-colour pictures captioned with their
  colour's name ("red", "blue", ... and one in ten uncaptioned), reading the text encoder's
  penultimate layer (`train.clip_skip`'s default, as anime bases do): it learns to denoise and to
  paint the colour its prompt names. It has never seen a trigger word.

A LoRA on it learns in a few hundred steps that `blake` is red and `mira` is blue, and
`loraforge eval` shows that (tests/test_separation.py). It lives in `<root>/tiny-taught/` with
the tiny ControlNet beside it; `models.base = "tiny-taught"` selects it. Building is atomic and
serialised like the tiny model's; the weights are the same on every build on one machine (CPU
arithmetic may differ in the last bits between processors).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from loraforge.models import folders, tiny

TAUGHT_NAME = "tiny-taught"
TAUGHT_VERSION = 1
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 180, 40),
    "yellow": (235, 220, 40), "purple": (140, 40, 170), "orange": (240, 140, 20),
    "black": (20, 20, 20), "white": (245, 245, 245), "pink": (240, 130, 190),
    "brown": (120, 70, 30), "grey": (128, 128, 128), "cyan": (40, 210, 220),
}
LESSON: dict[str, Any] = {
    "steps": 600, "batch": 16, "lr": 1e-3, "pictures": 384, "shade": 24, "uncaptioned": 0.1,
    "embedding_std": 1.0, "clip_skip": 2, "seed": tiny.SEED + 10,
}


def marker() -> dict[str, Any]:
    """The marker of a finished taught base: a tiny model (`store.is_tiny`) with its lesson."""
    colours = {name: list(rgb) for name, rgb in COLOURS.items()}  # as JSON reads them back
    return {**tiny.marker("base"), "taught": {"version": TAUGHT_VERSION, "lesson": LESSON,
                                              "colours": colours}}


def is_complete(folder: Path) -> bool:
    return folder.is_dir() and folders.read_marker(folder) == marker()


def ensure_taught_model(storage_root: Path) -> tuple[Path, Path]:
    """(base_dir, controlnet_dir) of the taught tiny base and the tiny ControlNet under
    `storage_root`, building them first where missing."""
    root = Path(storage_root)
    tiny_base, controlnet = tiny.ensure_tiny_models(root)
    dest = root / TAUGHT_NAME
    if is_complete(dest):
        return dest, controlnet

    def build(folder: Path) -> None:
        shutil.copytree(tiny_base, folder, dirs_exist_ok=True)
        teach(folder)

    with tiny.build_lock(root) as locked:
        if not is_complete(dest):  # another process may have built it while we waited
            folders.remove_leftovers(root, TAUGHT_NAME,
                                     0.0 if locked else tiny.STALE_PARTIAL_SECONDS)
            folders.build_model(root, TAUGHT_NAME, build, is_complete, "the taught tiny model")
    return dest, controlnet


def pictures(count: int, seed: int) -> tuple[list[Any], list[str]]:
    """`count` flat-colour 64 px pictures (each colour's shade varied by up to LESSON["shade"])
    and their captions: the colour's name, or "" for about one in ten."""
    import random

    from PIL import Image

    rng = random.Random(seed)
    names = sorted(COLOURS)
    images, captions = [], []
    for _ in range(count):
        name = rng.choice(names)
        shade = tuple(min(255, max(0, c + rng.randint(-LESSON["shade"], LESSON["shade"])))
                      for c in COLOURS[name])
        images.append(Image.new("RGB", (64, 64), shade))
        captions.append("" if rng.random() < LESSON["uncaptioned"] else name)
    return images, captions


def teach(folder: Path) -> None:
    """Turn the copy of the tiny base in `folder` into the taught base (see the module doc)."""
    import numpy as np
    import torch

    from loraforge.models.manifest import describe_files, write_manifest
    from loraforge.runtime import quiet_loading
    from loraforge.text import chunk_token_ids, encode_token_ids

    with quiet_loading():
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    alphas = DDPMScheduler.from_pretrained(folder, subfolder="scheduler").alphas_cumprod
    generator = torch.Generator().manual_seed(LESSON["seed"])
    embeddings = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        embeddings.copy_(torch.randn(embeddings.shape, generator=generator)
                         * LESSON["embedding_std"])
    images, captions = pictures(LESSON["pictures"], LESSON["seed"])
    pixels = torch.from_numpy(np.stack([np.asarray(image, dtype=np.float32) / 127.5 - 1
                                        for image in images])).permute(0, 3, 1, 2)
    with torch.no_grad():
        raw = vae.encode(pixels).latent_dist.mean
        scaling = float(f"{1.0 / raw.std().item():.4g}")
        latents = raw * scaling
        names = sorted(set(captions))
        encoded = encode_token_ids(text_encoder, chunk_token_ids(tokenizer, names, 1),
                                   LESSON["clip_skip"])
        hidden = dict(zip(names, encoded, strict=True))
    states = torch.stack([hidden[caption] for caption in captions])
    with tiny.seeded(LESSON["seed"]):
        _lesson(unet, latents, states, alphas, generator)
    with quiet_loading():
        unet.save_pretrained(folder / "unet", safe_serialization=True)
        text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    config_file = folder / "vae" / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["scaling_factor"] = scaling
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                           encoding="utf-8")
    tiny.strip_volatile(folder)
    (folder / folders.MARKER).write_text(json.dumps(marker(), indent=2) + "\n", encoding="utf-8")
    write_manifest(folder, {"kind": "base", "files": describe_files(folder),
                            "source": {"type": "embedded", "recipe": tiny.recipe_hash(),
                                       "taught": TAUGHT_VERSION}})
    tiny.fix_modes(folder)


def _lesson(unet: Any, latents: Any, states: Any, alphas: Any, generator: Any) -> None:
    """Train the whole U-Net to predict the noise (plain MSE, uniform timesteps, AdamW)."""
    import torch

    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LESSON["lr"])
    batch = LESSON["batch"]
    for _ in range(LESSON["steps"]):
        rows = torch.randint(0, latents.shape[0], (batch,), generator=generator)
        noise = torch.randn((batch, *latents.shape[1:]), generator=generator)
        timesteps = torch.randint(0, len(alphas), (batch,), generator=generator)
        alpha_bar = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * latents[rows] + (1 - alpha_bar).sqrt() * noise
        prediction = unet(noisy, timesteps, encoder_hidden_states=states[rows]).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    unet.eval()
