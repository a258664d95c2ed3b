"""`loraforge dataset tags`: how often each tag occurs per concept, and bulk edits of the
captions (remove tags, replace tags, put the trigger first) with a dry run that shows the diff
and a backup of every caption changed.

The trigger (the concept's name) is never removed or replaced by a bulk edit.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.dataset.caption_edit import (
    CaptionWriter,
    caption_diff,
    caption_tags,
    put_first,
    remove_tags,
    replace_tags,
    tag_key,
)
from loraforge.dataset.folders import ConceptFolder, concept_folders
from loraforge.dataset.scan import display_path
from loraforge.errors import ForgeError


@dataclass
class Caption:
    concept: ConceptFolder
    path: Path
    text: str


@dataclass
class Edits:
    remove: list[str] = field(default_factory=list)
    replace: dict[str, str] = field(default_factory=dict)
    add_trigger: bool = False

    def __bool__(self) -> bool:
        return bool(self.remove or self.replace or self.add_trigger)

    def apply(self, text: str, trigger: str) -> str:
        if self.remove:
            text = remove_tags(text, self.remove, keep=trigger)
        if self.replace:
            text = replace_tags(text, self.replace, keep=trigger)
        if self.add_trigger:
            text = put_first(text, trigger)
        return text


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
                  ) -> list[Caption]:
    """The caption files of the concepts' images (an unreadable one: a warning, skipped)."""
    captions = []
    for concept in concepts:
        for image in concept.images:
            path = concept.caption_path(image, extension)
            if not path.is_file():
                continue
            try:
                text = path.read_bytes().decode("utf-8-sig")
            except (OSError, UnicodeDecodeError) as exc:
                why = "is not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else \
                    f"cannot be read ({exc.strerror})"
                warnings.append(f"{display_path(path)}: {why}; left as it is")
                continue
            captions.append(Caption(concept, path, text))
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


def edit_captions(dataset_dir: Path, captions: list[Caption], edits: Edits, dry_run: bool,
                  file_mode: int) -> EditResult:
    """Apply `edits` to every caption; write them (with a backup) unless `dry_run`."""
    changed = []
    diff: list[str] = []
    for caption in captions:
        new = edits.apply(caption.text, caption.concept.name)
        if new != caption.text:
            changed.append((caption, new))
            label = f"{caption.concept.folder.name}/{caption.path.name}"
            diff += caption_diff(label, caption.text, new)
    result = EditResult(changed, diff)
    if dry_run or not changed:
        return result
    with CaptionWriter(dataset_dir, "tags", file_mode) as writer:
        for caption, new in changed:
            writer.write(caption.path, caption.text, new)
    result.backup_dir = writer.backup_dir if writer.backed_up else None
    return result


def load(dataset_dir: Path, only: list[str] | None, extension: str,
         ) -> tuple[list[ConceptFolder], list[Caption], list[str]]:
    warnings: list[str] = []
    concepts = concept_folders(dataset_dir, only, warnings)
    return concepts, read_captions(concepts, extension, warnings), warnings
