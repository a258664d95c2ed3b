"""Generation time: a posed image with ControlNet through `loraforge generate`'s pipeline against
diffusers' stock StableDiffusionControlNetPipeline with default settings."""

from __future__ import annotations

import time
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


def _time(pipe, kwargs: dict, batch: int, device: str, repeats: int = 3) -> tuple[float, float]:
    """(seconds per image, first call's seconds)."""
    import torch

    def once() -> float:
        started = time.perf_counter()
        pipe(**kwargs, num_images_per_prompt=batch, output_type="pil")
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    warmup = once()
    best = min(once() for _ in range(repeats))
    return best / batch, warmup


def ours(base: Path, controlnet: Path, width: int, height: int, batch: int, steps: int,
         variants: list[str]) -> list[GenerateResult]:
    import torch

    from loraforge.generate.pipeline import load_pipeline, pick_dtype
    from loraforge.generate.prompts import encode_prompt_pair

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(base, controlnet, device, pick_dtype("auto", device).dtype)
    embeds, negative = encode_prompt_pair(pipe.tokenizer, pipe.text_encoder,
                                          "2girls, standing, best quality", "lowres", 2)
    kwargs = {"prompt_embeds": embeds, "negative_prompt_embeds": negative,
              "image": _pose(width, height), "width": width, "height": height,
              "num_inference_steps": steps, "guidance_scale": 7.0}
    per_image, warmup = _time(pipe, kwargs, batch, device.type)
    results = [GenerateResult("loraforge", width, height, steps, per_image, warmup)]
    if "compile" in variants and device.type == "cuda":
        pipe.unet = torch.compile(pipe.unet)
        pipe.controlnet = torch.compile(pipe.controlnet)
        per_image, warmup = _time(pipe, kwargs, batch, device.type)
        results.append(GenerateResult("loraforge + torch.compile", width, height, steps,
                                      per_image, warmup))
    return results


def stock(base: Path, controlnet: Path, width: int, height: int, batch: int, steps: int,
          ) -> list[GenerateResult]:
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        base, controlnet=ControlNetModel.from_pretrained(controlnet, torch_dtype=torch.float32),
        safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"prompt": "2girls, standing, best quality", "negative_prompt": "lowres",
              "image": _pose(width, height), "width": width, "height": height,
              "num_inference_steps": steps}
    per_image, warmup = _time(pipe, kwargs, batch, device)
    return [GenerateResult("diffusers stock (fp32 defaults)", width, height, steps, per_image,
                           warmup)]
