"""The base model as training needs it: loaded from its folder (offline), kohya's LoRA modules
injected (`network.py`) and fused for speed (`lora_product.py`), everything else frozen, the base
weights cast to the training precision, and all moved to the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from loraforge.config import TrainConfig


@dataclass
class Models:
    """The components of one training run; `vae` and `text_encoder` become None when the
    cached latents and text states make them unneeded."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    alphas_cumprod: Any
    num_timesteps: int
    scheduler_config: Any
    latent_channels: int
    vae_scale: int
    #: The adapted modules, U-Net's then the text encoder's (`network.Target`).
    targets: list[Any] = field(default_factory=list)


def load_for_training(base: Path, cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
                      *, autocast: bool, train_text: bool, channels_last: bool,
                      progress_bars: bool) -> Models:
    """The base model in `base` ready to train: LoRA on the U-Net (and on the text encoder when
    `train_text`), the base weights in `dtype` and, with `autocast`, every adapted layer keeping
    its input's dtype. The LoRA weights are drawn from `cfg.seed`."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from loraforge.train import network
    from loraforge.train.lora_product import fuse_adapters

    if not progress_bars:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder",
                                                 local_files_only=True, torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", local_files_only=True,
                                        torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", local_files_only=True,
                                                torch_dtype=torch.float32)
    scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", local_files_only=True)
    torch.manual_seed(cfg.seed)
    targets = network.unet_targets(unet, cfg.network_dim, cfg.network_alpha, cfg.conv_dim,
                                   cfg.conv_alpha)
    network.inject(unet, targets)
    text_encoder.requires_grad_(False)
    if train_text:
        text = network.text_targets(text_encoder, cfg.network_dim, cfg.network_alpha)
        network.inject(text_encoder, text)
        targets += text
    vae.requires_grad_(False)
    for model in (unet, text_encoder):
        fuse_adapters(model)
    if autocast:  # every adapted forward runs under autocast
        network.keep_input_dtype(unet)
        network.keep_input_dtype(text_encoder)
    for model in (unet, text_encoder):
        network.cast_base_weights(model, dtype)
        model.to(device)
    if channels_last:  # the trainer's noisy latents follow
        unet.to(memory_format=torch.channels_last)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_text:
            text_encoder.gradient_checkpointing_enable()
    unet.train()
    text_encoder.train(train_text)
    vae.to(device).eval()
    return Models(tokenizer, text_encoder, vae, unet, scheduler.alphas_cumprod.to(device),
                  scheduler.config.num_train_timesteps, scheduler.config,
                  unet.config.in_channels, 2 ** (len(vae.config.block_out_channels) - 1),
                  targets)
