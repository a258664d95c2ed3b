"""Aspect-ratio buckets: the bucket list, assignment, fitting, batching and kohya's metadata."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from loraforge.dataset.buckets import (
    aspect_error,
    assign_bucket,
    bucket_batches,
    bucket_counts,
    bucket_info,
    fit_to_bucket,
    make_buckets,
    num_bucket_batches,
)

# Derived by hand for resolution 512, step 64, sides 256..1024, area <= 262144: for each width w
# the height is floor(262144 / w / 64) * 64 capped at 1024 (and the transposes).
BUCKETS_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640),
    (448, 576), (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256),
    (896, 256), (960, 256), (1024, 256),
]


def test_bucket_list_at_512() -> None:
    buckets = make_buckets(512)
    assert buckets == BUCKETS_512
    assert buckets == sorted(buckets)
    assert (512, 512) in buckets
    for width, height in buckets:
        assert width * height <= 512 * 512
        assert width % 64 == 0 and height % 64 == 0
        assert 256 <= width <= 1024 and 256 <= height <= 1024
    assert {(h, w) for w, h in buckets} == set(buckets)  # symmetric


@pytest.mark.parametrize("resolution", [384, 512, 640, 768, 1024])
def test_bucket_list_rules(resolution: int) -> None:
    buckets = make_buckets(resolution)
    assert (resolution, resolution) in buckets
    ratios = [w / h for w, h in buckets]
    assert len(set(ratios)) == len(ratios)  # one bucket per aspect ratio
    for width, height in buckets:
        assert width * height <= resolution**2
        assert width % 64 == 0 and height % 64 == 0
        assert min(width, height) >= 256 and max(width, height) <= 1024
        # the tallest for its width or the widest for its height: one more step breaks the area
        # or the side range
        tallest = height == 1024 or width * (height + 64) > resolution**2
        widest = width == 1024 or (width + 64) * height > resolution**2
        assert tallest or widest


def test_square_clamped_into_range() -> None:
    assert make_buckets(200) == [(256, 256)]
    assert (1024, 1024) in make_buckets(1100)
    assert (448, 448) in make_buckets(500)  # rounded down to a step multiple
    with pytest.raises(ValueError):
        make_buckets(512, min_side=1024, max_side=512)


@pytest.mark.parametrize(("size", "bucket"), [
    ((512, 512), (512, 512)),
    ((768, 512), (640, 384)),    # 1.5: log-distance 0.105 to 5:3, 0.154 to 9:7
    ((512, 768), (384, 640)),
    ((1024, 256), (1024, 256)),  # exact 4:1
    ((300, 900), (256, 832)),    # 1:3 is nearest 4:13 (0.080) not 5:12 (0.223)
    ((2000, 1000), (704, 320)),  # 2:1 is nearest 11:5 (0.095) not 5:3 (0.182)
])
def test_assign_bucket(size: tuple[int, int], bucket: tuple[int, int]) -> None:
    assert assign_bucket(*size, BUCKETS_512) == bucket


def test_no_upscale_keeps_small_images_small() -> None:
    # 500x500 would be upscaled into 512x512: it gets its own size rounded down to 64s
    assert assign_bucket(500, 500, BUCKETS_512, no_upscale=True) == (448, 448)
    assert assign_bucket(500, 500, BUCKETS_512) == (512, 512)
    # 200x300: nearest is 384x640, larger than the image
    assert assign_bucket(200, 300, BUCKETS_512, no_upscale=True) == (192, 256)
    # an image under one step still gets a (one-step) bucket
    assert assign_bucket(100, 40, BUCKETS_512, no_upscale=True) == (64, 64)
    # large images keep their normal bucket
    for size in [(2000, 1000), (300, 900), (1024, 1024), (768, 512)]:
        assert assign_bucket(*size, BUCKETS_512, no_upscale=True) == assign_bucket(
            *size, BUCKETS_512)
    # and no image is ever upscaled when fitted
    for width, height in [(500, 500), (200, 300), (333, 777), (1000, 300), (65, 130)]:
        bucket = assign_bucket(width, height, BUCKETS_512, no_upscale=True)
        assert bucket[0] <= width and bucket[1] <= height
        fitted, _ = fit_to_bucket(Image.new("RGB", (width, height)), bucket)
        assert fitted.size == bucket


def _bands(width: int, height: int) -> Image.Image:
    """Three equal horizontal bands: red, green, blue."""
    image = Image.new("RGB", (width, height))
    third = height // 3
    image.paste((255, 0, 0), (0, 0, width, third))
    image.paste((0, 255, 0), (0, third, width, 2 * third))
    image.paste((0, 0, 255), (0, 2 * third, width, height))
    return image


def test_fit_to_bucket_center() -> None:
    image = _bands(100, 300)
    fitted, (left, top) = fit_to_bucket(image, (64, 64))
    assert fitted.size == (64, 64)
    # scale 0.64 -> 64x192; the centred 64 rows are exactly the green band
    assert (left, top) == (0, 64)
    mean = np.asarray(fitted, dtype=np.float64).mean(axis=(0, 1))
    assert mean[1] > 220 and mean[0] < 25 and mean[2] < 25
    assert abs(mean[0] - mean[2]) < 2  # as much red above as blue below: centred

    fitted, offset = fit_to_bucket(Image.new("RGB", (768, 512)), (640, 384))
    assert fitted.size == (640, 384)
    assert offset == (0, (427 - 384) // 2)


def test_fit_to_bucket_random_and_exact() -> None:
    image = Image.new("RGB", (900, 300))
    offsets = set()
    for seed in range(20):
        fitted, offset = fit_to_bucket(image, (256, 256), "random", random.Random(seed))
        assert fitted.size == (256, 256)
        assert 0 <= offset[0] <= 768 - 256 and offset[1] == 0
        assert offset == fit_to_bucket(image, (256, 256), "random", random.Random(seed))[1]
        offsets.add(offset)
    assert len(offsets) > 10
    same = Image.new("RGB", (512, 512))
    assert fit_to_bucket(same, (512, 512)) == (same, (0, 0))
    with pytest.raises(ValueError, match="rng"):
        fit_to_bucket(image, (256, 256), "random")
    with pytest.raises(ValueError, match="crop"):
        fit_to_bucket(image, (256, 256), "middle")  # type: ignore[arg-type]


def _dataset() -> tuple[list[int], list[tuple[int, int]]]:
    """11 examples of mixed shapes, repeats 3 or 2: (items, bucket per example)."""
    sizes = [(512, 512), (768, 512), (512, 768), (1024, 256), (300, 900), (2000, 1000),
             (600, 600), (640, 480), (900, 600), (500, 500), (1200, 800)]
    buckets = [assign_bucket(w, h, BUCKETS_512) for w, h in sizes]
    items = [i for i in range(len(sizes)) for _ in range(3 if i % 2 else 2)]
    return items, buckets


def test_bucket_batches_never_mix_and_cover_everything() -> None:
    items, buckets = _dataset()
    for batch_size in (1, 2, 3, 4, 64):
        batches = bucket_batches(items, buckets, batch_size, seed=42, epoch=0)
        assert all(len({buckets[i] for i in batch}) == 1 for batch in batches)
        assert all(1 <= len(batch) <= batch_size for batch in batches)
        assert Counter(i for batch in batches for i in batch) == Counter(items)
        partial = Counter(buckets[b[0]] for b in batches if len(b) < batch_size)
        assert all(n == 1 for n in partial.values())  # at most one short batch per bucket
        assert len(batches) == num_bucket_batches(items, buckets, batch_size)
    # a function works as well as a table
    assert bucket_batches(items, buckets.__getitem__, 2, 1, 3) == bucket_batches(
        items, buckets, 2, 1, 3)


def test_bucket_batches_deterministic_per_seed_and_epoch() -> None:
    items, buckets = _dataset()
    state = random.getstate()
    first = bucket_batches(items, buckets, 2, seed=42, epoch=0)
    assert random.getstate() == state  # the global generator is untouched
    assert bucket_batches(list(items), list(buckets), 2, seed=42, epoch=0) == first
    assert bucket_batches(items, buckets, 2, seed=42, epoch=1) != first
    assert bucket_batches(items, buckets, 2, seed=43, epoch=0) != first
    with pytest.raises(ValueError):
        bucket_batches(items, buckets, 0, 42, 0)


def test_bucket_info_shape() -> None:
    items, buckets = _dataset()
    counts = bucket_counts(items, buckets)
    assert sum(counts.values()) == len(items)
    sizes = [(512, 512), (768, 512)]
    errors = [aspect_error(w, h, assign_bucket(w, h, BUCKETS_512)) for w, h in sizes]
    info = bucket_info(counts, errors)
    assert json.loads(json.dumps(info)) == info
    assert list(info["buckets"]) == [str(i) for i in range(len(counts))]
    resolutions = [tuple(entry["resolution"]) for entry in info["buckets"].values()]
    assert resolutions == sorted(counts)
    assert [e["count"] for e in info["buckets"].values()] == [counts[r] for r in resolutions]
    assert info["mean_img_ar_error"] == pytest.approx((0 + abs(640 / 384 - 1.5)) / 2)
    assert bucket_info({(512, 512): 3, (640, 384): 0}) == {
        "buckets": {"0": {"resolution": [512, 512], "count": 3}}, "mean_img_ar_error": 0.0}
