"""Model folders to benchmark on: the embedded tiny model, or the real SD 1.5 architecture with
random weights (throughput does not depend on the weights, so nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path


def model_folders(kind: str, root: Path) -> tuple[Path, Path]:
    """(base, controlnet) diffusers folders of `kind` ("tiny" or "sd15") under `root`."""
    if kind == "tiny":
        from loraforge.models.tiny import ensure_tiny_models

        return ensure_tiny_models(root)
    base, controlnet = root / "sd15-random", root / "sd15-random-controlnet"
    if not (base / "model_index.json").is_file():
        _build_sd15(base, controlnet)
    return base, controlnet


def _build_sd15(base: Path, controlnet_dir: Path) -> None:
    import torch
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    from loraforge.models.tiny import clip_text_config, sd15_config
    from loraforge.models.tokenizer import build_clip_tokenizer, write_vocab_files

    torch.manual_seed(0)
    # Random initialisation of 1.2 billion weights takes a minute on a CPU, seconds on a GPU.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        unet = UNet2DConditionModel.from_config(sd15_config("unet"))
        vae = AutoencoderKL.from_config(sd15_config("vae"))
        text_encoder = CLIPTextModel(clip_text_config(sd15_config("text_encoder")))
        controlnet = ControlNetModel.from_unet(unet)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder,
                                   tokenizer=build_clip_tokenizer(), unet=unet,
                                   scheduler=PNDMScheduler.from_config(sd15_config("scheduler")),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(base, safe_serialization=True)
    controlnet.to(torch.float16).save_pretrained(controlnet_dir, safe_serialization=True)
    write_vocab_files(base / "tokenizer")
