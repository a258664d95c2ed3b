"""Peak memory of the two phases that decide whether training fits a small GPU: latent caching
(the fp32 VAE encoding `train.vae_batch_size` images per call) and one LoRA training step of the
U-Net under bf16 autocast, with peft's cast of each adapter input to fp32 and without it (what
the trainer does). On a GPU: `torch.cuda.max_memory_allocated`. On the CPU: the peak of live
tensor storage seen by the dispatcher, rounded up to 512 bytes as the CUDA allocator does; it
leaves out cuDNN workspaces."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorPeak(TorchDispatchMode):
    """Live tensor bytes created inside the mode, plus those `track`ed; `peak` is the most."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def track(self, *tensors: torch.Tensor) -> None:
        for tensor in tensors:
            self._add(tensor)

    def _add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live or not storage.nbytes():
            return
        size = -(-storage.nbytes() // 512) * 512
        self.live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None,
                           ) -> Any:
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._add(item)
        return out


@dataclass
class MemoryResult:
    phase: str
    batch: int
    resolution: int
    peak_gb: float


def _measure(device: str, modules: list[torch.nn.Module], inputs: list[torch.Tensor],
             run: Any) -> float:
    """GB at the peak of `run()`, the modules' weights and the inputs included."""
    if device == "cuda":
        from bench.train import peak_memory_gb, reset_peak

        reset_peak(device)
        run()
        torch.cuda.synchronize()
        return peak_memory_gb(device)
    mode = TensorPeak()
    mode.track(*inputs, *(t for m in modules for t in [*m.parameters(), *m.buffers()]))
    with mode:
        run()
    return mode.peak / 2**30


def vae_caching(base: Path, batch: int, resolution: int, device: str) -> MemoryResult:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=torch.float32)
    vae.to(device).eval().requires_grad_(False)
    pixels = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1

    def run() -> None:
        with torch.no_grad():
            vae.encode(pixels).latent_dist.mean.cpu()

    peak = _measure(device, [vae], [pixels], run)
    return MemoryResult(f"latent caching, train.vae_batch_size={batch}", batch, resolution,
                        peak)


def lora_step(base: Path, batch: int, resolution: int, device: str, keep_input_dtype: bool,
              ) -> MemoryResult:
    """One forward and backward of the U-Net with the trainer's LoRA set, bf16 weights."""
    from diffusers import UNet2DConditionModel

    from loraforge.train import network
    from loraforge.train.lora_product import fuse_adapters

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet",
                                                torch_dtype=torch.float32)
    network.inject(unet, network.unet_targets(unet, 16, 8))
    network.cast_base_weights(unet, torch.bfloat16)
    if keep_input_dtype:  # and each adapted layer one LoRA product, as the trainer runs them
        network.keep_input_dtype(unet)
        fuse_adapters(unet)
    unet.train().to(device)
    side = resolution // 8
    latents = torch.randn(batch, 4, side, side, device=device, dtype=torch.bfloat16)
    hidden = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device,
                         dtype=torch.bfloat16)
    timesteps = torch.full((batch,), 500, device=device)

    def run() -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            output = unet(latents, timesteps, hidden).sample
        output.float().square().mean().backward()

    peak = _measure(device, [unet], [latents, hidden], run)
    how = "input kept in bf16 (loraforge)" if keep_input_dtype else "peft's fp32 input cast"
    return MemoryResult(f"U-Net LoRA step, {how}", batch, resolution, peak)
