"""The VAE latent cache, with real image files, real tensors and a stand-in encoder (8x8
average pooling, which like the VAE turns a bucket-sized image into a /8 grid)."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loraforge.dataset.buckets import assign_bucket, fit_to_bucket, make_buckets
from loraforge.train.latent_cache import LatentCache, LatentRequest, file_sha256

BUCKETS = make_buckets(128, step=32, min_side=64, max_side=256)
SIZES = {"square": (128, 128), "wide": (200, 100), "tall": (90, 180), "square2": (150, 150)}


class Encoder:
    """Counts calls and images; checks every batch shares one bucket and fits batch_size."""

    def __init__(self, batch_size: int = 2) -> None:
        self.batch_size = batch_size
        self.calls = 0
        self.images = 0
        self.keys: list[str] = []

    def __call__(self, batch: list[LatentRequest[Path]]) -> torch.Tensor:
        assert 1 <= len(batch) <= self.batch_size
        assert len({req.bucket for req in batch}) == 1
        self.calls += 1
        self.images += len(batch)
        self.keys += [req.key for req in batch]
        pixels = []
        for req in batch:
            with Image.open(req.data) as image:
                fitted, _ = fit_to_bucket(image.convert("RGB"), req.bucket, "center")
            array = torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 127.5 - 1.0)
            tensor = array.permute(2, 0, 1)
            pixels.append(tensor.flip(-1) if req.flip else tensor)
        return torch.nn.functional.avg_pool2d(torch.stack(pixels), 8)


def _write_image(path: Path, size: tuple[int, int], seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    tmp = path.with_suffix(".new.png")
    Image.fromarray(pixels).save(tmp)
    os.replace(tmp, path)  # a new file, as an editor or a copy would make


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "images"
    folder.mkdir()
    paths = {}
    for seed, (name, size) in enumerate(SIZES.items()):
        paths[name] = folder / f"{name}.png"
        _write_image(paths[name], size, seed)
    return paths


def _requests(cache: LatentCache, images: dict[str, Path], flips: tuple[bool, ...] = (False,),
              ) -> list[LatentRequest[Path]]:
    requests = []
    for name, path in images.items():
        bucket = assign_bucket(*SIZES[name], BUCKETS)
        for flip in flips:
            requests.append(cache.request(file_sha256(path), bucket, flip, path))
    return requests


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_second_fill_encodes_nothing(tmp_path: Path, images: dict[str, Path]) -> None:
    cache_dir = tmp_path / "cache"
    first, encoder = LatentCache(cache_dir, "vae-a"), Encoder()
    latents = first.fill(_requests(first, images), encoder, batch_size=2)
    assert encoder.images == 4 and first.misses == 4 and first.hits == 0
    assert len(latents) == 4 and not first.warnings and not first.memory_only
    request = _requests(first, images)[1]  # "wide": 200x100 -> a 2:1 bucket
    assert latents[request.key].shape == (3, request.bucket[1] // 8, request.bucket[0] // 8)
    files = _entries(cache_dir)
    assert len(files) == 4 and all(f.suffix == ".safetensors" for f in files)  # no temp files
    assert all(f.parent.parent == cache_dir / "latents" for f in files)

    # a new process (a fresh cache object) reads everything back from disk
    second, encoder2 = LatentCache(cache_dir, "vae-a"), Encoder()
    again = second.fill(_requests(second, images), encoder2, batch_size=2)
    assert encoder2.calls == 0 and second.hits == 4 and second.misses == 0
    assert again.keys() == latents.keys()
    assert all(torch.equal(again[k], latents[k]) for k in latents)
    # and the same object a third time answers from memory
    assert second.fill(_requests(second, images), encoder2, batch_size=2).keys() == latents.keys()
    assert encoder2.calls == 0


def test_changed_image_reencodes_only_that_one(tmp_path: Path, images: dict[str, Path]) -> None:
    cache_dir = tmp_path / "cache"
    cache = LatentCache(cache_dir, "vae-a")
    before = cache.fill(_requests(cache, images), Encoder(), batch_size=4)
    _write_image(images["tall"], SIZES["tall"], seed=99)
    cache, encoder = LatentCache(cache_dir, "vae-a"), Encoder(batch_size=4)
    requests = _requests(cache, images)
    after = cache.fill(requests, encoder, batch_size=4)
    tall = requests[2]
    assert encoder.images == 1 and encoder.keys == [tall.key]
    assert tall.key not in before and tall.key in after
    assert cache.hits == 3 and cache.misses == 1


def test_flip_crop_bucket_and_vae_make_separate_entries(tmp_path: Path,
                                                        images: dict[str, Path]) -> None:
    cache_dir = tmp_path / "cache"
    cache, encoder = LatentCache(cache_dir, "vae-a"), Encoder()
    requests = _requests(cache, {"wide": images["wide"]}, flips=(False, True))
    latents = cache.fill(requests, encoder, batch_size=2)
    plain, flipped = (latents[r.key] for r in requests)
    assert encoder.images == 2 and len(_entries(cache_dir)) == 2
    assert torch.allclose(plain.flip(-1), flipped, atol=1e-6)
    assert not torch.allclose(plain, flipped, atol=1e-6)

    sha = file_sha256(images["wide"])
    keys = {cache.key(sha, (128, 64), False), cache.key(sha, (128, 64), True),
            cache.key(sha, (128, 64), False, crop="random"), cache.key(sha, (96, 64), False),
            LatentCache(None, "vae-b").key(sha, (128, 64), False)}
    assert len(keys) == 5
    other_vae = LatentCache(cache_dir, "vae-b")
    assert other_vae.directory != cache.directory
    assert other_vae.get(requests[0].key) is None  # another VAE never reads these entries


def test_corrupt_entry_is_reencoded_with_a_warning(tmp_path: Path,
                                                   images: dict[str, Path]) -> None:
    cache_dir = tmp_path / "cache"
    cache = LatentCache(cache_dir, "vae-a")
    requests = _requests(cache, images)
    good = cache.fill(requests, Encoder(), batch_size=2)
    truncated = cache.path(requests[0].key)
    assert truncated is not None
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    swapped = cache.path(requests[1].key)  # a valid file under the wrong name
    assert swapped is not None
    swapped.write_bytes(cache.path(requests[2].key).read_bytes())  # type: ignore[union-attr]

    cache, encoder = LatentCache(cache_dir, "vae-a"), Encoder()
    latents = cache.fill(requests, encoder, batch_size=2)
    assert sorted(encoder.keys) == sorted([requests[0].key, requests[1].key])
    assert len(cache.warnings) == 2
    assert all("unreadable" in w for w in cache.warnings)
    assert str(truncated) in cache.warnings[0] or str(truncated) in cache.warnings[1]
    assert all(torch.equal(latents[k], good[k]) for k in good)

    # the entries were overwritten: a third run reads them cleanly
    cache, encoder = LatentCache(cache_dir, "vae-a"), Encoder()
    cache.fill(requests, encoder, batch_size=2)
    assert encoder.calls == 0 and not cache.warnings and cache.hits == 4


def test_unwritable_cache_folder_falls_back_to_memory(tmp_path: Path,
                                                      images: dict[str, Path]) -> None:
    # tests run as root, where permissions do not stop writes: a file where a folder must be does
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    cache, encoder = LatentCache(blocker, "vae-a"), Encoder()
    assert cache.memory_only and cache.directory is None
    assert cache.warnings == [f"cache folder {blocker} is not writable: training without a disk "
                              f"cache ({os.strerror(errno.ENOTDIR)})"]
    latents = cache.fill(_requests(cache, images), encoder, batch_size=2)
    assert len(latents) == 4 and encoder.images == 4
    cache.fill(_requests(cache, images), encoder, batch_size=2)
    assert encoder.images == 4  # remembered in memory
    assert len(cache.warnings) == 1 and blocker.read_text() == "not a folder"


def test_write_failure_mid_run_warns_once(tmp_path: Path, images: dict[str, Path]) -> None:
    cache = LatentCache(tmp_path / "cache", "vae-a")
    assert cache.directory is not None and not cache.memory_only
    cache.directory.rmdir()
    cache.directory.write_text("")  # the folder vanished and a file took its place
    encoder = Encoder()
    latents = cache.fill(_requests(cache, images), encoder, batch_size=1)
    assert len(latents) == 4 and encoder.calls == 4
    assert cache.memory_only and len(cache.warnings) == 1
    assert "is not writable: training without a disk cache" in cache.warnings[0]


def test_failed_write_leaves_no_temp_file(tmp_path: Path, images: dict[str, Path],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    def disk_full(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    cache_dir = tmp_path / "cache"
    cache = LatentCache(cache_dir, "vae-a")
    latents = cache.fill(_requests(cache, images), Encoder(), batch_size=2)
    assert len(latents) == 4
    assert _entries(cache_dir) == []  # neither a temp file nor a half entry
    assert cache.memory_only and len(cache.warnings) == 1
    assert os.strerror(errno.ENOSPC) in cache.warnings[0]


def test_memory_only_cache(images: dict[str, Path]) -> None:
    cache, encoder = LatentCache(None, "vae-a"), Encoder(batch_size=3)
    requests = _requests(cache, images, flips=(False, True))
    cache.fill(requests + requests, encoder, batch_size=3)  # duplicates are encoded once
    cache.fill(requests, encoder, batch_size=3)
    assert encoder.images == 8 and cache.memory_only and not cache.warnings
    assert cache.path(requests[0].key) is None
    assert cache.hits == 8 and cache.misses == 8


def test_encoder_must_return_one_latent_per_image(images: dict[str, Path]) -> None:
    cache = LatentCache(None, "vae-a")
    with pytest.raises(ValueError, match="returned 1 latents for 2 images"):
        cache.fill(_requests(cache, {k: images[k] for k in ("square", "square2")}),
                   lambda batch: torch.zeros(1, 4, 2, 2), batch_size=2)
    with pytest.raises(ValueError):
        cache.fill([], Encoder(), batch_size=0)
    with pytest.raises(ValueError):
        LatentCache(None, "")


def test_file_sha256(images: dict[str, Path]) -> None:
    path = images["square"]
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path) == file_sha256(path.parent / ".." / path.parent.name / path.name)
    _write_image(path, SIZES["square"], seed=1234)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
