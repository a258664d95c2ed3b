"""Model hashes as A1111 shows them, cached so a 4 GB file is hashed once."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from loraforge.fsutil import write_atomic

CHUNK = 1 << 20


def legacy_hash(path: Path) -> str:
    """A1111's old short model hash: sha256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]


def digest_file(path: Path, offset: int = 0) -> str:
    """sha256 of a file's bytes from `offset` on, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(offset)
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path, cache_dir: Path | None = None) -> str:
    """Full sha256 of a file; remembered in `cache_dir/hashes.json` by path, size and mtime."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = cache_dir / "hashes.json" if cache_dir is not None else None
    known: dict[str, str] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            known = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            known = {}
    if key in known:
        return known[key]
    value = digest_file(path)
    if cache_file is not None:
        known[key] = value
        with contextlib.suppress(OSError):
            write_atomic(cache_file, json.dumps(known, indent=1))
    return value


def short_hash(sha256: str) -> str:
    """The 10-digit form A1111 shows next to a model name."""
    return sha256[:10]


def env_time() -> float | None:
    """SOURCE_DATE_EPOCH, the reproducible-builds convention: a fixed time for file contents."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    return float(value) if value and value.isdigit() else None
