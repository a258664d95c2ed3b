"""LoRA layers under mixed precision (what a GPU run does), checked on the CPU with bf16
autocast: keeping each adapter's input in the compute dtype changes no number and saves memory."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import write_training_project
from diffusers import UNet2DConditionModel
from peft.tuners.tuners_utils import BaseTunerLayer

from loraforge.config import load_settings
from loraforge.models.tiny import ensure_tiny_models
from loraforge.train import network, objective
from loraforge.train.distributed import World
from loraforge.train.run import check_inputs
from loraforge.train.trainer import Trainer


def _adapted_unet(base: Path, keep_input_dtype: bool) -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet",
                                                torch_dtype=torch.float32)
    network.inject(unet, network.unet_targets(unet, 8, 4))
    network.cast_base_weights(unet, torch.bfloat16)  # as the trainer keeps them
    with torch.no_grad():  # a trained state: the up weights start at zero
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    if keep_input_dtype:
        network.keep_input_dtype(unet)
    return unet


def _step(unet: UNet2DConditionModel) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Output, LoRA gradients and the bytes autograd keeps for the backward pass."""
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 16, 16, generator=generator).to(torch.bfloat16)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim,
                         generator=generator).to(torch.bfloat16)
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        output = unet(latents, torch.tensor([500, 20]), hidden).sample
    output.float().square().mean().backward()
    grads = [p.grad for n, p in unet.named_parameters() if "lora_" in n]
    return output.detach(), grads, sum(saved.values())


def test_adapters_under_autocast_keep_results_and_save_less_for_backward(
        tmp_path: Path) -> None:
    base, _ = ensure_tiny_models(tmp_path)
    cast_out, cast_grads, cast_bytes = _step(_adapted_unet(base, keep_input_dtype=False))
    kept_out, kept_grads, kept_bytes = _step(_adapted_unet(base, keep_input_dtype=True))
    assert torch.equal(kept_out, cast_out)
    assert len(kept_grads) == len(cast_grads) > 0
    assert all(torch.equal(a, b) for a, b in zip(kept_grads, cast_grads, strict=True))
    assert kept_bytes < 0.95 * cast_bytes


def _trainer_as_on_a_gpu(tmp_path: Path, tiny_store: Path, *sets: str) -> Trainer:
    """A trainer whose device stands in for a GPU training in bf16 (the CPU never does)."""
    settings = load_settings(write_training_project(tmp_path, tiny_store), list(sets))
    _, dataset, _ = check_inputs(settings, "gpu")
    trainer = Trainer(settings, dataset, tmp_path / "run", World(), torch.device("cpu"))
    trainer.precision, trainer.dtype = "bf16", torch.bfloat16
    return trainer


def test_trainer_in_bf16_keeps_frozen_weights_in_bf16_and_adapter_inputs_uncast(
        tmp_path: Path, tiny_store: Path) -> None:
    trainer = _trainer_as_on_a_gpu(tmp_path, tiny_store)
    models = trainer.load_models(tiny_store / "tiny-sd15")
    for model in (models.unet, models.text_encoder):
        dtypes = {n: p.dtype for n, p in model.named_parameters()}
        assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
        assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
        adapters = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        assert adapters and not any(m.cast_input_dtype_enabled for m in adapters)


def test_compile_unet_blocks_compiles_the_transformer_blocks_only(
        tmp_path: Path, tiny_store: Path) -> None:
    trainer = _trainer_as_on_a_gpu(tmp_path, tiny_store, "train.compile_unet=blocks")
    unet = trainer.load_models(tiny_store / "tiny-sd15").unet
    assert trainer.compiled(unet) is unet
    compiled = {type(m).__name__ for m in unet.modules()
                if getattr(m, "_compiled_call_impl", None) is not None}
    assert compiled == {"BasicTransformerBlock"}


def test_channels_last_puts_the_u_net_and_its_input_in_channels_last_order(
        tmp_path: Path, tiny_store: Path) -> None:
    """train.channels_last = true (the default on a GPU; the CPU gains nothing from it)."""
    channels_last = torch.channels_last
    assert not _trainer_as_on_a_gpu(tmp_path / "default", tiny_store).channels_last
    trainer = _trainer_as_on_a_gpu(tmp_path, tiny_store, "train.channels_last=true")
    models = trainer.load_models(tiny_store / "tiny-sd15")
    convs = [m.weight for m in models.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=channels_last) for w in convs)
    latents = torch.zeros(2, 4, 8, 8, dtype=torch.bfloat16)
    draw = objective.draw((2, 4, 8, 8), models.num_timesteps, 0.0,
                          torch.Generator().manual_seed(0), torch.device("cpu"), torch.bfloat16)
    assert trainer.add_noise(models, latents, draw).is_contiguous(memory_format=channels_last)
