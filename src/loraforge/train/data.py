"""Training examples: images with their captions, repeated per concept, in a seeded order per
epoch, resized and center-cropped to the square training resolution.

Order and every random draw derive from (seed, epoch, position), so a resumed run sees exactly
the batches an uninterrupted one would, without saving any RNG state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loraforge.dataset.images import load_image

if TYPE_CHECKING:
    import torch

    from loraforge.dataset.scan import Dataset


@dataclass(frozen=True)
class Example:
    """One training image (before repeats)."""

    index: int
    path: Path
    caption: str
    concept: str


def examples(dataset: Dataset) -> list[Example]:
    found = []
    for concept in dataset.concepts:
        for record in concept.images:
            caption = ", ".join(record.tags) if record.tags else concept.name
            found.append(Example(len(found), record.path, caption, concept.name))
    return found


def repeated_indices(dataset: Dataset) -> list[int]:
    """Each example's index once per repeat of its concept."""
    indices: list[int] = []
    position = 0
    for concept in dataset.concepts:
        for _ in concept.images:
            indices += [position] * concept.repeats
            position += 1
    return indices


def epoch_batches(indices: list[int], batch_size: int, seed: int, epoch: int,
                  ) -> list[list[int]]:
    """This epoch's batches: a permutation seeded by (seed, epoch), cut into batch_size pieces
    (the last one may be smaller)."""
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(indices), generator=generator).tolist()
    shuffled = [indices[i] for i in order]
    return [shuffled[i:i + batch_size] for i in range(0, len(shuffled), batch_size)]


def batches_per_epoch(dataset: Dataset, batch_size: int) -> int:
    return math.ceil(len(repeated_indices(dataset)) / batch_size)


def pixel_tensor(path: Path, resolution: int) -> torch.Tensor:
    """The image as a [3, res, res] tensor in [-1, 1]: short side resized, then center-cropped."""
    import numpy as np
    import torch
    from PIL import Image

    image = load_image(path)
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)),
            max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    left = (image.width - resolution) // 2
    top = (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
