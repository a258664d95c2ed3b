"""The concept folders and their images, listed leniently for the commands that curate a dataset
(`dataset tag`, `tags`, `dedupe`): unlike `scan`, a bad file is not an error here; each command
reports what it cannot use as a warning and goes on with the rest.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.dataset.caption_edit import caption_file
from loraforge.dataset.images import IMAGE_EXTENSIONS, has_pose_mark
from loraforge.dataset.scan import (
    caption_stem,
    display_path,
    is_clutter,
    is_pose_output,
    parse_folder_name,
    shell_path,
)
from loraforge.errors import ForgeError


@dataclass
class ConceptFolder:
    """One `<repeats>_<name>` folder: its trigger (the concept name) and its image files."""

    name: str
    folder: Path
    images: list[Path] = field(default_factory=list)
    _captions: dict[str, dict[str, str]] = field(default_factory=dict, repr=False)

    def caption_path(self, image: Path, extension: str) -> Path:
        """The caption file of `image`: its stem + `extension`, the extension in any case (as
        `dataset check` and training read captions: `a.TXT` is a.png's), else the name a new
        caption gets."""
        if extension not in self._captions:
            try:  # the exact spelling last, so that it wins
                names = sorted(os.listdir(self.folder), key=lambda n: n.endswith(extension))
            except OSError:
                names = []
            self._captions[extension] = {stem: n for n in names
                                         if (stem := caption_stem(n, extension)) is not None}
        found = self._captions[extension].get(image.stem)
        return image.with_name(found or image.stem + extension)


#: A caption path of a concept folder's image (its folder, the path).
CaptionPath = tuple[ConceptFolder, Path]


def _one_per_caption(images: list[Path], warn: list[str] | None) -> list[Path]:
    """`images` without those that share their name's stem with another (`x.png` and `x.jpg`
    would share one caption file, so editing it for one would overwrite the other's): both
    are left out, with a warning."""
    by_stem: dict[str, list[Path]] = {}
    for image in images:
        by_stem.setdefault(image.stem, []).append(image)
    for same in by_stem.values():
        if len(same) > 1 and warn is not None:
            names = " and ".join(image.name for image in same)
            warn.append(f"{display_path(same[0].parent)}: {names} would share one caption file;"
                        f" left out (rename one: `loraforge dataset check` lists every such "
                        "pair)")
    return [image for image in images if len(by_stem[image.stem]) == 1]


def _pose_map(path: Path) -> bool:
    return path.suffix.lower() == ".png" and has_pose_mark(path)


def concept_folders(dataset_dir: Path, only: list[str] | None = None,
                    warn: list[str] | None = None) -> list[ConceptFolder]:
    """The concept folders of `dataset_dir` (all, or those named in `only` by concept or folder
    name), each with its images sorted by name (not loraforge's pose maps beside them,
    `NAME.pose.png` or a PNG with its mark, which the scan does not train on either). Folders
    without a repeat count are skipped with a warning appended to `warn`."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise ForgeError("dataset folder not found", path=display_path(root),
                         fix="set dataset.path in forge.toml to the folder holding your "
                             "<repeats>_<concept>/ folders, or run `loraforge init`")
    concepts = []
    for name in sorted(os.listdir(root)):
        folder = root / name
        if is_clutter(name) or not folder.is_dir():
            continue
        parsed = parse_folder_name(name)
        if parsed is None or not parsed[1].strip():
            if warn is not None:
                warn.append(f"{display_path(folder)}: not a <repeats>_<concept> folder; skipped "
                            "(`loraforge dataset check` says how to name it)")
            continue
        images = [folder / entry for entry in sorted(os.listdir(folder))
                  if not is_clutter(entry) and not is_pose_output(entry)
                  and Path(entry).suffix.lower() in IMAGE_EXTENSIONS
                  and (folder / entry).is_file() and not _pose_map(folder / entry)]
        concepts.append(ConceptFolder(parsed[1], folder, _one_per_caption(images, warn)))
    if only:
        chosen = [c for c in concepts if c.name in only or c.folder.name in only]
        known = {c.name for c in concepts} | {c.folder.name for c in concepts}
        unknown = [name for name in only if name not in known]
        if unknown:
            names = ", ".join(c.name for c in concepts) or "none"
            raise ForgeError(f"no concept named {', '.join(map(repr, unknown))} in "
                             f"{display_path(root)} (concepts: {names})",
                             fix=(f"name a concept (e.g. {shlex.quote(concepts[0].name)}) or "
                                  f"its folder (e.g. {shlex.quote(concepts[0].folder.name)}), "
                                  "or leave it out for every concept") if concepts else
                             "add a <repeats>_<concept> folder first")
        concepts = chosen
    if not concepts:
        raise ForgeError("has no concept folders", path=display_path(root),
                         fix=f"add a folder named <repeats>_<concept> holding that concept's "
                             f"images, e.g. {shell_path(root / '10_my_character')}/")
    return concepts


def captions_by_file(dataset_dir: Path, extension: str) -> dict[Path, list[CaptionPath]]:
    """Each caption file of the dataset's images (links followed), and every caption path of
    every concept folder that reaches it: several where links share one file."""
    files: dict[Path, list[CaptionPath]] = {}
    for concept in concept_folders(dataset_dir):
        for image in concept.images:
            path = concept.caption_path(image, extension)
            if path.is_file():
                files.setdefault(caption_file(path), []).append((concept, path))
    return files


def left_out(shared: list[CaptionPath], chosen: list[ConceptFolder],
             ) -> tuple[str, str] | None:
    """(why, the fix) when a command limited to the folders `chosen` must not change the
    caption file that the captions `shared` reach: it is also the caption of a folder left
    out. None: it is not."""
    folders = {concept.folder for concept in chosen}
    others = [path for concept, path in shared if concept.folder not in folders]
    if not others:
        return None
    names = " and ".join(sorted({concept.name for concept, path in shared if path in others}))
    return (f"is one file (a link) with {_joined(others)}, which this command leaves out",
            f"name {names} too, or {_OWN_COPY}")


def trigger_clash(caption: Path, shared: list[CaptionPath]) -> tuple[str, str] | None:
    """(why, the fix) when the caption file of `caption`, which the captions `shared` reach,
    cannot start with one trigger: it is the caption of different concepts. None: of one."""
    names = sorted({concept.name for concept, _ in shared})
    if len(names) < 2:
        return None
    others = [path for _, path in shared if path != caption]
    return (f"is one file (a link) with {_joined(others)}: the caption of concepts "
            f"{' and '.join(names)}, which cannot start with each one's trigger", _OWN_COPY)


_OWN_COPY = "replace the link by a copy so that each folder has a caption of its own"


def _joined(paths: list[Path]) -> str:
    return ", ".join(str(display_path(path)) for path in paths)
