"""`loraforge dataset tags`: how often each tag occurs per concept, and bulk edits of the
captions (remove tags, replace tags, put the trigger first) with a dry run that shows the diff
and a backup of every caption changed.

The trigger (the concept's name) is never removed or replaced by a bulk edit.

An edit is not always the same when applied twice (`--replace "a=b,b=a"` swaps back), so an edit
stopped part-way (a full disk, Ctrl-C, SIGTERM) is gone on with, not done again: its backup folder
records the edit (`caption_edit.UNFINISHED_RECORD`), and a caption whose backup there differs
from it has been edited already. A rerun of the same edit skips those and reuses the folder (so
it keeps the captions from before the edit); a different edit is refused until that one is
finished or undone.
"""

from __future__ import annotations

import json
import shlex
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.dataset.caption_edit import (
    BACKUP_DIR,
    UNFINISHED_RECORD,
    CaptionWriter,
    backup_path,
    caption_diff,
    caption_file,
    caption_tags,
    put_first,
    read_caption,
    remove_tags,
    replace_tags,
    restore_folder,
    tag_key,
)
from loraforge.dataset.folders import (
    CaptionPath,
    ConceptFolder,
    captions_by_file,
    concept_folders,
    left_out,
    trigger_clash,
)
from loraforge.dataset.scan import display_path, shell_path
from loraforge.errors import ForgeError


@dataclass
class Caption:
    concept: ConceptFolder
    path: Path
    text: str
    shared: list[CaptionPath]  # every caption of the dataset that is this file (links followed)


@dataclass
class Edits:
    remove: list[str] = field(default_factory=list)
    replace: dict[str, str] = field(default_factory=dict)
    add_trigger: bool = False

    def __bool__(self) -> bool:
        return bool(self.remove or self.replace or self.add_trigger)

    def apply(self, text: str, triggers: list[str]) -> str:
        """`text` edited, keeping the triggers of every concept whose caption it is; the
        trigger is put first only where it is one concept's caption."""
        if self.remove:
            text = remove_tags(text, self.remove, keep=triggers)
        if self.replace:
            text = replace_tags(text, self.replace, keep=triggers)
        if self.add_trigger and len(triggers) == 1:
            text = put_first(text, triggers[0])
        return text

    def record(self, concepts: list[str] | None) -> dict[str, Any]:
        """What this edit of these concepts (None: all) is, as JSON for its backup folder."""
        concepts = list(concepts) if concepts else None
        return {"command": self.command_line(concepts), "concepts": concepts,
                "remove": self.remove, "replace": [[old, new] for old, new in
                                                   self.replace.items()],
                "add_trigger": self.add_trigger}

    def command_line(self, concepts: list[str] | None) -> str:
        words = ["loraforge", "dataset", "tags", *(concepts or [])]
        if self.remove:
            words += ["--remove", ",".join(self.remove)]
        if self.replace:
            words += ["--replace", ",".join(f"{old}={new}" for old, new in self.replace.items())]
        if self.add_trigger:
            words.append("--add-trigger")
        return shlex.join(words)


