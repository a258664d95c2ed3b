"""The VAE latent cache: each training image is encoded once, then read back on later runs.

An entry is keyed by everything that decides its latents: the image file's content (sha256 of its
bytes, so a renamed or moved file still hits and an edited one misses), the VAE's identity (a
string from the caller, e.g. the VAE weights' sha256 plus the encode dtype), the bucket size the
image is fitted to, the crop mode and whether it is flipped, plus `CACHE_FORMAT`, bumped whenever
the pixel pipeline changes. On disk an entry is

    <cache_dir>/latents/<sha256(vae_id)[:16]>/<key>.safetensors

holding one tensor, `latents`, written atomically (temp file in the same folder, then rename), so
a killed job never leaves a half entry. An unreadable entry (truncated, corrupt, from another
format) is reported in `warnings`, encoded again and overwritten. With `cache_dir=None` the cache
lives in memory only; when the folder cannot be created or written (read-only storage, a file
where a folder should be, disk full) the cache says so once in `warnings` and keeps going in
memory for the rest of the run.

A random crop cannot be cached (every epoch would crop differently): cache only a fixed crop.

Torch and safetensors are imported inside the methods that use them, so importing this module
stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from loraforge.fsutil import save_atomic
from loraforge.hashing import digest_file

if TYPE_CHECKING:
    import torch

#: Part of every key: bump it when the image -> pixels pipeline changes, to orphan old entries.
CACHE_FORMAT = 1
#: The tensor name inside an entry file.
TENSOR_NAME = "latents"

_sha_memo: dict[tuple[str, int, int, int], str] = {}

T = TypeVar("T")


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, remembered in this process by (path, size, mtime, inode).

    A file rewritten in place with the same size within the file system's timestamp granularity
    (a few ms) would be missed, as with make or rsync; replacing a file (new inode) is always seen.
    """
    resolved = Path(path).resolve()
    stat = os.stat(resolved)
    memo_key = (str(resolved), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    known = _sha_memo.get(memo_key)
    if known is not None:
        return known
    value = digest_file(resolved)
    _sha_memo[memo_key] = value
    return value


@dataclass(frozen=True)
class LatentRequest(Generic[T]):
    """One latent that `LatentCache.fill` must provide: its key, what it is made from (bucket,
    flip, crop) and the caller's `data` for encoding it (e.g. the image path or example index)."""

    key: str
    bucket: tuple[int, int]
    flip: bool
    crop: str
    data: T


class LatentCache:
    """Latents by key, in memory and (unless `cache_dir` is None) on disk under `cache_dir`.

    Counters: `hits` and `misses` count `get` lookups (`fill` looks each distinct key up once);
    `encoded` counts latents made by `fill`'s encoder; `warnings` collects messages for the user
    (unreadable entries, an unwritable folder), each said once.
    """

    def __init__(self, cache_dir: Path | None, vae_id: str) -> None:
        if not vae_id:
            raise ValueError("vae_id must identify the VAE (e.g. its weights' sha256 + dtype)")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.vae_id = vae_id
        self.hits = 0
        self.misses = 0
        self.encoded = 0
        self.warnings: list[str] = []
        self._memory: dict[str, torch.Tensor] = {}
        self._writable = False
        self.directory: Path | None = None
        if self.cache_dir is not None:
            vae_folder = hashlib.sha256(vae_id.encode()).hexdigest()[:16]
            directory = self.cache_dir / "latents" / vae_folder
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                self._not_writable(exc)
            else:
                self.directory = directory
                self._writable = True

    # --- keys and paths -----------------------------------------------------------------

    def key(self, image_sha256: str, bucket: tuple[int, int], flip: bool,
            crop: str = "center") -> str:
        """The entry key (64 hex digits) for an image's content hash fitted to `bucket`."""
        fields = {"format": CACHE_FORMAT, "image": image_sha256, "vae": self.vae_id,
                  "bucket": [int(bucket[0]), int(bucket[1])], "crop": crop, "flip": bool(flip)}
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def request(self, image_sha256: str, bucket: tuple[int, int], flip: bool, data: T,
                crop: str = "center") -> LatentRequest[T]:
        """A `LatentRequest` for `fill`, with its key computed."""
        bucket = (int(bucket[0]), int(bucket[1]))
        return LatentRequest(self.key(image_sha256, bucket, flip, crop), bucket, bool(flip),
                             crop, data)

    def path(self, key: str) -> Path | None:
        """Where the entry lives on disk (None when there is no disk cache)."""
        return self.directory / f"{key}.safetensors" if self.directory is not None else None

    @property
    def memory_only(self) -> bool:
        """True when new entries are not written to disk (no cache_dir, or it is unwritable)."""
        return not self._writable

    # --- one entry ----------------------------------------------------------------------

    def get(self, key: str) -> torch.Tensor | None:
        """The cached latents for `key` (CPU tensor), or None. A corrupt entry gives None and
        a warning; it is overwritten by the next `put` of that key."""
        tensor = self._memory.get(key)
        if tensor is None:
            tensor = self._read(key)
        if tensor is None:
            self.misses += 1
            return None
        self.hits += 1
        self._memory[key] = tensor
        return tensor

    def _read(self, key: str) -> torch.Tensor | None:
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                if meta.get("key") != key or meta.get("vae_id") != self.vae_id:
                    raise ValueError("it belongs to another key or VAE")
                return fh.get_tensor(TENSOR_NAME)
        except Exception as exc:  # any unreadable entry is disposable: encode it again
            self.warnings.append(f"latent cache entry {path} is unreadable ({exc}); "
                                 "encoding that image again")
            return None

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Store latents for `key`: in memory, and on disk (atomically) when the folder is
        writable. A failed write switches the cache to memory-only, with one warning."""
        tensor = tensor.detach().to("cpu").contiguous()
        self._memory[key] = tensor
        path = self.path(key)
        if path is None or not self._writable:
            return
        from safetensors.torch import save_file

        metadata = {"format": "loraforge.latent_cache", "version": str(CACHE_FORMAT),
                    "key": key, "vae_id": self.vae_id}
        try:
            save_atomic(path, lambda tmp: save_file({TENSOR_NAME: tensor}, str(tmp), metadata))
        except OSError as exc:
            self._not_writable(exc)

    def _not_writable(self, exc: OSError) -> None:
        self._writable = False
        reason = exc.strerror or str(exc)
        self.warnings.append(f"cache folder {self.cache_dir} is not writable: training without "
                             f"a disk cache ({reason})")

    # --- many entries -------------------------------------------------------------------

    def fill(self, requests: Iterable[LatentRequest[T]],
             encode_batch: Callable[[list[LatentRequest[T]]],
                                    torch.Tensor | Sequence[torch.Tensor]],
             batch_size: int) -> dict[str, torch.Tensor]:
        """Latents for every request: `{key: tensor}`.

        Each distinct key is looked up once; only the misses are encoded, by
        `encode_batch(requests)`, which gets at most `batch_size` requests that all share one
        bucket (so their pixels stack into one tensor) and returns a tensor whose first dimension
        runs over them, or a sequence of one tensor each. Misses are encoded bucket by bucket in
        sorted order, in the order given within a bucket, and each result is `put` as soon as its
        batch is done (a job killed mid-way keeps what it had encoded).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        found: dict[str, torch.Tensor] = {}
        missing: dict[tuple[int, int], list[LatentRequest[T]]] = {}
        seen: set[str] = set()
        for req in requests:
            if req.key in seen:
                continue
            seen.add(req.key)
            tensor = self.get(req.key)
            if tensor is None:
                missing.setdefault(req.bucket, []).append(req)
            else:
                found[req.key] = tensor
        for bucket in sorted(missing):
            todo = missing[bucket]
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                outputs = encode_batch(batch)
                if len(outputs) != len(batch):
                    raise ValueError(f"encode_batch returned {len(outputs)} latents for "
                                     f"{len(batch)} images")
                for req, latents in zip(batch, outputs, strict=True):
                    self.put(req.key, latents)
                    found[req.key] = self._memory[req.key]
                self.encoded += len(batch)
        return found
