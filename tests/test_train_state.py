"""Pieces of the training state a user sees: the smoothed loss, and why a resume is refused."""

from __future__ import annotations

import pytest

from loraforge.train.state import Position, config_differences


def test_smoothed_loss_starts_at_the_loss_not_near_zero() -> None:
    position = Position()
    for _ in range(3):
        position.step += 1
        position.loss_ema = 0.98 * position.loss_ema + 0.02 * 0.8
        assert position.smoothed_loss(0.98) == pytest.approx(0.8)


def test_config_differences_name_each_changed_key_but_not_ignored_ones() -> None:
    saved = {"train": {"unet_lr": 1e-3, "keep_last_n": 10}, "dataset": {"resolution": 512}}
    current = {"train": {"unet_lr": 5e-4, "keep_last_n": 3}, "dataset": {"resolution": 512}}
    assert config_differences(saved, current, {"train.keep_last_n"}) == [
        "train.unet_lr: 0.001 -> 0.0005"]
