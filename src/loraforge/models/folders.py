"""Model folders are installed atomically: built in a hidden folder beside the destination, then
renamed into place. A killed fetch or import leaves a `.NAME.*.partial` folder that is never taken
for a model (a later run of the same name removes it: after 6 hours, or at once where it holds the
lock of the command that made it) and never a half-written model folder.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from loraforge.errors import ForgeError
from loraforge.fsutil import LockHeld, held_lock

PARTIAL_SUFFIX = ".partial"
OLD_SUFFIX = ".old"
LOCK_SUFFIX = ".lock"
#: The random part of a name tempfile.mkdtemp makes (8 of a-z, 0-9 and _).
RANDOM = "[a-z0-9_]{8}"
#: Marks the partial folders of imports (`.NAME.RANDOM.import.partial`): their lock is the
#: name's, so a rerun may remove them at once. None is 8 long (the random part's length).
IMPORT_TAG = "import"
TAGS = (IMPORT_TAG,)
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


def make_partial(root: Path, name: str, tag: str = "") -> Path:
    """A fresh hidden temporary folder for model `name` beside its destination; `tag` marks
    the command that makes it (`.NAME.RANDOM.TAG.partial`, see `remove_own_partials`)."""
    if tag and tag not in TAGS:
        raise ValueError(f"unknown partial tag {tag!r}")
    root.mkdir(parents=True, exist_ok=True)
    suffix = f".{tag}{PARTIAL_SUFFIX}" if tag else PARTIAL_SUFFIX
    return Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=suffix, dir=root))


def _leftovers(root: Path, name: str, pattern: str) -> list[Path]:
    """The hidden folders of model `name` (and of no other: `a` is not `a.b`) whose name after
    `.NAME.` and mkdtemp's random part matches `pattern`."""
    exact = re.compile(rf"\.{re.escape(name)}\.{RANDOM}{pattern}")
    return [path for path in root.glob(f".{glob.escape(name)}.*") if exact.fullmatch(path.name)]


def remove_leftovers(root: Path, name: str, older_than: float = 0.0) -> None:
    """Delete temporary folders that killed runs for model `name` left behind."""
    now = time.time()
    tags = "|".join(re.escape(tag) for tag in TAGS)
    found = _leftovers(root, name, rf"(\.(?:{tags}))?{re.escape(PARTIAL_SUFFIX)}")
    for path in [*found, *_leftovers(root, name, re.escape(OLD_SUFFIX))]:
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime >= older_than:
                shutil.rmtree(path, ignore_errors=True)


def remove_own_partials(root: Path, name: str, tag: str) -> None:
    """Delete, whatever their age, the partial folders that `make_partial(root, name, tag)`
    made: only for a caller that holds the lock every such command holds for `name`, so that
    none of them is still being written. A killed import leaves one the size of the model,
    which would fill a small disk again on the rerun."""
    for path in _leftovers(root, name, re.escape(f".{tag}{PARTIAL_SUFFIX}")):
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


def model_lock(root: Path, name: str) -> contextlib.AbstractContextManager[bool]:
    """The lock of model `name` under `root` that `models import` and `models fetch` hold from
    their last look at the destination to its install, so that neither replaces the other's
    model unseen; ForgeError while another process holds it."""
    return exclusive(root / f".{name}{LOCK_SUFFIX}",
                     f"installing the model `{name}` (an import or a fetch of it)")


@contextlib.contextmanager
def exclusive(lock_file: Path, what: str) -> Iterator[bool]:
    """Hold a non-blocking exclusive lock on `lock_file`; ForgeError if another process holds it.

    Where the file system cannot lock (some network mounts), runs unlocked. Yields whether the
    lock is held.
    """
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ForgeError(f"cannot be created ({exc.strerror or exc})", path=lock_file.parent,
                         fix="check that the storage root is a folder you can write to "
                             "(storage.root, or LORAFORGE_STORAGE_ROOT)") from None
    try:
        with held_lock(lock_file, wait=False) as locked:
            yield locked
    except LockHeld:
        raise ForgeError(f"another process is busy with {what} (lock held)", path=lock_file,
                         fix="wait for it to finish, then run the command again") from None
