"""Editing caption files without losing what people wrote: tag-level edits that keep the rest of
the text as it was, diffs for dry runs, and a backup of every caption before it is changed.

Tags are separated by commas and line breaks, and the `|||` of `dataset.keep_tokens_separator`
separates them too: an edit changes only the tags it names and keeps every separator and the
spacing around the others. A removed tag takes the comma beside it, a line break only with the
line it was alone on (kohya trains on a caption's first line), never a `|||`. Tags are compared
case-insensitively with `_` and space alike, so `--remove "simple background"` also removes
`simple_background` (and A1111's spellings: see `tag_key`).

Backups: before a caption changes, its old bytes are copied to
`<dataset>/.caption_backups/<time>-<action>/<concept folder>/<file>` (a hidden folder, which no
scan reads); restoring is a copy back. A bulk edit (`dataset tags`) also writes what it is into
that folder (`edit.unfinished.json`, renamed `edit.json` when it has finished), so that a rerun
after an interruption goes on with it instead of editing again the captions already edited.

Links: a caption that is a symlink (a subset folder of links, kohya's way to repeat a subset) is
written through it: its target is replaced atomically and the link kept, wherever it lies (a
caption linked in from outside the dataset on purpose is edited there). A link whose target does
not exist, or a loop, is not written through (`broken_link`). The actions edit each file once,
however many links reach it (`caption_file`), keeping the trigger of every concept whose caption
it is, and never change one that a folder left out of the command also reaches (`folders`).
"""

from __future__ import annotations

import difflib
import errno
import json
import os
import re
import shutil
import stat
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from loraforge.errors import ForgeError
from loraforge.fsutil import DEFAULT_FILE_MODE, atomic_path, write_atomic

BACKUP_DIR = ".caption_backups"
UNFINISHED_RECORD = "edit.unfinished.json"  # an edit under way (or stopped): what it is
EDIT_RECORD = "edit.json"  # ... renamed so when it has finished
_SEPARATOR = re.compile(r"(,|\r\n|\r|\n|\|\|\|)")  # line breaks: Unix, Windows, old Mac
_LINE_BREAKS = ("\n", "\r\n", "\r")


#: A1111's weighted tag, `(armor:1.2)`: its words are the tag (a `\(` escapes a literal one).
_WEIGHTED = re.compile(r"\((?P<tag>[^()]+?):\s*[+-]?(?:\d+\.?\d*|\.\d+)\s*\)")


def tag_key(tag: str) -> str:
    """How tags are compared: stripped, lower case, `_` read as a space, A1111's escaped
    brackets (`tiny knight \\(forge\\)`, as its WD14 tagger writes them) read as brackets, and
    a weighted tag (`(armor:1.2)`) read as its words."""
    text = tag.strip()
    weighted = _WEIGHTED.fullmatch(text)
    if weighted:
        text = weighted["tag"]
    text = text.replace("\\(", "(").replace("\\)", ")")
    return " ".join(text.lower().replace("_", " ").split())


def caption_tags(text: str) -> list[str]:
    """The tags of a caption text, in order (the `|||` separator separates tags too)."""
    return [part.strip() for part in _SEPARATOR.split(text)[::2] if part.strip()]


def _split(text: str) -> tuple[str, list[list[str]], str]:
    """(leading space, [[tag text, separator after it], ...], trailing space)."""
    core = text.strip()
    head = text[: len(text) - len(text.lstrip())]
    tail = text[len(head) + len(core):]
    parts = _SEPARATOR.split(core)
    items = [[parts[i], parts[i + 1] if i + 1 < len(parts) else ""]
             for i in range(0, len(parts), 2)]
    return head, items, tail


