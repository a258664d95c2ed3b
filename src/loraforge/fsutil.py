"""Atomic file writes: a killed job never leaves a half file that a later step would pick up."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

DEFAULT_FILE_MODE = 0o644


@contextlib.contextmanager
def atomic_path(dest: Path, mode: int = DEFAULT_FILE_MODE) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success fsync, chmod and rename it onto `dest`.

    On any error the temporary file is removed and `dest` is left exactly as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    try:  # made inside the try, so that a signal right after it still removes it
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        tmp = Path(tmp_name)
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def write_atomic(dest: Path, data: bytes | str, mode: int = DEFAULT_FILE_MODE) -> None:
    """Write `data` to `dest` atomically (temp file in the same folder, then rename)."""
    with atomic_path(dest, mode) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def save_atomic(dest: Path, writer: Callable[[Path], None], mode: int = DEFAULT_FILE_MODE) -> None:
    """Call `writer(tmp_path)` and move the result onto `dest` atomically."""
    with atomic_path(dest, mode) as tmp:
        writer(tmp)