def _same_edit(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two edit records are one edit (tags compared as edits compare them)."""
    def key(record: dict[str, Any]) -> tuple[object, ...]:
        concepts = record.get("concepts")
        return (sorted(concepts) if concepts is not None else None,
                json.dumps(record.get("tagging"), sort_keys=True),
                sorted({tag_key(t) for t in record.get("remove", [])}),
                sorted({(tag_key(old), new) for old, new in record.get("replace", [])}),
                bool(record.get("add_trigger")))
    try:
        return key(a) == key(b)
    except (TypeError, ValueError, AttributeError):  # a record damaged by hand: not this edit
        return False


def parse_edits(remove: list[str] | None, replace: list[str] | None, add_trigger: bool,
                ) -> Edits:
    """`--remove "solo,simple background"` and `--replace "1girl=1woman"` (each repeatable, each
    a comma-separated list) as Edits; a replacement without `=` is one clear error."""
    edits = Edits(add_trigger=add_trigger)
    for item in remove or []:
        tags = [t.strip() for t in item.split(",") if t.strip()]
        if not tags:
            raise ForgeError(f"--remove {item!r} names no tag",
                             fix='give the tags to remove, comma-separated, e.g. '
                                 '--remove "solo,simple background"')
        edits.remove += tags
    for item in replace or []:
        if not item.replace(",", "").strip():
            raise ForgeError(f"--replace {item!r} names no tag",
                             fix='write each replacement as old tag=new tag, e.g. '
                                 '--replace "1girl=1woman,solo=alone"')
        for pair in (p for p in item.split(",") if p.strip()):
            old, sep, new = pair.partition("=")
            if not sep or not old.strip() or not new.strip():
                raise ForgeError(f"--replace {pair.strip()!r} is not OLD=NEW",
                                 fix='write each replacement as old tag=new tag, e.g. '
                                     '--replace "1girl=1woman,solo=alone"')
            old, new = old.strip(), new.strip()
            earlier = next((v for k, v in edits.replace.items() if tag_key(k) == tag_key(old)),
                           None)
            if earlier is not None and tag_key(earlier) != tag_key(new):
                raise ForgeError(f"--replace gives {old!r} two new names ({earlier!r} and "
                                 f"{new!r})", fix="keep one of them")
            edits.replace[old] = new
    both = sorted({tag_key(t) for t in edits.remove} & {tag_key(t) for t in edits.replace})
    if both:
        raise ForgeError(f"{', '.join(both)}: both removed (--remove) and replaced (--replace)",
                         fix="keep one of the two edits for each tag")
    return edits


def trigger_edits(edits: Edits, concepts: list[ConceptFolder]) -> list[str]:
    """The tags `edits` would remove or replace that are a concept's trigger: captions keep
    their trigger, so those edits do nothing there (a note for the user, not an error)."""
    triggers = {tag_key(c.name) for c in concepts}
    return sorted({t for t in [*edits.remove, *edits.replace] if tag_key(t) in triggers})


def read_captions(concepts: list[ConceptFolder], extension: str, warnings: list[str],
                  files: dict[Path, list[CaptionPath]]) -> list[Caption]:
    """The caption files of the concepts' images (an unreadable one: a warning, skipped), each
    with the captions that reach its file (`files`: `captions_by_file`)."""
    captions = []
    for concept in concepts:
        for image in concept.images:
            path = concept.caption_path(image, extension)
            if not path.is_file():
                continue
            try:
                text = read_caption(path)
            except (OSError, UnicodeDecodeError) as exc:
                why = "is not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else \
                    f"cannot be read ({exc.strerror})"
                warnings.append(f"{display_path(path)}: {why}; left as it is")
                continue
            shared = files.get(caption_file(path), [(concept, path)])
            captions.append(Caption(concept, path, text, shared))
    return captions


def frequencies(concepts: list[ConceptFolder], captions: list[Caption]) -> list[dict[str, Any]]:
    """Per concept: images, captioned images and each tag's count, most frequent first (ties
    in order of first appearance); `_` and case variants of a tag count together."""
    out = []
    for concept in concepts:
        counts: Counter[str] = Counter()
        spelling: dict[str, str] = {}
        mine = [c for c in captions if c.concept is concept and caption_tags(c.text)]
        for caption in mine:
            seen: set[str] = set()
            for tag in caption_tags(caption.text):
                key = tag_key(tag)
                spelling.setdefault(key, tag)
                if key not in seen:
                    seen.add(key)
                    counts[key] += 1
        out.append({"concept": concept.name, "folder": concept.folder.name,
                    "images": len(concept.images), "captioned": len(mine),
                    "tags": [{"tag": spelling[k], "count": n} for k, n in counts.most_common()]})
    return out


@dataclass
class EditResult:
    changed: list[tuple[Caption, str]]
    diff: list[str]
    backup_dir: Path | None = None
    resumed: Path | None = None  # the backup folder of the stopped edit this one went on with
    already_done: int = 0  # captions that edit had written before it stopped
    changed_meanwhile: list[Path] = field(default_factory=list)  # left as they are

    def to_dict(self, dry_run: bool, notes: list[str]) -> dict[str, Any]:
        """What `dataset tags --json` prints for an edit: the counts, the backup folder, and
        each caption that changed (in a dry run: would change) with its old and new text."""
        return {"dry_run": dry_run, "changed": len(self.changed),
                "already_done": self.already_done,
                "resumed": str(self.resumed) if self.resumed is not None else None,
                "backup": str(self.backup_dir) if self.backup_dir is not None else None,
                "notes": notes,
                "changed_meanwhile": [str(path) for path in self.changed_meanwhile],
                "captions": [{"concept": caption.concept.name,
                              "folder": caption.concept.folder.name, "path": str(caption.path),
                              "old": caption.text, "new": new}
                             for caption, new in self.changed]}


def unfinished_edit(dataset_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The backup folder of a caption edit that stopped before it finished, and its record
    (an unreadable record reads as {}), or None."""
    for record in sorted((Path(dataset_dir) / BACKUP_DIR).glob(f"*/{UNFINISHED_RECORD}")):
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            data = {}
        return record.parent, data if isinstance(data, dict) else {}
    return None


