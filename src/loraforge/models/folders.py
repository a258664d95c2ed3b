"""Model folders are installed atomically: built in a hidden folder beside the destination, then
renamed into place. A killed fetch or import leaves a `.NAME.*.partial` folder that is never taken
for a model (the next run of the same name removes it) and never a half-written model folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from loraforge.errors import ForgeError

PARTIAL_SUFFIX = ".partial"
OLD_SUFFIX = ".old"
LOCK_SUFFIX = ".lock"
STALE_SECONDS = 6 * 3600
FILE_MODE = 0o644
#: A model folder that loraforge built itself (the tiny models) holds this record of its recipe.
MARKER = "loraforge.json"


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The loraforge marker of a model folder, or None when absent or unreadable."""
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def make_partial(root: Path, name: str) -> Path:
    """A fresh hidden temporary folder for model `name` beside its destination."""
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=PARTIAL_SUFFIX, dir=root))


def remove_leftovers(root: Path, name: str, older_than: float = 0.0) -> None:
    """Delete temporary folders that killed runs for model `name` left behind."""
    now = time.time()
    for path in [*root.glob(f".{name}.*{PARTIAL_SUFFIX}"), *root.glob(f".{name}.*{OLD_SUFFIX}")]:
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime >= older_than:
                shutil.rmtree(path, ignore_errors=True)


def install(tmp: Path, dest: Path, keep_if: Callable[[Path], bool] | None = None) -> None:
    """Rename the finished folder `tmp` onto `dest`; a previous `dest` is moved aside, then removed.

    The model is never missing for longer than two renames, and never half-present. When the
    rename fails because another process installed `dest` meanwhile, `keep_if(dest)` says
    whether that copy is good to keep.
    """
    old: Path | None = None
    if dest.exists() or dest.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=OLD_SUFFIX, dir=dest.parent))
        os.replace(dest, old / dest.name)
    try:
        os.rename(tmp, dest)
    except OSError:
        if keep_if is not None and keep_if(dest):
            return
        if old is not None:  # put the previous model back
            os.replace(old / dest.name, dest)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def build_model(root: Path, name: str, build: Callable[[Path], None],
                is_complete: Callable[[Path], bool], what: str) -> Path:
    """Build model `name` with `build(folder)` into a fresh hidden folder under `root`, then
    install it as `root/name`; ForgeError naming `what` when the storage root is not writable."""
    try:
        tmp = make_partial(root, name)
        try:
            build(tmp)
            install(tmp, root / name, keep_if=is_complete)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise ForgeError(f"cannot build {what} here ({exc})", path=root,
                         fix="make the storage root writable, or point `storage.root` (or "
                             "LORAFORGE_STORAGE_ROOT) at a writable folder") from None
    return root / name


def fix_modes(folder: Path, file_mode: int = FILE_MODE) -> None:
    """Files get `storage.file_mode` (safetensors writes 0600, mkdtemp makes 0700); folders the
    same plus search permission wherever read permission is given (0644 -> 0755)."""
    dir_mode = file_mode | ((file_mode & 0o444) >> 2)
    os.chmod(folder, dir_mode)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, dir_mode if path.is_dir() else file_mode)


def link_or_copy(src: Path, dest: Path) -> None:
    """Hard-link `src` to `dest` (no extra disk space), or copy it where links are not possible."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


@contextlib.contextmanager
def exclusive(lock_file: Path, what: str) -> Iterator[None]:
    """Hold a non-blocking exclusive lock on `lock_file`; ForgeError if another process holds it.

    Where the file system cannot lock (some network mounts), runs unlocked.
    """
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ForgeError(f"cannot be created ({exc.strerror or exc})", path=lock_file.parent,
                         fix="check that the storage root is a folder you can write to "
                             "(storage.root, or LORAFORGE_STORAGE_ROOT)") from None
    try:
        import fcntl

        handle = open(lock_file, "a+b")  # noqa: SIM115 - held across the yield
    except (ImportError, OSError):
        yield
        return
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ForgeError(f"another process is busy with {what} (lock held)", path=lock_file,
                             fix="wait for it to finish, then run the command again") from None
        except OSError:
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