def edit_tags(text: str, change: Callable[[str], str | None]) -> str:
    """Apply `change` to every tag at once: it returns the tag's new text, or None to remove the
    tag. A changed tag that would repeat a tag of the result (one left as it was, or an earlier
    changed one) is removed instead; so swaps (`a=b,b=a`) and chains (`a=b,b=c`) keep every
    tag."""
    head, items, tail = _split(text)
    wanted = [change(raw.strip()) if raw.strip() else raw.strip() for raw, _ in items]
    if all(new == raw.strip() for (raw, _), new in zip(items, wanted, strict=True)):
        return text  # no tag changes: nor does the file (its stray commas stay)
    taken = {tag_key(raw) for (raw, _), new in zip(items, wanted, strict=True)
             if new is not None and tag_key(new) == tag_key(raw)}
    for i, ((raw, _), new) in enumerate(zip(items, wanted, strict=True)):
        if new is not None and tag_key(new) != tag_key(raw):
            if tag_key(new) in taken:
                wanted[i] = None
            else:
                taken.add(tag_key(new))
    i = 0
    while i < len(items):
        new = wanted[i]
        if new is None:
            count = len(items)
            _remove(items, i)
            if len(items) < count:
                del wanted[i]
            else:
                wanted[i] = ""
            continue
        tag = items[i][0].strip()
        if new != tag:
            items[i][0] = items[i][0].replace(tag, new, 1)
        i += 1
    if items:
        items[0][0] = items[0][0].lstrip()
    core = "".join(t + s for t, s in items).strip().strip(",").strip()
    return f"{head}{core}{tail}" if core else ""


def _remove(items: list[list[str]], i: int) -> None:
    """Remove the tag `items[i]` and one separator beside it: a comma rather than a line break
    (kohya trains on a caption's first line), a line break only with the line the tag was
    alone on, never `|||`."""
    raw, after = items[i]
    before = items[i - 1][1] if i > 0 else None
    if after == "," or (after in _LINE_BREAKS and before in (None, *_LINE_BREAKS)):
        if i + 1 < len(items):  # the next tag takes its place: "a, b, c" without b: "a, c"
            items[i + 1][0] = raw[: len(raw) - len(raw.lstrip())] + items[i + 1][0].lstrip()
        del items[i]
    elif before == "," or (before in _LINE_BREAKS and not after):
        items[i - 1][0] = items[i - 1][0].rstrip() + raw[len(raw.rstrip()):]
        items[i - 1][1] = after
        del items[i]
    else:  # beside a `|||` (or alone): leave the separators, drop the words
        items[i][0] = " "


def remove_tags(text: str, names: Iterable[str], keep: Iterable[str] = ()) -> str:
    """`text` without the tags in `names` (never those in `keep`: the triggers)."""
    gone = {tag_key(n) for n in names} - {tag_key(k) for k in keep}
    return edit_tags(text, lambda tag: None if tag_key(tag) in gone else tag)


def replace_tags(text: str, mapping: dict[str, str], keep: Iterable[str] = ()) -> str:
    """`text` with each tag in `mapping` replaced by its value (never those in `keep`)."""
    kept = {tag_key(k) for k in keep}
    table = {tag_key(old): new for old, new in mapping.items() if tag_key(old) not in kept}
    return edit_tags(text, lambda tag: table.get(tag_key(tag), tag))


def put_first(text: str, trigger: str) -> str:
    """`text` with `trigger` as its first tag (moved there, or added)."""
    tags = caption_tags(text)
    if tags and tag_key(tags[0]) == tag_key(trigger):
        return text
    rest = remove_tags(text, [trigger])
    head, _, _ = _split(rest)
    body = rest[len(head):]
    return f"{trigger}, {body}" if body.strip() else trigger


def append_tags(text: str, tags: Iterable[str]) -> str:
    """`text` with `tags` added at the end, except those it already has."""
    have = {tag_key(t) for t in caption_tags(text)}
    new = []
    for tag in tags:
        if tag_key(tag) not in have:
            have.add(tag_key(tag))
            new.append(tag)
    if not new:
        return text
    core = text.rstrip()
    tail = text[len(core):]
    joined = ", ".join(new)
    if core.endswith("|||"):  # the kept part is all there is: the tags follow it
        return f"{core} {joined}{tail}"
    core = core.rstrip(",").rstrip()  # a caption that ends in a comma gets no second one
    return f"{core}, {joined}{tail}" if core else f"{joined}{tail}"


def caption_diff(label: str, old: str | None, new: str) -> list[str]:
    """A unified diff of one caption file (`old` None: the file is new)."""
    return list(difflib.unified_diff((old or "").splitlines(), new.splitlines(),
                                     "/dev/null" if old is None else f"a/{label}",
                                     f"b/{label}", lineterm="", n=0))


