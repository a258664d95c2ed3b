"""Generation time: a posed image with ControlNet through `loraforge generate`'s pipeline against
diffusers' stock StableDiffusionControlNetPipeline with default settings."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: SD 1.5 at 512x512 (stack.md): U-Net forward 0.803 TFLOP, ControlNet 0.283, VAE decode 2.51.
UNET, CONTROLNET, DECODE = 0.803, 0.283, 2.51


@dataclass
class GenerateResult:
    name: str
    width: int
    height: int
    steps: int
    seconds_per_image: float
    warmup_s: float

    def tflops(self) -> float:
        area = self.width * self.height / 512**2
        per_image = (self.steps * 2 * (UNET + CONTROLNET) + DECODE) * area  # CFG doubles
        return per_image / self.seconds_per_image


def _pose(width: int, height: int):
    from loraforge.generate.poses import draw_pose, random_pose

    return draw_pose(random_pose(2, width, height, 0))


def random_loras(base: Path, folder: Path, count: int) -> list[Path]:
    """`count` kohya-format LoRA files for `base` (dim 16, U-Net and text encoder) with random
    up weights: stand-ins for trained character LoRAs, which cost the same to apply."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from loraforge.train import export, network

    paths = []
    for index in range(count):
        models = {"unet": UNet2DConditionModel.from_pretrained(base, subfolder="unet"),
                  "text_encoder": CLIPTextModel.from_pretrained(base, subfolder="text_encoder")}
        torch.manual_seed(index)
        targets = network.unet_targets(models["unet"], 16, 8)
        network.inject(models["unet"], targets)
        text = network.text_targets(models["text_encoder"], 16, 8)
        network.inject(models["text_encoder"], text)
        with torch.no_grad():
            for target in targets + text:
                network.lora_pair(models[target.component], target)[1].normal_(0, 0.01)
        paths.append(folder / f"character{index}.safetensors")
        export.save_lora(paths[-1], export.kohya_state_dict(models, targets + text, "fp16"),
                         {"ss_network_module": "networks.lora"}, 0o644)
    return paths


def _time(run: Callable[[], object], batch: int, device: str,
          repeats: int = 3) -> tuple[float, float]:
    """(seconds per image, first call's seconds) of `run`, which makes `batch` images."""
    import torch

    def once() -> float:
        started = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    warmup = once()
    best = min(once() for _ in range(repeats))
    return best / batch, warmup


def _with_loras(name: str, loras: list[Path]) -> str:
    return f"{name}, {len(loras)} LoRAs" if loras else name


#: What `--variant` names for generation, each measured in its own pipeline against the plain
#: one: `loraforge generate` options, and candidates not (yet) in it.
VARIANTS = {
    "compile": "generate.compile=true",
    "compile=blocks": "generate.compile=blocks",
    "fuse_qkv": "fused QKV, not an option",
    "channels_last": "channels-last, not an option",
}


def _apply(pipe, variant: str) -> None:
    import torch

    from loraforge.generate.pipeline import compile_denoisers

    if variant.startswith("compile"):
        compile_denoisers(pipe, variant.partition("=")[2] or True)
    elif variant == "fuse_qkv":
        pipe.unet.fuse_qkv_projections()
        pipe.controlnet.fuse_qkv_projections()
    else:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.controlnet.to(memory_format=torch.channels_last)


def ours(base: Path, controlnet: Path, width: int, height: int, batch: int, steps: int,
         variant: str | None, loras: list[Path]) -> GenerateResult:
    """`loraforge generate`'s path: its pipeline, the LoRAs merged, `batch` seeds denoised
    together (generate.batch_size), with `variant` applied (its warm-up includes compiling)."""
    import torch

    from loraforge.generate.loras import BaseWidths, LoraStack, LoraUse, inspect_lora
    from loraforge.generate.pipeline import load_pipeline, pick_dtype, render_batch
    from loraforge.generate.prompts import encode_prompt_pair

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(base, controlnet, device, pick_dtype("auto", device).dtype)
    widths = BaseWidths.of(base)
    LoraStack(pipe).activate([LoraUse(inspect_lora(path, widths), 0.8) for path in loras])
    if variant:
        _apply(pipe, variant)
    embeds, negative = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder,
                                          "2girls, standing, best quality", "lowres", 2)
    seeds = list(range(batch))
    poses = [_pose(width, height)] * batch

    def run() -> object:
        return render_batch(pipe, embeds, negative, width, height, steps, 7.0, seeds, poses)

    per_image, warmup = _time(run, batch, device.type)
    name = "loraforge" + (f" ({VARIANTS[variant]})" if variant else "")
    return GenerateResult(_with_loras(name, loras), width, height, steps, per_image, warmup)


def stock(base: Path, controlnet: Path, width: int, height: int, batch: int, steps: int,
          loras: list[Path]) -> GenerateResult:
    """diffusers' pipeline as its documentation shows it; LoRAs as adapters (set_adapters)."""
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from loraforge.runtime import quiet_loading

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        base, controlnet=ControlNetModel.from_pretrained(controlnet, torch_dtype=torch.float32),
        safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    with quiet_loading():  # transformers' "MISSING keys" table of an intermediate step
        for index, path in enumerate(loras):
            pipe.load_lora_weights(str(path), adapter_name=f"character{index}")
    if loras:
        pipe.set_adapters([f"character{i}" for i in range(len(loras))], [0.8] * len(loras))
    kwargs = {"prompt": "2girls, standing, best quality", "negative_prompt": "lowres",
              "image": _pose(width, height), "width": width, "height": height,
              "num_inference_steps": steps, "output_type": "pil"}
    per_image, warmup = _time(lambda: pipe(**kwargs, num_images_per_prompt=batch), batch,
                              device)
    return GenerateResult(_with_loras("diffusers stock (fp32 defaults)", loras), width, height,
                          steps, per_image, warmup)
