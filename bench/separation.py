"""Concept separation on the tiny model: our trainer against an independent oracle.

`python -m bench.separation [--taught] [--steps N] [--scaling-factor F] [--embedding-std S]
[--pretrain N] [--solid] [--work DIR]`

The data is issue #21's: `4_blake/` (red discs) and `4_mira/` (blue squares), 64 px, captions
"blake, disc, solo" / "mira, square, solo" (`--solid`: each image one flat red or blue). The
triggers are words the taught base never saw (issue #21 had `zqred`, which the tokenizer splits
into `z q red`: a base that knows "red" would call up red for it before any LoRA).
Two LoRAs are trained on it for the same number of steps and measured with `loraforge eval`'s
measure (same images, noise, timesteps):

- ours: `loraforge train` in-process with the tiny model's quick settings (`init --tiny`);
- the oracle: a plain loop written here with diffusers and peft only (LoRA on the U-Net's
  attention, projection and feed-forward layers and on the text encoder's attention and MLP,
  AdamW, uniform timesteps, plain MSE, the text encoder's last layer).

The base model is the embedded tiny one, or with `--taught` the taught tiny one
(`loraforge.models.taught`: it denoises flat colours and paints the colour its prompt names),
optionally changed first (a copy; the tiny model itself is
untouched): `--scaling-factor` sets the VAE's latent scale (the tiny VAE's latents have std
~0.25, so ~4 gives unit variance, like SD's 0.18215 does for SD's VAE), `--embedding-std` redraws
the text encoder's token embeddings with that std (the tiny one's are 0.02: every prompt's hidden
states end up nearly alike), `--pretrain N` fully fine-tunes the U-Net for N steps on the same
images with the empty prompt (a base that already denoises such images, as SD's does, and knows no
trigger).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.train import KOHYA_TEXT, KOHYA_UNET

CONCEPTS = (("4_blake", "blake", "disc", (220, 30, 30)),
            ("4_mira", "mira", "square", (30, 40, 220)))
BATCH = 4


TRAINING = range(0, 8, 2)
HELD_OUT = (1, 5)  # between the training images, in place and shade


def write_dataset(folder: Path, solid: bool, numbers: Sequence[int] = TRAINING) -> None:
    """The issue's discs and squares, image `i` for each i in `numbers` (their places and shades
    follow i); `solid`: each image one flat colour (the most a trigger can tell apart)."""
    from PIL import Image, ImageDraw

    for name, trigger, shape, colour in CONCEPTS:
        concept = folder / name
        concept.mkdir(parents=True, exist_ok=True)
        for i in numbers:
            image = Image.new("RGB", (64, 64), (235, 235, 225))
            draw = ImageDraw.Draw(image)
            x, y, size = 8 + 3 * i, 10 + 2 * (i % 4), 28 + i
            box = (0, 0, 64, 64) if solid else (x, y, x + size, y + size)
            shade = tuple(max(0, c - 5 * i) for c in colour) if solid else colour
            (draw.ellipse if shape == "disc" and not solid else draw.rectangle)(box, fill=shade)
            image.save(concept / f"{i}.png")
            (concept / f"{i}.txt").write_text(f"{trigger}, {shape}, solo")


def variant_base(tiny: Path, dest: Path, args: argparse.Namespace, dataset: Path) -> Path:
    """A copy of the tiny base with the changes asked for (the tiny base itself when none)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if not (args.scaling_factor or args.embedding_std or args.pretrain):
        return tiny
    shutil.copytree(tiny, dest)
    if args.scaling_factor:
        config = dest / "vae" / "config.json"
        values = json.loads(config.read_text())
        values["scaling_factor"] = args.scaling_factor
        config.write_text(json.dumps(values, indent=2))
    if args.embedding_std:
        text_encoder = CLIPTextModel.from_pretrained(dest, subfolder="text_encoder")
        generator = torch.Generator().manual_seed(0)
        weight = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight.copy_(torch.randn(weight.shape, generator=generator) * args.embedding_std)
        text_encoder.save_pretrained(dest / "text_encoder")
    if args.pretrain:
        vae = AutoencoderKL.from_pretrained(dest, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(dest, subfolder="unet")
        tokenizer = CLIPTokenizer.from_pretrained(dest, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(dest, subfolder="text_encoder")
        alphas = DDPMScheduler.from_pretrained(dest, subfolder="scheduler").alphas_cumprod
        latents = encode_images(vae, sorted(dataset.rglob("*.png")))
        ids = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            empty = text_encoder(ids).last_hidden_state
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(1)
        for _ in range(args.pretrain):
            rows = torch.randint(0, latents.shape[0], (BATCH,), generator=generator)
            loss = step_loss(unet, latents[rows], empty.expand(BATCH, -1, -1), alphas, generator)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        unet.save_pretrained(dest / "unet")
        print(f"pretrained the U-Net for {args.pretrain} steps: last loss {loss.item():.4f}")
    return dest


def encode_images(vae: Any, paths: list[Path]) -> Any:
    import numpy as np
    import torch
    from PIL import Image

    pixels = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB"),
                                                   dtype=np.float32) / 127.5 - 1
                                        for p in paths])).permute(0, 3, 1, 2)
    with torch.no_grad():
        return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor


