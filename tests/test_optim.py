"""Optimizers by name and learning-rate schedules: each one a user can pick really steps."""

from __future__ import annotations

import pytest
import torch

from loraforge.errors import ForgeError
from loraforge.train.optim import build_optimizer, build_scheduler, warmup_steps

CPU = torch.device("cpu")


def _groups() -> list[dict]:
    torch.manual_seed(0)
    return [{"params": [torch.nn.Parameter(torch.randn(4, 3))], "lr": 1e-2},
            {"params": [torch.nn.Parameter(torch.randn(2, 2))], "lr": 1e-3}]


@pytest.mark.parametrize("name", ["AdamW", "Prodigy", "Lion", "Adafactor", "torch.optim.SGD"])
def test_every_named_optimizer_moves_the_weights(name: str) -> None:
    groups = _groups()
    if name == "Prodigy":
        for group in groups:
            group["lr"] = 1.0
    before = [g["params"][0].detach().clone() for g in groups]
    optimizer = build_optimizer(name, groups, {}, CPU)
    for group in groups:
        group["params"][0].grad = torch.ones_like(group["params"][0])
    optimizer.step()
    assert all(not torch.equal(b, g["params"][0]) for b, g in zip(before, groups, strict=True))
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in groups]


def test_prodigy_with_two_learning_rates_is_a_clear_error() -> None:
    with pytest.raises(ForgeError, match="one learning rate"):
        build_optimizer("Prodigy", _groups(), {}, CPU)


def test_optimizer_arguments_reach_the_optimizer() -> None:
    optimizer = build_optimizer("AdamW", _groups(), {"weight_decay": 0.25, "betas": [0.8, 0.9]},
                                CPU)
    assert optimizer.param_groups[0]["weight_decay"] == 0.25
    with pytest.raises(ForgeError, match="optimizer_args"):
        build_optimizer("AdamW", _groups(), {"no_such_argument": 1}, CPU)


def test_eight_bit_adamw_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(ForgeError, match="CUDA") as caught:
        build_optimizer("AdamW8bit", _groups(), {}, CPU)
    assert 'train.optimizer = "AdamW"' in caught.value.fix


@pytest.mark.parametrize("warmup, total, expected", [(0.05, 200, 10), (0.0, 50, 0), (7, 50, 7)])
def test_warmup_is_a_ratio_below_one_else_a_step_count(warmup: float, total: int,
                                                       expected: int) -> None:
    assert warmup_steps(warmup, total) == expected


def _lrs(name: str, total: int = 20, warmup: float = 0.0, cycles: int = 1,
         power: float = 1.0) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(name, optimizer, total, warmup, cycles, power)
    lrs = []
    for _ in range(total):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def test_schedules_have_their_shapes() -> None:
    assert set(_lrs("constant")) == {1.0}
    warm = _lrs("constant_with_warmup", warmup=5)
    assert warm[0] == 0.0 and warm[5:] == [1.0] * 15
    linear = _lrs("linear")
    assert linear[0] == 1.0 and linear[-1] == pytest.approx(0.05)
    cosine = _lrs("cosine")
    assert cosine[10] == pytest.approx(0.5)
    restarts = _lrs("cosine_with_restarts", cycles=2)
    assert restarts[10] == pytest.approx(1.0) and restarts[9] < 0.1  # a restart mid-way
    poly = _lrs("polynomial", power=2.0)
    assert poly[0] == 1.0 and 0 < poly[10] < linear[10]
