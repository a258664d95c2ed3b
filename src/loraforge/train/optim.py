"""Optimizers by the names LoRA users know, and learning-rate schedules with warmup."""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from loraforge.config import OPTIMIZERS
from loraforge.errors import ForgeError

if TYPE_CHECKING:
    import torch

def _need(module: str, optimizer: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ForgeError(f"optimizer {optimizer} needs the Python package `{module}`, which is "
                         "not installed",
                         fix=f"pip install 'loraforge[{extra}]', or set train.optimizer = "
                             '"AdamW"')


def optimizer_class(name: str, device: torch.device) -> type:
    """The optimizer class a name stands for; a ForgeError when it cannot run here."""
    import torch

    if name == "AdamW":
        return torch.optim.AdamW
    if name == "AdamW8bit":
        if device.type != "cuda":
            raise ForgeError("optimizer AdamW8bit runs only on a CUDA GPU (bitsandbytes), and "
                             "this process has none",
                             fix='set train.optimizer = "AdamW" (or --set train.optimizer=AdamW) '
                                 "to train here, or run on a GPU node")
        _need("bitsandbytes", name, "cuda")
        return importlib.import_module("bitsandbytes.optim").AdamW8bit
    if name == "Prodigy":
        _need("prodigyopt", name, "optimizers")
        return importlib.import_module("prodigyopt").Prodigy
    if name == "Lion":
        _need("lion_pytorch", name, "optimizers")
        return importlib.import_module("lion_pytorch").Lion
    if name == "Adafactor":
        return importlib.import_module("transformers.optimization").Adafactor
    module_name, _, class_name = name.rpartition(".")
    if not module_name:
        raise ForgeError(f"unknown optimizer `{name}`",
                         fix=f"use one of {', '.join(OPTIMIZERS)} or a module.Class path such as "
                             "torch.optim.SGD")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ForgeError(f"optimizer `{name}` cannot be imported ({exc})",
                         fix="check the module.Class path and that its package is installed"
                         ) from None


def build_optimizer(name: str, groups: list[dict[str, Any]], args: dict[str, Any],
                    device: torch.device) -> torch.optim.Optimizer:
    """`groups`: param groups, each with its own `lr`. `args`: keyword arguments from config;
    one that the groups set (the learning rate) would be silently overridden, so it is refused."""
    taken = sorted({key for group in groups for key in group} & set(args))
    if taken:
        shown = ", ".join(f"`{key}`" for key in taken)
        raise ForgeError(f"train.optimizer_args sets {shown}, which the trainer sets itself for "
                         "the U-Net and the text encoder, so it would be ignored",
                         fix=f"remove {shown} from train.optimizer_args; set the learning "
                             "rates with train.unet_lr and train.text_encoder_lr")
    cls = optimizer_class(name, device)
    rates = {group["lr"] for group in groups} - {0.0}
    if name == "Prodigy" and len(rates) > 1:
        raise ForgeError("Prodigy finds the step size itself and needs one learning rate for "
                         f"the U-Net and the text encoder (got {sorted(rates)})",
                         fix="set train.unet_lr and train.text_encoder_lr to the same value "
                             "(1.0 is usual for Prodigy), or text_encoder_lr = 0")
    kwargs = dict(args)
    if name == "AdamW":
        kwargs.setdefault("fused", True)  # one kernel for all tensors: ~5x faster steps here
    if name == "Adafactor":
        kwargs = {"relative_step": False, "scale_parameter": False, "warmup_init": False,
                  **kwargs}
    try:
        return cls(groups, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ForgeError(f"optimizer {name} rejected its arguments: {exc}",
                         fix="check train.optimizer_args in forge.toml") from None


def warmup_steps(warmup: float, total_steps: int) -> int:
    """A ratio of all steps when below 1, else a step count."""
    return round(warmup * total_steps) if warmup < 1 else int(warmup)


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup: float, cycles: int, power: float,
                    ) -> torch.optim.lr_scheduler.LRScheduler:
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(warmup, total_steps),
                         num_training_steps=total_steps, num_cycles=cycles, power=power)
