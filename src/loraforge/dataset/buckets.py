"""Aspect-ratio bucketing: train each image near its own shape instead of a centre-cropped square.

The scheme LoRA users know from kohya's scripts:

- `make_buckets` lists the bucket sizes: sides that are multiples of `step` within
  [`min_side`, `max_side`], area at most `resolution`², and for each width the tallest height that
  fits (and for each height the widest width), plus the square.
- `assign_bucket` gives an image the bucket whose aspect ratio is nearest its own (compared as
  log ratios, so 2:1 and 1:2 are equally far from 1:1).
- `fit_to_bucket` resizes the image to cover its bucket (Lanczos) and crops it to exactly the
  bucket, centred or at a random offset.
- `bucket_batches` cuts an epoch into batches that never mix buckets (a batch is one tensor).
- `bucket_info` is kohya's `ss_bucket_info` metadata.

Sizes are `(width, height)` tuples everywhere, as Pillow has them. Nothing here touches the
global random generator: every draw comes from a generator the caller passes or one derived from
(seed, epoch).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from PIL import Image

Bucket = tuple[int, int]
CropMode = Literal["center", "random"]
#: An item's bucket: a function of the item, or a table indexed by it (list or dict).
BucketOf = Callable[[int], Bucket] | Sequence[Bucket] | Mapping[int, Bucket]


# --- the bucket list --------------------------------------------------------------------------

def make_buckets(resolution: int, step: int = 64, min_side: int = 256,
                 max_side: int = 1024) -> list[Bucket]:
    """Every bucket `(w, h)` for training at `resolution` (sorted by width, then height).

    Sides are multiples of `step` within [`min_side`, `max_side`] (bounds that are not multiples
    are rounded inwards) and the area is at most `resolution`². For each width the largest height
    that fits is taken, and for each height the largest width, so every aspect ratio gets the
    largest bucket it can have; if two buckets still share an exact aspect ratio, only the larger
    is kept. The square `(s, s)`, `s` = `resolution` rounded down to a multiple of `step` and
    clamped into the side range, is always present (even when clamping makes it exceed the area).
    """
    if resolution <= 0 or step <= 0:
        raise ValueError(f"resolution ({resolution}) and step ({step}) must be positive")
    low = max(step, math.ceil(min_side / step) * step)
    high = (max_side // step) * step
    if low > high:
        raise ValueError(f"no multiple of {step} lies between min_side {min_side} and "
                         f"max_side {max_side}")
    max_area = resolution * resolution

    found: set[Bucket] = set()
    for side in range(low, high + 1, step):
        other = min(high, (max_area // side) // step * step)
        if other >= low:
            found.add((side, other))
            found.add((other, side))

    square = min(high, max(low, (resolution // step) * step))
    found.add((square, square))

    by_ratio: dict[tuple[int, int], Bucket] = {}
    for width, height in found:
        divisor = math.gcd(width, height)
        ratio = (width // divisor, height // divisor)
        kept = by_ratio.get(ratio)
        if kept is None or width * height > kept[0] * kept[1]:
            by_ratio[ratio] = (width, height)
    return sorted(by_ratio.values())


# --- one image's bucket -------------------------------------------------------------------

def _log_ratio(width: float, height: float) -> float:
    return math.log(width / height)


def assign_bucket(width: int, height: int, buckets: Sequence[Bucket], no_upscale: bool = False,
                  step: int = 64) -> Bucket:
    """The bucket for a `width` x `height` image: the one nearest in log aspect ratio.

    Ties (an image exactly between two aspect ratios) go to the first bucket in `buckets` order.

    `no_upscale` (kohya's option of that name): when the chosen bucket is larger than the image in
    either side, so covering it would upscale the image, the image gets a bucket of its own size
    instead, each side rounded down to a multiple of `step` (at least `step`, so an image under
    `step` pixels is still upscaled to one step). `fit_to_bucket` then scales the image down to
    cover that bucket (by less than one `step` on the tighter side) and crops the rest, so it is
    never upscaled (kohya crops the remainder without rescaling; the pixels lost differ by under
    one step). Such a bucket may be smaller than `min_side` and need not be in `buckets`.
    Images at least as large as their bucket keep it (they are downscaled as usual).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not buckets:
        raise ValueError("no buckets to choose from")
    target = _log_ratio(width, height)
    best = min(buckets, key=lambda b: abs(_log_ratio(*b) - target))
    if no_upscale and (best[0] > width or best[1] > height):
        return (max(step, width // step * step), max(step, height // step * step))
    return best


def aspect_error(width: int, height: int, bucket: Bucket) -> float:
    """|bucket aspect − image aspect| as plain width/height ratios: kohya's `img_ar_error`."""
    return abs(bucket[0] / bucket[1] - width / height)


def fit_to_bucket(image: Image.Image, bucket: Bucket, crop: CropMode = "center",
                  rng: random.Random | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Resize `image` to cover `bucket` and crop it to exactly the bucket's size.

    The scale is the larger of bucket/image per side (so the side whose aspect is tighter matches
    the bucket exactly and the other overhangs), Lanczos filter; no resize when the image already
    has the covering size. The overhang is cut centred (`crop="center"`, the odd pixel goes to the
    right/bottom) or at a uniform random offset drawn from `rng` (`crop="random"`, `rng`
    required). Returns the image and the crop's `(left, top)` in the resized image (SDXL's
    crop coordinates). The image's mode is kept.
    """
    from PIL import Image

    bucket_w, bucket_h = bucket
    if bucket_w <= 0 or bucket_h <= 0:
        raise ValueError(f"bucket size must be positive, got {bucket_w}x{bucket_h}")
    scale = max(bucket_w / image.width, bucket_h / image.height)
    size = (max(bucket_w, round(image.width * scale)), max(bucket_h, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    spare_w, spare_h = image.width - bucket_w, image.height - bucket_h
    if crop == "center":
        left, top = spare_w // 2, spare_h // 2
    elif crop == "random":
        if rng is None:
            raise ValueError("crop='random' needs an rng (random.Random)")
        left, top = rng.randint(0, spare_w), rng.randint(0, spare_h)
    else:
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    if (left, top) != (0, 0) or image.size != bucket:
        image = image.crop((left, top, left + bucket_w, top + bucket_h))
    return image, (left, top)


# --- batches --------------------------------------------------------------------------------

def _epoch_rng(seed: int, epoch: int) -> random.Random:
    digest = hashlib.sha256(f"loraforge.bucket_batches:{seed}:{epoch}".encode()).digest()
    return random.Random(int.from_bytes(digest, "big"))


def _bucket_lookup(bucket_of: BucketOf) -> Callable[[int], Bucket]:
    if callable(bucket_of):
        return bucket_of
    table = bucket_of
    return lambda item: tuple(table[item])  # type: ignore[return-value]


def _group(items: Iterable[int], bucket_of: BucketOf) -> dict[Bucket, list[int]]:
    lookup = _bucket_lookup(bucket_of)
    groups: dict[Bucket, list[int]] = {}
    for item in items:
        groups.setdefault(lookup(item), []).append(item)
    return groups


def bucket_batches(items: Sequence[int], bucket_of: BucketOf, batch_size: int, seed: int,
                   epoch: int) -> list[list[int]]:
    """One epoch's batches: items shuffled within their bucket, cut into `batch_size` pieces
    (each bucket's last batch may be smaller), then the batches shuffled.

    `items` are the epoch's entries, already expanded by repeats (an example index appears once
    per repeat). `bucket_of` gives an item's bucket: a function of the item, or a sequence indexed
    by the item (`buckets[example_index]`: a list parallel to the examples, not to `items`; a
    dict works too).
    The batches hold item values, so together they are exactly the multiset `items`. A batch
    never mixes buckets. The order depends only on (seed, epoch) and the input, through a
    generator of its own (sha256-derived; the global `random` state is untouched), so a resumed
    run rebuilds the same batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rng = _epoch_rng(seed, epoch)
    batches: list[list[int]] = []
    groups = _group(items, bucket_of)
    for bucket in sorted(groups):
        members = groups[bucket]
        rng.shuffle(members)
        batches += [members[i:i + batch_size] for i in range(0, len(members), batch_size)]
    rng.shuffle(batches)
    return batches


def num_bucket_batches(items: Sequence[int], bucket_of: BucketOf, batch_size: int) -> int:
    """How many batches `bucket_batches` makes per epoch (the same for every epoch)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return sum(math.ceil(len(members) / batch_size)
               for members in _group(items, bucket_of).values())


def bucket_counts(items: Iterable[int], bucket_of: BucketOf) -> Counter[Bucket]:
    """Entries per bucket (count the repeat-expanded items to match kohya's counts)."""
    return Counter({bucket: len(members) for bucket, members in _group(items, bucket_of).items()})


def bucket_info(counts: Mapping[Bucket, int], ar_errors: Iterable[float] = ()) -> dict:
    """kohya's `ss_bucket_info` (json.dumps it for the metadata):
    `{"buckets": {"0": {"resolution": [w, h], "count": n}, ...}, "mean_img_ar_error": e}`.

    Buckets are numbered in sorted (w, h) order; buckets with a zero count are left out. kohya
    counts entries with repeats (see `bucket_counts`) and averages `aspect_error` over the
    distinct images: pass those errors as `ar_errors` (none: 0.0).
    """
    used = sorted(bucket for bucket, count in counts.items() if count > 0)
    errors = [abs(float(e)) for e in ar_errors]
    return {
        "buckets": {str(i): {"resolution": [bucket[0], bucket[1]], "count": int(counts[bucket])}
                    for i, bucket in enumerate(used)},
        "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0,
    }
