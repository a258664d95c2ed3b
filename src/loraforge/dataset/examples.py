"""Training examples: images with their tags, per-concept caption policy and aspect bucket;
each epoch's batches (single-bucket, seeded); the caption, flip and crop of one draw.

Every random choice derives from (seed, epoch, position in the epoch), so a resumed run sees
exactly what an uninterrupted one would, without saving any RNG state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loraforge.dataset import buckets as bucketing
from loraforge.dataset.images import load_image
from loraforge.dataset.tags import TagPolicy, example_rng, render_caption, warn_short_captions
from loraforge.errors import ForgeError

if TYPE_CHECKING:
    import torch

    from loraforge.config import DatasetConfig
    from loraforge.dataset.scan import Dataset

POLICY_KEYS = ("shuffle_caption", "keep_tokens", "keep_tokens_separator", "caption_dropout_rate",
               "tag_dropout_rate", "caption_prefix", "caption_suffix", "flip_aug")


@dataclass(frozen=True)
class Example:
    """One training image (before repeats)."""

    index: int
    path: Path
    tags: tuple[str, ...]
    concept: str
    bucket: tuple[int, int]
    policy: TagPolicy
    is_reg: bool


def concept_policy(config: DatasetConfig, concept: str) -> tuple[TagPolicy, bool]:
    """The caption policy of one concept: `[dataset]` values, overridden by
    `[dataset.concepts.<name>]`. Returns (policy, is_reg)."""
    values = {key: getattr(config, key) for key in POLICY_KEYS}
    override = config.concepts.get(concept)
    if override is not None:
        values.update({k: v for k, v in override.model_dump().items()
                       if k in POLICY_KEYS and v is not None})
    policy = TagPolicy(shuffle=values["shuffle_caption"], keep_tokens=values["keep_tokens"],
                       keep_tokens_separator=values["keep_tokens_separator"],
                       caption_dropout_rate=values["caption_dropout_rate"],
                       tag_dropout_rate=values["tag_dropout_rate"],
                       caption_prefix=values["caption_prefix"],
                       caption_suffix=values["caption_suffix"], flip_aug=values["flip_aug"])
    return policy, bool(override is not None and override.is_reg)


def build_examples(dataset: Dataset, config: DatasetConfig,
                   warn: Callable[[str], None]) -> list[Example]:
    known = [c.name for c in dataset.concepts]
    unknown = sorted(set(config.concepts) - set(known))
    if unknown:
        raise ForgeError(f"[dataset.concepts] names {', '.join(unknown)}, which "
                         f"{'is' if len(unknown) == 1 else 'are'} not a concept folder",
                         fix=f"the concepts are: {', '.join(known)} (the folder name without "
                             "its repeat count)")
    if config.enable_bucket:
        # A resolution below min_bucket (tiny test models train at 64 px) lowers the minimum;
        # one above max_bucket is refused when the config is read.
        buckets = bucketing.make_buckets(config.resolution, config.bucket_step,
                                         min(config.min_bucket, config.resolution),
                                         config.max_bucket)
    found: list[Example] = []
    for concept in dataset.concepts:
        policy, is_reg = concept_policy(config, concept.name)
        message = warn_short_captions(concept.name, [r.tags for r in concept.images],
                                      policy.keep_tokens, policy.keep_tokens_separator)
        if message and policy.shuffle:
            warn(message)
        for record in concept.images:
            if config.enable_bucket:
                bucket = bucketing.assign_bucket(record.width, record.height, buckets,
                                                 config.bucket_no_upscale, config.bucket_step)
            else:
                bucket = (config.resolution, config.resolution)
            found.append(Example(len(found), record.path, tuple(record.tags), concept.name,
                                 bucket, policy, is_reg))
    if found and all(e.is_reg for e in found):
        names = ", ".join(f"[dataset.concepts.{c.name}]" for c in dataset.concepts)
        raise ForgeError(f"every concept is a regularisation concept (is_reg = true in "
                         f"{names}), so there is nothing to train",
                         fix="add a concept folder of the character to train, or remove "
                             "is_reg = true from the concept that is not regularisation")
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


def epoch_batches(examples: list[Example], indices: list[int], batch_size: int, seed: int,
                  epoch: int) -> list[list[int]]:
    """This epoch's batches: single-bucket, shuffled, seeded by (seed, epoch)."""
    return bucketing.bucket_batches(indices, [e.bucket for e in examples], batch_size, seed,
                                    epoch)


def batches_per_epoch(examples: list[Example], indices: list[int], batch_size: int) -> int:
    return bucketing.num_bucket_batches(indices, [e.bucket for e in examples], batch_size)


@dataclass(frozen=True)
class Draw:
    """What one example looks like at one position of one epoch."""

    caption: str
    flip: bool


def draw_example(example: Example, seed: int, epoch: int, position: int) -> Draw:
    caption = render_caption(list(example.tags), example.policy,
                             example_rng(seed, epoch, position, "caption"))
    flip = example.policy.flip_aug and example_rng(seed, epoch, position, "flip").random() < 0.5
    return Draw(caption, flip)


def pixel_tensor(example: Example, flip: bool, random_crop: bool = False,
                 color_aug: bool = False, rng_seed: tuple[int, int, int] = (0, 0, 0),
                 ) -> torch.Tensor:
    """The image as a [3, h, w] tensor in [-1, 1], fitted to its bucket."""
    import numpy as np
    import torch
    from PIL import ImageEnhance, ImageOps

    image = load_image(example.path)
    rng = example_rng(*rng_seed, "crop")
    image, _ = bucketing.fit_to_bucket(image, example.bucket,
                                       "random" if random_crop else "center", rng)
    if flip:
        image = ImageOps.mirror(image)
    if color_aug:
        jitter = example_rng(*rng_seed, "color")
        image = ImageEnhance.Brightness(image).enhance(jitter.uniform(0.9, 1.1))
        image = ImageEnhance.Color(image).enhance(jitter.uniform(0.9, 1.1))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