def _concept_of(folder_name: str) -> str | None:
    """The concept a dataset folder's name (`10_mage`) trains; None without a repeat count."""
    from loraforge.dataset.scan import parse_folder_name

    parsed = parse_folder_name(folder_name)
    return parsed[1] if parsed is not None else None


def backup_path(backup_dir: Path, caption: Path) -> Path:
    """Where the backup of `caption` goes in an action's backup folder: under its concept
    folder's name, or, when that folder has been renamed since (another repeat count, as
    `dataset check` may advise; the old name is gone from the dataset), under the name it
    had, so that an edit gone on with finds and keeps the captions' first backups. Two
    folders of one concept (`10_mage` and `5_mage`) keep their backups apart."""
    folder = backup_dir / caption.parent.name
    concept = _concept_of(caption.parent.name)
    if not folder.is_dir() and concept is not None and backup_dir.is_dir():
        for other in sorted(backup_dir.iterdir()):
            if other.is_dir() and _concept_of(other.name) == concept \
                    and not (caption.parent.parent / other.name).exists():
                return other / caption.name
    return folder / caption.name


def restore_folder(backed_up: Path, dataset_dir: Path) -> Path:
    """The dataset folder whose captions a backup folder's subfolder `backed_up` holds: the
    folder of its name, or, when that one has been renamed since (another repeat count) and one
    folder of the same concept is there, that one (the inverse of `backup_path`)."""
    same = Path(dataset_dir) / backed_up.name
    concept = _concept_of(backed_up.name)
    if same.is_dir() or concept is None:
        return same
    renamed = [folder for folder in sorted(Path(dataset_dir).iterdir())
               if folder.is_dir() and _concept_of(folder.name) == concept]
    return renamed[0] if len(renamed) == 1 else same


def caption_file(caption: Path) -> Path:
    """The file a caption path reaches, through any symlinks: two paths of one file are one
    caption to edit (a link loop reaches none: see `broken_link`)."""
    return Path(os.path.realpath(caption))


def broken_link(caption: Path) -> tuple[str, str] | None:
    """(what is wrong, the fix) when the caption path is a symlink that cannot be written
    through: a loop, or a link whose target does not exist (writing would create a file
    wherever it points, even outside the dataset); None for any other path."""
    if not caption.is_symlink():
        return None
    try:
        caption.stat()
    except OSError as exc:
        from loraforge.dataset.scan import shell_path

        remove = f"rm {shell_path(caption)}"
        if exc.errno == errno.ELOOP:
            return "is a symlink loop (it reaches no file)", f"remove the link: {remove}"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return (f"is a link to {os.readlink(caption)}, which does not exist",
                    f"remove the link ({remove}) or restore its target")
        return (f"is a link to {os.readlink(caption)}, which cannot be reached "
                f"({exc.strerror})", "make its target readable, or remove the link")
    return None


def read_caption(caption: Path) -> str:
    """A caption file's text as every dataset command reads it: UTF-8, a BOM dropped (OSError
    or UnicodeDecodeError when it cannot be read as that)."""
    return caption.read_bytes().decode("utf-8-sig")


def _current_text(caption: Path) -> str | None:
    """The caption's text as the actions read it; None when there is none, "\0" (no text of
    a caption) when it cannot be read."""
    try:
        return read_caption(caption)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return "\0"


def _mode_of(caption: Path) -> int:
    """The permission bits an edited caption keeps (a caption made private stays private)."""
    return stat.S_IMODE(caption.stat().st_mode)