def _already_edited(backup: Path, caption: Path) -> bool:
    """Whether the caption has changed since its backup was taken: the edit wrote it."""
    try:
        return backup.is_file() and backup.read_bytes() != caption.read_bytes()
    except OSError:
        return False


def _backed_up(folder: Path, dataset_dir: Path) -> list[tuple[Path, Path]]:
    """Each subfolder of a backup folder, and the dataset folder its captions are restored to."""
    return [(sub, restore_folder(sub, dataset_dir)) for sub in sorted(folder.iterdir())
            if sub.is_dir()]


def _written_by(folder: Path, dataset_dir: Path) -> int:
    return sum(1 for sub, target in _backed_up(folder, dataset_dir) for backup in sub.iterdir()
               if _already_edited(backup, target / backup.name))


def _undo(folder: Path, dataset_dir: Path) -> str:
    """How to put back the captions a backup folder holds, and then delete it: one copy, or,
    where a concept folder has been renamed since (its repeat count), one copy per folder into
    its new name (a copy of the whole would bring back the old folder beside it)."""
    pairs = _backed_up(folder, dataset_dir)
    if all(sub.name == target.name for sub, target in pairs):
        copy = (f"copy the folders in it back (cp -r {shell_path(folder)}/*/ "
                f"{shell_path(dataset_dir)}/)")
    else:
        copy = "copy the captions in it back (" + " && ".join(
            f"cp -r {shell_path(sub)}/. {shell_path(target)}/" for sub, target in pairs) + ")"
    return f"{copy} and delete it (rm -r {shell_path(folder)})"


def refusal(dataset_dir: Path, folder: Path, record: dict[str, Any], this: str) -> ForgeError:
    """The error for the command `this` (another edit of the captions) while the edit recorded
    in `folder` is unfinished: the folder, what it holds, how to finish or undo that edit."""
    command = record.get("command")
    undo = _undo(folder, dataset_dir)
    if isinstance(command, str):
        what = f"`{command}`"
        fix = (f"finish the stopped edit first: run {what} again (it skips the captions already "
               f"edited); or undo it: {undo}; then run this one again")
    else:
        what = f"an edit (its record {UNFINISHED_RECORD} cannot be read)"
        fix = f"undo it: {undo}; then run this one again"
    return ForgeError(
        f"{what} stopped here before it finished ({_written_by(folder, dataset_dir)} caption(s) "
        f"edited, their old text kept in this folder), so `{this}` was not started: on top of a "
        "half-done edit, its result would be neither's", path=display_path(folder), fix=fix)


