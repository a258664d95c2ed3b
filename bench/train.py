"""Training throughput: `loraforge train` (the real trainer, in-process) against a plain reference
loop written the way diffusers' example scripts do it (VAE and text encoder every step, LoRA on
the attention projections only, no caching), on the same data, in the same process."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

#: FLOPs of one training image (cached latents, batch 1, 512 px) on SD 1.5: see stack.md.
TRAIN_TFLOP_PER_IMAGE_512 = 1.725


@dataclass
class TrainResult:
    name: str
    batch: int
    resolution: int
    images_per_s: float
    first_step_s: float
    peak_memory_gb: float

    def tflops(self) -> float:
        return TRAIN_TFLOP_PER_IMAGE_512 * (self.resolution / 512) ** 2 * self.images_per_s


def write_dataset(folder: Path, images: int, resolution: int, distinct: bool = False) -> None:
    """`images` distinct pictures in one concept folder, each captioned with the same tags (a
    trigger and class tags, as many character datasets are), or with `distinct` a tag of its
    own too (as a tagger's captions are): no two captions of a batch alike."""
    import numpy as np
    from PIL import Image

    concept = folder / "1_bench_character"
    concept.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        pixels = rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(concept / f"{i:03d}.png")
        own = f", pose_{i}" if distinct else ""
        (concept / f"{i:03d}.txt").write_text(f"bench_character, 1girl, solo, standing{own}")


def peak_memory_gb(device: str) -> float:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _project(project: Path, base: Path, batch: int, resolution: int, steps: int,
             global_batch: int, distinct: bool = False) -> tuple[Path, list[str]]:
    """A benchmark project (dataset and empty forge.toml) and the `--set` values it trains
    with: `batch` images per process, `steps` steps, caches in memory, no saving on the way."""
    write_dataset(project / "master_dataset", max(global_batch * 2, 8), resolution, distinct)
    config = project / "forge.toml"
    config.write_text("")
    return config, [f"storage.root={json.dumps(str(project / 'store'))}",
                    f"models.base={json.dumps(str(base))}", f"dataset.resolution={resolution}",
                    f"train.batch_size={batch}", f"train.max_steps={steps}",
                    'train.optimizer="AdamW"', 'train.mixed_precision="bf16"',
                    "train.log_every_seconds=1000", "train.save_every_n_epochs=1000",
                    "train.cache_latents_to_disk=false"]


def ours(work: Path, base: Path, batch: int, resolution: int, steps: int, device: str,
         extra: list[str], distinct: bool = False) -> TrainResult:
    """`loraforge train` in this process; `distinct`: no two captions alike (see
    write_dataset)."""
    from loraforge.config import load_settings
    from loraforge.runtime import go_offline
    from loraforge.train.run import train

    project = work / f"ours-b{batch}-{len(list(work.glob(f'ours-b{batch}-*')))}"
    config, overrides = _project(project, base, batch, resolution, steps, batch, distinct)
    settings = load_settings(config, [*overrides, *extra])
    go_offline(settings)
    reset_peak(device)
    started = time.perf_counter()
    result = train(settings, "bench", restart=True)
    total = time.perf_counter() - started
    rate, first = _rates(result.final.parent, batch, total)
    name = "loraforge" + (f" ({' '.join(extra)})" if extra else "") + (
        ", every caption different" if distinct else "")
    return TrainResult(name, batch, resolution, rate, first, peak_memory_gb(device))


def _rates(run_dir: Path, batch: int, total: float) -> tuple[float, float]:
    """Images/s after the first quarter of the steps, and the time before the first step.
    On a GPU the trainer reads losses in groups of steps, and a step's `seconds` is when its
    group was read (the GPU had finished it): the rate is measured between such moments."""
    seconds = [json.loads(line)["seconds"] for line in
               (run_dir / "history.jsonl").read_text().splitlines()]
    read = [i for i in range(len(seconds))  # the last step of each group
            if i == len(seconds) - 1 or seconds[i] != seconds[i + 1]]
    start = next(i for i in read if i >= max(1, len(seconds) // 4) - 1)
    if start == read[-1]:
        raise SystemExit(f"too few steps ({len(seconds)}) to measure a rate after warming up")
    return (read[-1] - start) * batch / (seconds[read[-1]] - seconds[start]), \
        total - seconds[-1] + seconds[0]


def ours_processes(work: Path, base: Path, batch: int, resolution: int, steps: int,
                   processes: int) -> TrainResult:
    """`loraforge train` with `train.gpus = processes`, the global batch `batch` split over
    them, run as a user runs it (the command starts the processes). Peak memory is not
    measured across processes (0)."""
    import subprocess
    import sys

    if batch % processes:
        raise SystemExit(f"batch {batch} does not split over {processes} processes")
    project = work / f"processes-{processes}"
    config, sets = _project(project, base, batch // processes, resolution, steps, batch)
    sets.append(f"train.gpus={processes}")
    command = [sys.executable, "-m", "loraforge", "train", "--config", str(config), "--run",
               "bench", *(word for value in sets for word in ("--set", value))]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    total = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"training with {processes} processes failed:\n{done.stderr[-3000:]}")
    rate, first = _rates(project / "store" / "Multi_Concept_Output" / "bench", batch, total)
    return TrainResult(f"loraforge, {processes} processes x batch {batch // processes}", batch,
                       resolution, rate, first, 0.0)


#: The U-Net layers the diffusers example adapts, and kohya's set (every Linear and 1x1 conv of
#: each transformer block), which ours trains so that its files are kohya's.
ATTENTION = ("to_k", "to_q", "to_v", "to_out.0")
KOHYA_UNET = (*ATTENTION, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
#: The text encoder's layers kohya adapts (and ours, by default): attention and MLP.
KOHYA_TEXT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def reference(base: Path, batch: int, resolution: int, steps: int, device: str,
              cached: bool = False, modules: tuple[str, ...] = ATTENTION,
              train_text: bool = False) -> TrainResult:
    """The diffusers-example loop: encode images and captions every step. `cached`: both
    encoded once before the loop, which leaves only the U-Net's forward and backward and the
    optimizer, the work every trainer of this LoRA must do: the most caching can gain.
    `modules`: the U-Net layers it adapts (KOHYA_UNET: the same as ours). `train_text`: a LoRA
    on the text encoder's KOHYA_TEXT layers too, trained (as diffusers' DreamBooth LoRA script
    does with --train_text_encoder): what ours does with its defaults."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    reset_peak(device)
    started = time.perf_counter()
    weight_dtype = torch.float16 if device == "cuda" else torch.float32
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder").to(
        device, weight_dtype)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae").to(device, weight_dtype)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet").to(device, weight_dtype)
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=16, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=list(modules)))
    if train_text:
        text_encoder.add_adapter(LoraConfig(r=16, lora_alpha=8, init_lora_weights="gaussian",
                                            target_modules=list(KOHYA_TEXT)))
    params = [p for model in (unet, text_encoder) for p in model.parameters()
              if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand((batch, 3, resolution, resolution), generator=generator) * 2 - 1
    ids = tokenizer(["bench_character, 1girl, solo, standing"] * batch, padding="max_length",
                    max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    autocast = torch.autocast(device, dtype=torch.float16, enabled=device == "cuda")

    def encode() -> tuple[torch.Tensor, torch.Tensor]:
        latents = vae.encode(pixels.to(device, weight_dtype)).latent_dist.sample()
        return latents * vae.config.scaling_factor, text_encoder(ids)[0]

    if cached:
        assert not train_text, "a trained text encoder cannot be cached"
        with autocast, torch.no_grad():
            encoded = encode()
    times = []
    for _ in range(steps):
        with autocast:
            latents, hidden = encoded if cached else encode()
            noise = torch.randn_like(latents)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,),
                              device=device)
            noisy = noise_scheduler.add_noise(latents, noise, t)
            prediction = unet(noisy, t, hidden).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    warm = max(1, steps // 4)
    rate = (steps - warm) * batch / (times[-1] - times[warm - 1])
    name = "reference loop" + (", kohya's U-Net modules" if modules == KOHYA_UNET else "") + (
        " and text encoder LoRA" if train_text else "") + (
        ", VAE and text encoder cached" if cached else "")
    return TrainResult(name, batch, resolution, rate, times[0] - started,
                       peak_memory_gb(device))