class CaptionWriter:
    """Writes captions atomically; a change to a file that held any text first copies its old
    bytes to the backup folder of this action (created only when something is backed up), and
    a backup already there is kept: it holds the text from before the action began.
    Used as a context manager, it names that folder on stderr when the action stops early (an
    error, Ctrl-C, SIGTERM), so the captions changed before the stop can be restored.

    With `record` (what the action is, as JSON), the folder also says that the action is under
    way: `record` is written to `UNFINISHED_RECORD` in it before the first caption changes, and
    `finish` renames it to `EDIT_RECORD`. `folder` reuses the folder of such an action stopped
    earlier, to go on with it (see `tag_list.edit_captions`)."""

    def __init__(self, dataset_dir: Path, action: str, file_mode: int = DEFAULT_FILE_MODE,
                 folder: Path | None = None, record: dict[str, object] | None = None) -> None:
        self.fresh = folder is None
        if folder is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            folder = Path(dataset_dir) / BACKUP_DIR / f"{stamp}-{action}"
            n = 1
            while folder.exists():
                n += 1
                folder = folder.with_name(f"{stamp}-{action}-{n}")
        self.backup_dir = folder
        self.file_mode = file_mode
        self.record = record
        self.recorded = not self.fresh
        self.written = 0
        self.backed_up = 0
        self.changed_meanwhile: list[Path] = []

    def __enter__(self) -> CaptionWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            return
        from loraforge.dataset.scan import display_path

        if self.record is None:
            if self.backed_up:
                print(f"stopped after {self.written} caption(s) written; the old ones are in "
                      f"{display_path(self.backup_dir)}/ (copy them back to undo)",
                      file=sys.stderr, flush=True)
            return
        # Nothing changed: nothing to go on with or undo. A caption backed up may have been
        # replaced before the stop came (its rename done, `written` not yet counted).
        if self.fresh and not self.written and not self.backed_up:
            shutil.rmtree(self.backup_dir, ignore_errors=True)
            return
        print(f"stopped after {self.written} caption(s) written; the old ones are in "
              f"{display_path(self.backup_dir)}/: run the same command again to finish the edit "
              "(the captions already edited are not edited again), or, to undo it, copy them "
              "back and delete that folder", file=sys.stderr, flush=True)

    def write(self, path: Path, old: str | None, new: str) -> bool:
        """Write `new` to the caption `path` (whose text was `old` when the action read it,
        None when it did not exist); False when nothing changes. A caption that is no longer
        `old` (written or edited meanwhile: a long tagging job runs while people curate) is
        left as it is and listed in `changed_meanwhile`. A symlink is written through: its
        target is replaced, the link kept."""
        if old == new:
            return False
        if _current_text(path) != old:
            self.changed_meanwhile.append(path)
            return False
        if old is not None and old.strip():
            backup = backup_path(self.backup_dir, path)
            try:
                if not backup.is_file():
                    with atomic_path(backup, _mode_of(path)) as tmp:  # never a half backup
                        shutil.copy2(path, tmp)
            except OSError as exc:
                raise ForgeError(f"cannot keep a backup of {path.name} there "
                                 f"({exc.strerror or exc}), so the caption was left as it is",
                                 path=backup.parent,
                                 fix=f"make {self.backup_dir.parent} a folder you can write to "
                                     "(move away a file of that name) or free disk space, then "
                                     "run the same command again") from None
            self.backed_up += 1
        if not self.recorded and self.record is not None:
            record = self.backup_dir / UNFINISHED_RECORD
            try:
                write_atomic(record, json.dumps(self.record, indent=2) + "\n", self.file_mode)
            except OSError as exc:
                raise ForgeError(f"cannot be written ({exc.strerror or exc}), so no caption was "
                                 "changed", path=record,
                                 fix="free disk space or make the folder writable (chmod u+w), "
                                     "then run the same command again") from None
            self.recorded = True
        try:
            write_atomic(caption_file(path), new,
                         self.file_mode if old is None else _mode_of(path))
        except OSError as exc:
            raise ForgeError(f"cannot be written ({exc.strerror or exc}); it is unchanged, and "
                             "the captions written before it are kept", path=path,
                             fix="make the folder writable (chmod u+w) or free disk space, then "
                                 "run the same command again: it continues where it stopped"
                             ) from None
        self.written += 1
        return True

    def finish(self) -> Path | None:
        """Mark the recorded action finished (its record renamed `EDIT_RECORD`); a folder that
        holds no backup (only empty captions changed) is removed. The folder, or None."""
        if not self.backup_dir.is_dir():
            return None
        if not any(p.is_dir() for p in self.backup_dir.iterdir()):
            shutil.rmtree(self.backup_dir, ignore_errors=True)
            return None
        unfinished = self.backup_dir / UNFINISHED_RECORD
        if unfinished.exists():
            try:
                os.replace(unfinished, self.backup_dir / EDIT_RECORD)
            except OSError as exc:
                raise ForgeError(f"every caption was written, but the edit cannot be marked "
                                 f"finished ({exc.strerror or exc})", path=unfinished,
                                 fix="free disk space or make the folder writable (chmod u+w), "
                                     "then run the same command again: it writes no caption "
                                     "again") from None
        return self.backup_dir
