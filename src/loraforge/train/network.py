"""The LoRA network: which modules get an adapter (kohya's `networks.lora` set for SD 1.x), peft
injection, and the mapping between module paths and kohya key names.

U-Net: every Linear and 1x1 Conv2d inside each Transformer2DModel (192 modules on SD 1.5). With
conv ("LoCon") layers on, also the Linear and Conv2d layers of ResnetBlock2D, Downsample2D and
Upsample2D: 3x3 convs get the conv rank/alpha, Linear and 1x1 layers the network rank/alpha.
Text encoder: q/k/v/out projections and both MLP layers of each CLIP layer (72 modules).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loraforge.kohya_names import kohya_name

if TYPE_CHECKING:
    import torch
    from torch import nn

ADAPTER = "default"

UNET_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


@dataclass(frozen=True)
class Target:
    """One adapted module: where it is in the model and what kohya calls it."""

    component: str  # "unet" or "text_encoder"
    path: str  # module path inside the component
    kohya_name: str
    rank: int
    alpha: float


def find_targets(model: nn.Module, component: str, blocks: tuple[str, ...], rank: int,
                 alpha: float, conv_rank: int = 0, conv_alpha: float = 0.0) -> list[Target]:
    """Linear and Conv2d layers inside modules whose class is one of `blocks`, in model order."""
    from torch import nn

    targets: dict[str, Target] = {}
    for block_path, block in model.named_modules():
        if type(block).__name__ not in blocks:
            continue
        for child_path, child in block.named_modules():
            if not child_path:
                continue
            path = f"{block_path}.{child_path}" if block_path else child_path
            if isinstance(child, nn.Linear) or (
                    isinstance(child, nn.Conv2d) and child.kernel_size == (1, 1)):
                r, a = rank, alpha
            elif isinstance(child, nn.Conv2d) and conv_rank > 0:
                r, a = conv_rank, conv_alpha
            else:
                continue
            targets.setdefault(path, Target(component, path, kohya_name(component, path), r, a))
    return list(targets.values())


def unet_targets(unet: nn.Module, rank: int, alpha: float, conv_rank: int = 0,
                 conv_alpha: float = 0.0) -> list[Target]:
    targets = find_targets(unet, "unet", UNET_BLOCKS, rank, alpha)
    if conv_rank > 0:
        targets += find_targets(unet, "unet", UNET_CONV_BLOCKS, rank, alpha, conv_rank,
                                conv_alpha)
    return targets


def text_targets(text_encoder: nn.Module, rank: int, alpha: float) -> list[Target]:
    return find_targets(text_encoder, "text_encoder", TEXT_BLOCKS, rank, alpha)


def inject(model: nn.Module, targets: list[Target]) -> None:
    """Add a peft LoRA adapter to every target (down random, up zero: a no-op until trained).

    Adapter weights are created from the global torch RNG (seed it first) and kept in fp32
    whatever the base model's dtype.
    """
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    if not targets:
        return
    first = targets[0]
    config = LoraConfig(
        r=first.rank, lora_alpha=first.alpha,
        target_modules=[t.path for t in targets],
        rank_pattern={t.path: t.rank for t in targets if t.rank != first.rank},
        alpha_pattern={t.path: t.alpha for t in targets if t.alpha != first.alpha},
        init_lora_weights=True,
    )
    model.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for target in targets:
        layer = model.get_submodule(target.path)
        for part in (layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]):
            part.to(torch.float32)
            part.requires_grad_(True)


def cast_base_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """The model's own (frozen) weights in `dtype`; its LoRA weights stay fp32."""
    for name, param in model.named_parameters():
        if "lora_" not in name:
            param.data = param.data.to(dtype)


def keep_input_dtype(model: nn.Module) -> None:
    """Stop peft casting each adapter's input to the adapter's fp32 weights. Under autocast the
    matmul casts back to bf16/fp16 anyway: the cast only copied every adapted activation twice
    and kept a second copy for the backward pass (BENCHMARKS.md: same outputs and gradients
    bit for bit, fewer copies, less memory). Only for models run under autocast."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def lora_pair(model: nn.Module, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) weights of one target: kohya's lora_down and lora_up."""
    layer = model.get_submodule(target.path)
    return layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight


def lora_weights(models: dict[str, nn.Module], targets: list[Target]) -> dict[str, torch.Tensor]:
    """The live LoRA parameters under their kohya names: `<name>.lora_down.weight` and
    `<name>.lora_up.weight`. `models` maps a target's component ("unet", "text_encoder")."""
    weights = {}
    for target in targets:
        down, up = lora_pair(models[target.component], target)
        weights[f"{target.kohya_name}.lora_down.weight"] = down
        weights[f"{target.kohya_name}.lora_up.weight"] = up
    return weights