def step_loss(unet: Any, latents: Any, hidden: Any, alphas: Any, generator: Any) -> Any:
    import torch

    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, len(alphas), (latents.shape[0],), generator=generator)
    alpha_bar = alphas[timesteps].view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    prediction = unet(noisy, timesteps, encoder_hidden_states=hidden).sample
    return torch.nn.functional.mse_loss(prediction, noise)


def ours(work: Path, base: Path, steps: int, overrides: list[str],
         held_out: Path | None = None) -> Any:
    """`loraforge train` with the `init --tiny` settings and `overrides` (`KEY=VALUE` of
    `[train]`, VALUE in TOML), then `loraforge eval`'s measure."""
    from loraforge.config import load_settings
    from loraforge.project import TINY_VALUES, toml_value
    from loraforge.train.run import train
    from loraforge.train.separation import measure

    values = {**TINY_VALUES["train"], "max_steps": steps, "log_every_seconds": 30}
    lines = ["[storage]", 'root = "store"', "[models]", f'base = "{base}"',
             f'controlnet = "{base.parent / "tiny-controlnet"}"', "[dataset]",
             "resolution = 64", "[train]", *(f"{k} = {toml_value(v)}" for k, v in values.items()
                                              if not any(o.startswith(f"{k}=") for o in overrides)),
             *(o.replace("=", " = ", 1) for o in overrides)]
    (work / "forge.toml").write_text("\n".join(lines) + "\n")
    settings = load_settings(work / "forge.toml")
    started = time.monotonic()
    train(settings, "ours", restart=True)
    print(f"ours: {steps} steps in {time.monotonic() - started:.0f} s")
    return measure(settings, settings.runs_dir / "ours", held_out)


def oracle(work: Path, base: Path, steps: int, held_out: Path | None = None) -> Any:
    """The plain diffusers + peft loop, measured on the same samples as ours."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    from loraforge.config import DatasetConfig
    from loraforge.dataset.scan import scan_dataset
    from loraforge.train.separation import concept_samples, separation_table, trigger_losses

    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    alphas = DDPMScheduler.from_pretrained(base, subfolder="scheduler").alphas_cumprod
    paths = sorted((work / "master_dataset").rglob("*.png"))
    latents = encode_images(vae, paths)
    captions = [p.with_suffix(".txt").read_text() for p in paths]
    torch.manual_seed(0)
    for model, modules in ((unet, KOHYA_UNET), (text_encoder, KOHYA_TEXT)):
        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=16, lora_alpha=8, init_lora_weights="gaussian",
                                     target_modules=list(modules)))
    optimizer = torch.optim.AdamW([
        {"params": [p for p in unet.parameters() if p.requires_grad], "lr": 1e-3},
        {"params": [p for p in text_encoder.parameters() if p.requires_grad], "lr": 5e-4}])

    def encode(prompts: list[str]) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
        return text_encoder(ids).last_hidden_state

    generator = torch.Generator().manual_seed(1)
    started = time.monotonic()
    for _ in range(steps):
        rows = torch.randperm(len(paths), generator=generator)[:BATCH]
        hidden = encode([captions[i] for i in rows])
        loss = step_loss(unet, latents[rows], hidden, alphas, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"oracle: {steps} steps in {time.monotonic() - started:.0f} s")

    def encode_one(prompt: str) -> torch.Tensor:
        with torch.no_grad():
            return encode([prompt])

    dataset = scan_dataset(work / "master_dataset", ".txt")
    held = scan_dataset(held_out, ".txt") if held_out else None
    samples = concept_samples(vae, alphas, dataset, DatasetConfig(resolution=64), held,
                              torch.device("cpu"))
    triggers = [s.trigger for s in samples]
    with_lora = trigger_losses(unet, encode_one, samples, triggers)
    for model in (unet, text_encoder):
        model.disable_adapters()
    without = trigger_losses(unet, encode_one, samples, triggers)
    return separation_table("oracle", "diffusers + peft loop", samples, with_lora, without)


def main() -> None:
    import torch
    from rich.console import Console

    from loraforge.models.taught import ensure_taught_model
    from loraforge.models.tiny import ensure_tiny_models
    from loraforge.runtime import quiet_loading
    from loraforge.train.separation import print_table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--taught", action="store_true", help="the taught tiny base")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a [train] setting for ours, e.g. text_encoder_lr=1e-4")
    parser.add_argument("--scaling-factor", type=float, default=None)
    parser.add_argument("--embedding-std", type=float, default=None)
    parser.add_argument("--pretrain", type=int, default=0)
    parser.add_argument("--solid", action="store_true", help="flat-colour images")
    parser.add_argument("--held-out", action="store_true",
                        help="measure on two more images per concept, not trained on")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-separation-"))
    write_dataset(work / "master_dataset", args.solid)
    held_out = work / "held_out" if args.held_out else None
    if held_out:
        write_dataset(held_out, args.solid, HELD_OUT)
    tiny = (ensure_taught_model if args.taught else ensure_tiny_models)(work / "tiny")[0]
    with quiet_loading():
        base = variant_base(tiny, work / "tiny" / "variant", args, work / "master_dataset")
        results = [ours(work, base, args.steps, args.set, held_out),
                   oracle(work, base, args.steps, held_out)]
    console = Console(width=120)
    for result in results:
        print_table(result, console)
    for result in results:
        margins = ", ".join(f"{c.name} {c.margin:+.3%}" for c in result.concepts)
        console.print(f"{result.run}: margins {margins}")


if __name__ == "__main__":
    main()
