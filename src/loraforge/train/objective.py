"""The denoising objective: epsilon prediction under the base model's noise schedule, with
min-SNR-gamma weighting and optional noise offset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Draw:
    """The random part of one step: which timesteps, which noise."""

    timesteps: torch.Tensor
    noise: torch.Tensor

    def rows(self, start: int, stop: int) -> Draw:
        """The draw of examples start..stop-1 of the batch (one process's share)."""
        return Draw(self.timesteps[start:stop], self.noise[start:stop])


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """A generator seeded by (seed, step): a resumed run draws exactly what the original would.
    The mix is taken modulo 2**63, the range a generator's seed has (any seed from 0 to MAX_SEED
    trains; for seeds below about 9e12 the modulo changes nothing)."""
    import torch

    kind = "cuda" if device.type == "cuda" else "cpu"
    return torch.Generator(device=kind).manual_seed(
        (seed * 1_000_003 + 7919 * step + 1) % 2**63)


def draw(shape: tuple[int, ...], num_timesteps: int, noise_offset: float,
         generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> Draw:
    """Noise and timesteps for a whole batch of latents of `shape` (the global batch when
    several processes share it: each takes its rows, so the split does not change the draw)."""
    import torch

    batch, channels = shape[:2]
    gen_device = generator.device
    noise = torch.randn(shape, generator=generator, device=gen_device)
    if noise_offset > 0:
        noise = noise + noise_offset * torch.randn((batch, channels, 1, 1), generator=generator,
                                                   device=gen_device)
    timesteps = torch.randint(0, num_timesteps, (batch,), generator=generator, device=gen_device)
    return Draw(timesteps.to(device), noise.to(device, dtype))


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1.0 - alpha_bar)


def loss_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float,
                 ) -> torch.Tensor | None:
    """min(SNR, gamma) / SNR per sample for epsilon prediction; None when gamma is 0 (off)."""
    if gamma <= 0:
        return None
    ratio = snr(alphas_cumprod, timesteps)
    return ratio.clamp(max=gamma) / ratio


def denoising_loss(prediction: torch.Tensor, noise: torch.Tensor,
                   weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error per sample, weighted, averaged over the batch (computed in fp32)."""
    per_sample = (prediction.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()