def stopped_edit(dataset_dir: Path, record: dict[str, Any], dry_run: bool = False,
                 say: Callable[[str], None] | None = None) -> Path | None:
    """The backup folder of the caption edit `record` describes when it stopped earlier: the
    edit goes on with it. Another edit stopped earlier: refused (a dry run only gets a note).
    None: no edit stopped."""
    earlier = unfinished_edit(dataset_dir)
    if earlier is None:
        return None
    folder, old = earlier
    if _same_edit(old, record):
        return folder
    if not dry_run:
        raise refusal(dataset_dir, folder, old, record["command"])
    if say is not None:
        say(f"note: an edit stopped earlier ({display_path(folder)}/): this one will be "
            "refused until it is finished or undone")
    return None


def one_per_file(captions: list[Caption]) -> list[Caption]:
    """`captions` without those whose file an earlier one reaches (a caption linked into a
    second folder): each file is edited, counted and shown once."""
    seen: set[Path] = set()
    unique = []
    for caption in captions:
        if (file := caption_file(caption.path)) not in seen:
            seen.add(file)
            unique.append(caption)
    return unique


def _edited(caption: Caption, edits: Edits, chosen: list[ConceptFolder],
            ) -> tuple[str, str | None]:
    """The caption's new text, keeping the trigger of every concept whose caption its file is,
    and a note when it is not what the edit asks: a file that a folder left out (not in
    `chosen`) also reaches is left as it is; nor does --add-trigger put one concept's trigger
    first in another's caption."""
    new = edits.apply(caption.text, sorted({concept.name for concept, _ in caption.shared}))
    where = display_path(caption.path)
    if new != caption.text and (shared := left_out(caption.shared, chosen)) is not None:
        why, fix = shared
        return caption.text, f"note: {where}: {why}; left as it is (fix: {fix})"
    if edits.add_trigger and (clash := trigger_clash(caption.path, caption.shared)) is not None:
        why, fix = clash
        return new, f"note: {where}: {why}; --add-trigger left its first tag as it is (fix: {fix})"
    return new, None


def edit_captions(dataset_dir: Path, captions: list[Caption], edits: Edits, dry_run: bool,
                  file_mode: int, concepts: list[str] | None = None,
                  say: Callable[[str], None] | None = None) -> EditResult:
    """Apply `edits` to every caption of `concepts` (as the user named them; None: all); write
    them (with a backup) unless `dry_run`.

    The same edit stopped earlier is gone on with (`say` tells so): a caption it has edited is
    left as it is, and its backup folder is reused. Another edit stopped earlier: refused (a
    dry run only gets a note)."""
    record = edits.record(concepts)
    resume = stopped_edit(dataset_dir, record, dry_run, say)
    changed = []
    diff: list[str] = []
    done = 0
    chosen = [caption.concept for caption in captions]
    for caption in one_per_file(captions):
        if resume is not None and _already_edited(backup_path(resume, caption.path),
                                                  caption.path):
            done += 1
            continue
        new, note = _edited(caption, edits, chosen)
        if note is not None and say is not None:
            say(note)
        if new != caption.text:
            changed.append((caption, new))
            label = f"{caption.concept.folder.name}/{caption.path.name}"
            diff += caption_diff(label, caption.text, new)
    result = EditResult(changed, diff, resumed=resume, already_done=done)
    if resume is not None and say is not None:
        say(f"this edit stopped earlier ({display_path(resume)}/): {done} caption(s) already "
            "done, which a rerun leaves as they are" if dry_run else
            f"continuing the edit stopped earlier ({display_path(resume)}/): {done} caption(s) "
            "already done, left as they are")
    if dry_run or (not changed and resume is None):
        return result
    with CaptionWriter(dataset_dir, "tags", file_mode, folder=resume, record=record) as writer:
        for caption, new in changed:
            writer.write(caption.path, caption.text, new)
        result.backup_dir = writer.finish()
    result.changed_meanwhile = writer.changed_meanwhile
    result.changed = [(c, new) for c, new in changed if c.path not in writer.changed_meanwhile]
    return result


def load(dataset_dir: Path, only: list[str] | None, extension: str,
         ) -> tuple[list[ConceptFolder], list[Caption], list[str]]:
    warnings: list[str] = []
    concepts = concept_folders(dataset_dir, only, warnings)
    files = captions_by_file(dataset_dir, extension)
    return concepts, read_captions(concepts, extension, warnings, files), warnings
