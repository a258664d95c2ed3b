"""Pipeline assembly and one-image rendering; also the library API for the trainer's previews.

Public API (all heavy imports inside):

- `make_scheduler(name, scheduler_config)`: an A1111-named sampler as a diffusers scheduler.
- `encode_prompt_pair(tokenizer, text_encoder, prompt, negative, clip_skip, max_chunks=3)`:
  A1111-style weighted, chunked embeddings with clip skip, exactly as training encodes captions.
- `build_pipeline(tokenizer, text_encoder, vae, unet, scheduler, controlnet=None)`: a
  StableDiffusion(ControlNet)Pipeline around in-memory components (no safety checker).
- `render(pipe, embeds, negative_embeds, width, height, steps, cfg, seed, image=None,
  control_scale=1.0)`: one PIL image, deterministic per seed (a CPU torch.Generator);
  `render_batch(..., seeds, images, ...)` several seeds in one batch.
- `load_pipeline(base, controlnet, device, dtype, offload)`: the models from disk, once;
  `compile_denoisers(pipe, how)` compiles its U-Net and ControlNet (generate.compile).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.generate.prompts import encode_prompt_pair
from loraforge.runtime import quiet_loading
from loraforge.samplers import make_scheduler, seed_scheduler

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = ["Precision", "build_pipeline", "compile_denoisers", "encode_prompt_pair",
           "load_pipeline",
           "make_scheduler", "pick_dtype", "quiet_libraries", "render", "render_batch",
           "set_vae_tiling"]

PRECISIONS = ("auto", "fp16", "bf16", "fp32")


@dataclass(frozen=True)
class Precision:
    name: str  # fp16, bf16 or fp32
    note: str | None = None

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.name]


def pick_dtype(requested: str, device: torch.device) -> Precision:
    """fp16 on a GPU unless asked otherwise; always fp32 on the CPU (half precision there is
    slow and not bit-stable)."""
    if device.type != "cuda":
        note = (f"precision {requested} ignored on the CPU: rendering in fp32"
                if requested not in ("auto", "fp32") else None)
        return Precision("fp32", note)
    if requested == "auto":
        return Precision("fp16")
    if requested == "bf16":
        import torch

        if not torch.cuda.is_bf16_supported():
            return Precision("fp16", "this GPU has no bf16: rendering in fp16")
    return Precision(requested)


def quiet_libraries() -> None:
    """Keep diffusers/transformers/peft chatter out of job logs (errors still show). For the
    command-line process: call before diffusers is imported."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()  # transformers may be imported already
    warnings.filterwarnings("ignore", message=".*peft_config.*multiple adapters.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")
    # torchsde's Brownian interval complains about float rounding at the last step (harmless).
    warnings.filterwarnings("ignore", message="Should have tb<=t1")


def build_pipeline(tokenizer: Any, text_encoder: Any, vae: Any, unet: Any, scheduler: Any,
                   controlnet: Any = None) -> Any:
    """A pipeline around existing components: StableDiffusionControlNetPipeline with a
    ControlNet, else StableDiffusionPipeline. No safety checker; no progress bar."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

    common = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                  scheduler=scheduler, safety_checker=None, feature_extractor=None,
                  requires_safety_checker=False)
    if controlnet is None:
        pipe = StableDiffusionPipeline(**common)
    else:
        pipe = StableDiffusionControlNetPipeline(controlnet=controlnet, **common)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(base: Path, controlnet: Path | None, device: torch.device,
                  dtype: torch.dtype, offload: bool = False, sampler: str = "DPM++ 2M Karras",
                  ) -> Any:
    """Load the base model (and ControlNet) from diffusers folders, offline, once.

    `offload` (CUDA only) keeps idle models in CPU memory (enable_model_cpu_offload)."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    with quiet_loading():
        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer",
                                                  local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder",
                                                     local_files_only=True, torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", local_files_only=True,
                                            torch_dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet",
                                                    local_files_only=True, torch_dtype=dtype)
        cn = (ControlNetModel.from_pretrained(controlnet, local_files_only=True,
                                              torch_dtype=dtype)
              if controlnet is not None else None)
    scheduler_config = _scheduler_config(base)
    pipe = build_pipeline(tokenizer, text_encoder, vae, unet,
                          make_scheduler(sampler, scheduler_config), cn)
    for model in (text_encoder, vae, unet, cn):
        if model is not None:  # frozen, as a LoRA leaves them: loading one compiles nothing anew
            model.eval().requires_grad_(False)
    vae.enable_slicing()  # a batch of images is decoded one by one: its memory is one image's
    if offload and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def compile_denoisers(pipe: Any, how: bool | str) -> None:
    """torch.compile the U-Net and the ControlNet in place, as generate.compile asks: whole
    (true) or only their transformer blocks ("blocks", one graph shared by like blocks). The
    compiler runs when the first batch of each size is rendered."""
    if not how:
        return
    from diffusers.models.attention import BasicTransformerBlock

    for model in (pipe.unet, getattr(pipe, "controlnet", None)):
        if model is None:
            continue
        if how != "blocks":
            model.compile()
            continue
        for module in model.modules():
            if isinstance(module, BasicTransformerBlock):
                module.compile()


