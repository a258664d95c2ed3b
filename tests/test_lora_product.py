"""Adapted layers run as one LoRA product in training: the same outputs and gradients as
peft's layers (up to rounding), in fp32 and under bf16 autocast, for the U-Net and the text
encoder, with fewer operations per step."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from peft.tuners.lora.layer import Conv2d, Linear
from transformers import CLIPTextModel

from loraforge.models.tiny import ensure_tiny_models
from loraforge.train import network
from loraforge.train.lora_product import fuse_adapters


def _unet(base: Path, fused: bool, conv_rank: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    network.inject(unet, network.unet_targets(unet, 8, 4, conv_rank, 2))
    with torch.no_grad():  # a trained state: the up weights start at zero
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    if fused:
        assert fuse_adapters(unet) == 192  # every Linear and 1x1 conv of the blocks
    return unet.train()


def _step(unet: UNet2DConditionModel, dtype: torch.dtype | None = None,
          ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Output, LoRA gradients, and the operations dispatched by forward and backward."""
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.autograd.profiler.profile() as prof, \
            torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        output = unet(latents, torch.tensor([500, 20]), hidden).sample
        output.float().square().mean().backward()
    operations = sum(1 for e in prof.function_events if e.name.startswith("aten::"))
    grads = {n: p.grad for n, p in unet.named_parameters() if "lora_" in n}
    return output.detach().float(), grads, operations


def _close(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> bool:
    return bool((a - b).abs().max() <= tolerance * b.abs().max().clamp(min=1e-12))


def test_fused_u_net_matches_peft_and_dispatches_fewer_operations(tmp_path: Path) -> None:
    base, _ = ensure_tiny_models(tmp_path)
    peft_out, peft_grads, peft_ops = _step(_unet(base, fused=False))
    out, grads, ops = _step(_unet(base, fused=True))
    assert _close(out, peft_out, 1e-5)
    assert grads.keys() == peft_grads.keys() and len(grads) == 384
    assert all(_close(grads[n], peft_grads[n], 1e-4) for n in grads)
    assert ops < 0.85 * peft_ops  # 0.81 with torch 2.13


def test_fused_u_net_under_bf16_autocast_matches_peft(tmp_path: Path) -> None:
    """What a GPU run does: bf16 products, fp32 LoRA weights and gradients."""
    base, _ = ensure_tiny_models(tmp_path)
    peft_out, peft_grads, _ = _step(_unet(base, fused=False), torch.bfloat16)
    out, grads, _ = _step(_unet(base, fused=True), torch.bfloat16)
    assert _close(out, peft_out, 0.05)
    assert all(g.dtype == torch.float32 for g in grads.values())
    cosines = [torch.nn.functional.cosine_similarity(grads[n].flatten(), peft_grads[n].flatten(),
                                                     dim=0) for n in grads]
    assert min(cosines) > 0.97


def test_locon_3x3_convolutions_keep_peft_and_merged_layers_fall_back(tmp_path: Path) -> None:
    base, _ = ensure_tiny_models(tmp_path)
    unet = _unet(base, fused=False, conv_rank=4)
    fused = fuse_adapters(unet)
    layers = [m for m in unet.modules() if isinstance(m, Linear | Conv2d)]
    kept = [m for m in layers if "forward" not in vars(m)]
    assert fused + len(kept) == len(layers)
    assert kept and all(m.base_layer.kernel_size != (1, 1) for m in kept)
    layer = next(m for m in layers if isinstance(m, Linear))
    x = torch.randn(3, layer.in_features)
    before = layer(x)
    layer.merge()
    assert torch.allclose(layer(x), before, atol=1e-5)  # peft's merged path, not added twice
    layer.unmerge()
    layer.enable_adapters(False)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_fused_text_encoder_matches_peft(tmp_path: Path) -> None:
    base, _ = ensure_tiny_models(tmp_path)
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(2))

    def run(fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
        network.inject(model, network.text_targets(model, 8, 4))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
        if fused:
            assert fuse_adapters(model) == 72
        out = model.train()(ids)[0]
        out.square().mean().backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters() if "lora_" in n}

    peft_out, peft_grads = run(False)
    out, grads = run(True)
    assert _close(out, peft_out, 1e-5)
    assert len(grads) == 144 and all(_close(grads[n], peft_grads[n], 1e-4) for n in grads)
