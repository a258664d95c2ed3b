"""Atomic file writes: a killed job never leaves a half file that a later step would pick up."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from loraforge.errors import ForgeError

DEFAULT_FILE_MODE = 0o644
#: The errors of a full disk and of a full quota.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or an error it came from) says the disk or the quota is full. Libraries
    that write in Rust (safetensors, tokenizers) raise their own errors, which only quote it."""
    texts = tuple(os.strerror(number) for number in DISK_FULL)
    seen: BaseException | None = exc
    for _ in range(8):  # the chain of causes, not forever
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in DISK_FULL:
            return True
        if any(text in str(seen) for text in texts):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def named(exc: OSError, path: Path) -> OSError:
    """`exc` naming `path` when it names no file (a failed write() or close() names none)."""
    if exc.filename is not None:
        return exc
    return OSError(exc.errno, exc.strerror, str(path)) if exc.errno else exc


def full_disk_error(exc: BaseException, path: Path | str | None, kept: str,
                    what: str = "could not be written") -> ForgeError:
    """A full disk or quota as users see it: the file (or folder) being written, that the disk
    or quota is full, to free space and rerun, and `kept`: what stays as it was meanwhile."""
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else None
    why = why or next((os.strerror(n) for n in sorted(DISK_FULL) if os.strerror(n) in str(exc)),
                      os.strerror(errno.ENOSPC))
    return ForgeError(f"{what}: {why} (the disk, or your quota on it, is full)",
                      path=path, fix=f"free space there (or raise the quota), then run the "
                                     f"same command again; {kept}")


def umask_for(file_mode: int) -> int:
    """The umask matching storage.file_mode: withhold the same bits, always keep the owner's
    (0644 -> 0022: group can read, only you write; 0664 -> 0002 for a group-writable share)."""
    return (~file_mode) & 0o066


@contextlib.contextmanager
def storage_umask(file_mode: int) -> Iterator[None]:
    """Files and folders made meanwhile by code that takes no mode (a download cache, its lock
    files, pip) get storage.file_mode's permissions, as a SLURM job's do (`umask` in its script):
    with `0664` the next member of the group can update them."""
    previous = os.umask(umask_for(file_mode))
    try:
        yield
    finally:
        os.umask(previous)


def write_refused(folder: Path) -> OSError | None:
    """Why no file can be made and removed in `folder`, tried with a hidden, empty one (its
    mode says nothing of `chattr +i`, a read-only mount, or root, whom it does not stop); None
    when one can."""
    try:
        fd, name = tempfile.mkstemp(prefix=".loraforge-probe-", dir=folder)
    except OSError as exc:
        return exc
    os.close(fd)
    try:
        os.unlink(name)
    except OSError as exc:
        return exc
    return None


class LockHeld(Exception):
    """`held_lock(..., wait=False)`: another process holds the lock."""


@contextlib.contextmanager
def held_lock(path: Path, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock (flock) on `path`, a lock file (made if missing) or a folder (it
    leaves no file behind), waiting for it (`wait=False`: LockHeld instead); yield whether it
    could be taken: False where the lock file cannot be opened (another user's, on a shared
    root) or the file system has no flock (some network file systems). Code that must not go
    on unlocked says so itself."""
    try:
        import fcntl

        descriptor = os.open(path, os.O_RDONLY) if path.is_dir() else \
            os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
    except (ImportError, OSError):
        yield False
        return
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise LockHeld(str(path)) from None
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_path(dest: Path, mode: int = DEFAULT_FILE_MODE) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success fsync, chmod and rename it onto `dest`.

    On any error the temporary file is removed and `dest` is left exactly as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # `.NAME.XXXXXXXX.tmp`, NAME cut where the whole would pass a file system's 255 bytes
    prefix = f".{os.fsdecode(os.fsencode(dest.name)[:241])}."
    tmp: Path | None = None
    try:  # made inside the try, so that a signal right after it still removes it
        fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=dest.parent)
        tmp = Path(tmp_name)
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except OSError as exc:  # a full disk names the file being written, not its hidden copy
        if exc.errno in DISK_FULL and (exc.filename is None or Path(
                str(exc.filename)).name.startswith(prefix)):
            raise OSError(exc.errno, exc.strerror, str(dest)) from exc
        raise
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
