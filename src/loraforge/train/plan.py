"""How a run's batches group into optimizer steps and epochs, and what the number of training
processes does to the learning rates."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraforge.config import Settings
    from loraforge.train.distributed import World


@dataclass
class Plan:
    """How many steps, how batches group into optimizer steps. `batch_size` is the global batch:
    the per-process batch times the number of processes."""

    batch_size: int
    accumulation: int
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int


def make_plan(settings: Settings, batches: int, world: World) -> Plan:
    """`batches`: global batches per epoch (single-bucket, so more than items / batch size)."""
    train = settings.config.train
    steps_per_epoch = math.ceil(batches / train.gradient_accumulation_steps)
    if train.max_steps:
        total = train.max_steps
        epochs = math.ceil(total / steps_per_epoch)
    else:
        epochs = train.epochs
        total = epochs * steps_per_epoch
    return Plan(train.batch_size * world.size, train.gradient_accumulation_steps, batches,
                steps_per_epoch, total, epochs)


def lr_factor(settings: Settings, world: World) -> float:
    """What train.scale_lr multiplies the learning rates by in a world of this size."""
    return lr_scale(settings.config.train.scale_lr, world.size)


def lr_scale(rule: str, processes: int) -> float:
    """What the train.scale_lr `rule` multiplies the learning rates by for `processes`."""
    return {"none": 1.0, "linear": float(processes), "sqrt": math.sqrt(processes)}[rule]