def _scheduler_config(base: Path) -> dict[str, Any]:
    import json

    return json.loads((base / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))


def set_vae_tiling(pipe: Any, enabled: bool) -> None:
    if enabled:
        pipe.vae.enable_tiling()
    else:
        pipe.vae.disable_tiling()


def render(pipe: Any, embeds: torch.Tensor, negative_embeds: torch.Tensor, width: int,
           height: int, steps: int, cfg: float, seed: int, image: Image.Image | None = None,
           control_scale: float = 1.0) -> Image.Image:
    """One image from prompt embeddings (see `encode_prompt_pair`).

    With a ControlNet pipeline `image` is the control image (the pose map, `width` x `height`),
    weighted by `control_scale`; a plain StableDiffusionPipeline takes no image. The initial
    noise and any sampler noise come from a CPU generator seeded with `seed`, so an image is the
    same on every run (bit-identical on the CPU).
    """
    return render_batch(pipe, embeds, negative_embeds, width, height, steps, cfg, [seed],
                        None if image is None else [image], control_scale)[0]


def render_batch(pipe: Any, embeds: torch.Tensor, negative_embeds: torch.Tensor, width: int,
                 height: int, steps: int, cfg: float, seeds: Sequence[int],
                 images: Sequence[Image.Image] | None = None, control_scale: float = 1.0,
                 output_type: str = "pil") -> list[Any]:
    """One image per seed, denoised together in one batch (faster on a GPU). Image i takes
    all its noise from `seeds[i]` and `images[i]` as its control image, so it is the image
    `render` makes from that seed up to rounding (batched kernels may round differently).
    `output_type="latent"`: the denoised latents ([4, h, w] each), not decoded."""
    import torch

    has_controlnet = getattr(pipe, "controlnet", None) is not None
    if has_controlnet and images is None:
        raise ValueError("a ControlNet pipeline needs a control image")
    if not has_controlnet and images is not None:
        raise ValueError("a control image needs a ControlNet pipeline")
    if images is not None and len(images) != len(seeds):
        raise ValueError(f"{len(seeds)} seeds need {len(seeds)} control images, got "
                         f"{len(images)}")
    if width % 8 or height % 8:
        raise ValueError(f"width and height must be multiples of 8, got {width}x{height}")
    # Lists of one give the same bits as a single seed, image and generator (checked for
    # every kind of sampler noise), so one path serves every batch size.
    seed_scheduler(pipe.scheduler, list(seeds))
    extra: dict[str, Any] = {}
    if images is not None:
        extra = {"image": list(images), "controlnet_conditioning_scale": float(control_scale)}
    with _autocast_if_mixed(pipe):
        result = pipe(prompt_embeds=embeds.repeat(len(seeds), 1, 1),
                      negative_prompt_embeds=negative_embeds.repeat(len(seeds), 1, 1),
                      width=width, height=height, num_inference_steps=steps, guidance_scale=cfg,
                      generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
                      output_type=output_type, **extra)
    return list(result.images)


def _autocast_if_mixed(pipe: Any) -> contextlib.AbstractContextManager[Any]:
    """Autocast on a GPU when the components' dtypes differ (the trainer keeps the VAE in fp32
    beside an fp16/bf16 U-Net); a no-op otherwise."""
    import torch

    unet_dtype = pipe.unet.dtype
    dtypes = {unet_dtype, pipe.vae.dtype, pipe.text_encoder.dtype}
    device = pipe._execution_device
    if len(dtypes) > 1 and device.type == "cuda" and unet_dtype != torch.float32:
        return torch.autocast("cuda", dtype=unet_dtype)
    return contextlib.nullcontext()
