"""Scan `master_dataset/<repeats>_<concept>/` into concepts, images and captions.

Rules (the community pre-flight, made explicit):

- Each folder directly in the dataset folder is a concept: `20_blake_character` trains the concept
  `blake_character` with 20 repeats. The repeat count must be a whole number from 1 to 1000.
- A concept folder holds images (png, jpg, jpeg, webp, bmp; any letter case; judged by content, so
  a JPEG named `.png` is fine) and optional same-stem captions (`dataset.caption_extension`,
  `.txt` by default): comma-separated tags, UTF-8 (a BOM is fine); line breaks separate tags too.
- An image without a caption trains on the concept name. So does an image whose caption file is
  empty (with a warning: an empty caption is usually an accident).
- Any other file in a concept folder is an error (a PDF, a GIF, a kohya `.npz` cache, ...), as is
  a sub-folder, a corrupt/truncated/empty image, an animation (several frames, whatever its
  name), two images with the same stem (which one would the caption belong to?) and a caption
  that is not UTF-8.
- Hidden files and folders (`.DS_Store`, `.ipynb_checkpoints`), `Thumbs.db`, `desktop.ini` and
  `__MACOSX/` are operating-system clutter and are skipped silently, wherever they are.
- loraforge's pose maps are not pictures of the concept: `NAME.pose.png` / `NAME.pose.json`
  (what `pose extract` writes beside a picture), and a PNG carrying the pose-map mark (one
  written under another name), are skipped with a warning saying how to move them out; so are
  such files directly in the dataset folder, and a folder holding nothing else (in the dataset
  folder or in a concept folder).
- Files directly in the dataset folder: a `README*` (which `loraforge init` writes) is allowed; an
  image there is an error (it belongs in a concept folder and would silently not be trained); any
  other file is ignored with a warning.
- Warnings (training still works): a caption without an image, an image under 256 px on its short
  side, an empty caption, a concept name with a comma (its trigger would be several tags).

Every problem is collected before anything is raised, so one run shows the user all of them.
Nothing on disk is ever changed by a scan.
"""

from __future__ import annotations

import os
import re
import shlex
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.config import CONFIG_NAME
from loraforge.dataset.caption_edit import caption_tags, tag_key
from loraforge.dataset.images import (
    IMAGE_EXTENSIONS,
    SUPPORTED_KIND_EXTENSION,
    has_pose_mark,
    is_image_kind,
    prepare_decoders,
    probe_image,
    sniff_bytes,
    sniff_file,
)
from loraforge.dataset.tags import split_caption
from loraforge.errors import ForgeError

#: Images with a shorter side than this teach little detail: worth a warning.
MIN_SIDE = 256
#: The repeat count suggested when a folder has none (the community default).
DEFAULT_REPEATS = 10
#: More repeats than this is a typo (the community uses 1 to about 100).
MAX_REPEATS = 1000

_FOLDER_RE = re.compile(r"^([0-9]+)_(.*)$")
_CLUTTER = frozenset({"thumbs.db", "desktop.ini", "__macosx"})
_CAPTION_LIKE = (".txt", ".caption", ".tags", ".cap")
_IMAGE_LIST = "png, jpg, jpeg, webp, bmp"
_RERUN = "then run `loraforge dataset check` again"


# --- the result ---------------------------------------------------------------------------

@dataclass
class ImageRecord:
    """One training image. `tags` are what it trains on (the concept name when uncaptioned):
    its caption split at commas and line breaks, with kohya's `|||` keep-tokens separator left
    inside them for training to find (see `separate_tags`)."""

    path: Path
    caption_path: Path | None
    tags: list[str]
    width: int
    height: int
    captioned: bool = False  # True when the tags come from a non-empty caption file

    @property
    def caption(self) -> str:
        return ", ".join(self.tags)

    @property
    def separate_tags(self) -> list[str]:
        """Its tags one by one, split at `|||` too, as `dataset tags` reads them (and training,
        with the default keep_tokens_separator): `blake ||| smile` is the tags blake and smile."""
        return caption_tags(self.caption)


@dataclass
class Concept:
    """One `<repeats>_<name>` folder."""

    name: str
    folder: Path
    repeats: int
    images: list[ImageRecord] = field(default_factory=list)

    @property
    def folder_name(self) -> str:
        return self.folder.name

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def captioned(self) -> int:
        return sum(1 for image in self.images if image.captioned)

    @property
    def images_x_repeats(self) -> int:
        return len(self.images) * self.repeats

    def tag_frequency(self) -> Counter[str]:
        """How many times each tag occurs in this concept's captions (uncaptioned: its name)."""
        counts: Counter[str] = Counter()
        for image in self.images:
            counts.update(image.separate_tags)
        return counts

    def top_tags(self, n: int = 10) -> list[tuple[str, int]]:
        """The n most frequent tags, most frequent first; ties in order of first appearance
        (so the activation tag, first in every caption, leads)."""
        return self.tag_frequency().most_common(n)

    @property
    def trigger(self) -> str:
        """Its activation tag (see `activation_tag`), the first tags of its captions as the
        candidates when they do not hold its name."""
        leading = Counter(tags[0] for image in self.images if (tags := image.separate_tags))
        return activation_tag(self.name, self.tag_frequency(), leading)


def activation_tag(name: str, tag_counts: Mapping[str, int],
                   leading: Mapping[str, int] | None = None) -> str:
    """The trigger of the concept `name` whose captions hold these tags (counted, in the order
    they were first written: a concept's `tag_frequency`, a LoRA's `ss_tag_frequency`): its
    name, as its captions spell it (compared as `tag_key` compares tags), when they hold it,
    as `dataset check` and `dataset tags --add-trigger` take it; else the most common of the
    `leading` tags (a dataset's: its captions' first tags; a LoRA's: its tags its
    `modelspec.trigger_phrase` names), else its most frequent tag; with no tags at all its
    name (what kohya trains an uncaptioned image on). Ties go to the tag written first.
    `eval`, the LoRA's `modelspec.trigger_phrase` and `generate`'s casting all take a
    concept's trigger from here."""
    spellings = {tag: n for tag, n in tag_counts.items() if tag_key(tag) == tag_key(name)}
    candidates = spellings or leading or tag_counts
    return max(candidates, key=lambda tag: candidates[tag], default=name)


@dataclass
class Dataset:
    root: Path
    concepts: list[Concept]
    warnings: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return sum(c.num_images for c in self.concepts)

    @property
    def images_x_repeats(self) -> int:
        return sum(c.images_x_repeats for c in self.concepts)

    def images(self) -> list[tuple[Concept, ImageRecord]]:
        return [(c, image) for c in self.concepts for image in c.images]

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's `ss_tag_frequency`: `{folder_name: {tag: count}}`."""
        return {c.folder_name: dict(c.tag_frequency()) for c in self.concepts}

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """kohya's `ss_dataset_dirs`: `{folder_name: {"n_repeats": r, "img_count": n}}`."""
        return {c.folder_name: {"n_repeats": c.repeats, "img_count": c.num_images}
                for c in self.concepts}


@dataclass(frozen=True)
class Problem:
    path: Path
    message: str
    fix: str | None = None


class DatasetError(ForgeError):
    """Every problem a scan found, as one user-facing error (warnings kept for the caller)."""

    def __init__(self, root: Path, problems: list[Problem], warnings: list[str],
                 rerun: str = _RERUN) -> None:
        self.problems = problems
        self.warnings = warnings
        if len(problems) == 1:
            only = problems[0]
            super().__init__(only.message, path=display_path(only.path),
                             fix=f"{only.fix}; {rerun}" if only.fix else None)
            return
        lines = [f"{len(problems)} problems (nothing was changed):"]
        for problem in problems:
            lines.append(f"  {display_path(problem.path)}: {problem.message}")
            if problem.fix:
                lines.append(f"    fix: {problem.fix}")
        super().__init__("\n".join(lines), path=display_path(root),
                         fix=f"correct each problem as its fix says, {rerun}")


# --- helpers --------------------------------------------------------------------------------

def display_path(path: Path) -> Path:
    """The path as the user would type it: relative to the working folder when inside it."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(Path.cwd())
    except ValueError:
        return absolute


def shell_path(path: Path) -> str:
    """`display_path`, quoted for a shell command in a fix."""
    return shlex.quote(str(display_path(path)))


def is_clutter(name: str) -> bool:
    """Hidden files and OS clutter that a scan skips silently."""
    return name.startswith(".") or name.lower() in _CLUTTER


def is_pose_output(name: str) -> bool:
    """`NAME.pose.png` or `NAME.pose.json` (the extension in any case): what `loraforge pose
    extract` writes beside a picture, judged by the name alone (pose extract passes over its
    own earlier outputs by it too)."""
    stem, suffix = os.path.splitext(name)
    return stem.endswith(".pose") and suffix.lower() in (".png", ".json")


def caption_stem(name: str, extension: str) -> str | None:
    """The stem of the image whose caption the file `name` is (`a.TXT` is a.png's: the
    extension in any case), or None when it is no caption."""
    ext = extension.lower()
    return name[:-len(ext)] if name.lower().endswith(ext) and len(name) > len(ext) else None


def parse_folder_name(name: str) -> tuple[int, str] | None:
    """`20_blake_character` -> (20, "blake_character"); None without a numeric prefix."""
    match = _FOLDER_RE.match(name)
    if match is None:
        return None
    return int(match.group(1)), match.group(2)


def read_caption(path: Path) -> list[str]:
    """The tags of a caption file; ForgeError when it is not UTF-8 text."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ForgeError(f"cannot be read ({exc.strerror})", path=path,
                         fix="make it readable: chmod a+r FILE") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ForgeError("is UTF-16 text, not UTF-8", path=path,
                         fix=_utf8_fix(path, "UTF-16")) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        kind = sniff_bytes(data[:512])
        if kind is not None and "text" not in kind:
            raise ForgeError(f"is not a caption (it is {kind})", path=path,
                             fix="delete it or move it out of the dataset folder; a caption is "
                                 "a UTF-8 text file of comma-separated tags") from None
        encoding = _guess_encoding(data)
        raise ForgeError(f"is not UTF-8 text (it looks like {encoding})", path=path,
                         fix=_utf8_fix(path, encoding)) from None
    return split_caption(text)


def _guess_encoding(data: bytes) -> str:
    if data.count(b"\x00") > len(data) // 4:
        return "UTF-16"
    try:
        data.decode("cp1252")
    except UnicodeDecodeError:
        return "ISO-8859-1"
    return "WINDOWS-1252"


def _utf8_fix(path: Path, encoding: str) -> str:
    q = shell_path(path)
    return (f"save it as UTF-8 (in your editor: Save As, encoding UTF-8; or: "
            f"iconv -f {encoding} -t UTF-8 {q} > {q}.utf8 && mv {q}.utf8 {q})")


def _safe_probe(path: Path) -> tuple[int, int] | ForgeError | None:
    """The image's size, the error that makes it unusable, or None: a marked pose map (a PNG:
    the scan decodes each image anyway, so reading its chunk headers first costs next to
    nothing, and a pose map is not decoded at all)."""
    if path.suffix.lower() == ".png" and has_pose_mark(path):
        return None
    try:
        return probe_image(path)
    except ForgeError as exc:
        return exc


def _probe_all(paths: list[Path]) -> list[tuple[int, int] | ForgeError | None]:
    if len(paths) < 4:
        return [_safe_probe(p) for p in paths]
    # Pillow releases the GIL while decoding: threads make a large dataset check quick.
    prepare_decoders()
    workers = min(8, os.cpu_count() or 1, len(paths))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_safe_probe, paths))


# --- the scan -------------------------------------------------------------------------------

@dataclass
class _Folder:
    """A concept folder after listing, before probing."""

    path: Path
    name: str
    repeats: int
    images: dict[str, list[Path]] = field(default_factory=dict)  # stem -> images with that stem
    captions: dict[str, Path] = field(default_factory=dict)      # stem -> caption file
    pose_maps: list[Path] = field(default_factory=list)          # skipped: not trained


class _Scanner:
    def __init__(self, root: Path, caption_extension: str, rerun: str) -> None:
        self.root = root
        self.ext = caption_extension
        self.rerun = rerun
        self.problems: list[Problem] = []
        self.warnings: list[tuple[Path, str]] = []

    def problem(self, path: Path, message: str, fix: str | None = None) -> None:
        self.problems.append(Problem(path, message, fix))

    def warn(self, path: Path, message: str) -> None:
        self.warnings.append((path, f"{display_path(path)}: {message}"))

    def entries(self, folder: Path) -> list[Path]:
        try:
            names = sorted(os.listdir(folder))
        except OSError as exc:
            self.problem(folder, f"cannot be listed ({exc.strerror})",
                         "make it readable: chmod a+rx FOLDER")
            return []
        return [folder / name for name in names if not is_clutter(name)]

    # root level

    def run(self) -> Dataset:
        folders = []
        for entry in self.entries(self.root):
            if entry.is_dir():
                # a concept folder of pose maps only is still one: "has no images"
                if parse_folder_name(entry.name) is not None or not self.pose_folder(entry):
                    folders.append(self.concept_folder(entry))
            else:
                self.root_file(entry)
        if not folders:
            self.problem(self.root, "has no concept folders",
                         f"add a folder named <repeats>_<concept> holding that concept's images, "
                         f"e.g. {shell_path(self.root / '10_my_character')}/")
        self.shared_names(folders)
        concepts = self.assemble(folders)
        warnings = [text for _, text in sorted(self.warnings, key=lambda w: w[0].parts)]
        if self.problems:
            problems = sorted(self.problems, key=lambda p: p.path.parts)
            raise DatasetError(self.root, problems, warnings, self.rerun)
        return Dataset(self.root, concepts, warnings)

    def root_file(self, path: Path) -> None:
        if path.name.lower().startswith("readme"):
            return
        if not path.exists():
            self.warn(path, "is a broken link; ignored")
            return
        if is_pose_output(path.name):
            self.warn(path, "is a loraforge pose map, not a picture to train: skipped; "
                      f"{self.move_out([path])}")
            return
        kind = sniff_file(path)
        if path.suffix.lower() in IMAGE_EXTENSIONS or is_image_kind(kind):
            self.problem(path, "is an image outside any concept folder, so it would not be "
                         "trained", f"move it into a concept folder: mv {shell_path(path)} "
                         f"{shell_path(self.root)}/<repeats>_<concept>/")
            return
        hint = f" (it is {kind})" if kind and kind != "text" else ""
        if kind and "archive" in kind:
            hint += f"; if it holds your images, extract it into {display_path(self.root)}/"
        self.warn(path, f"is not a concept folder{hint}; ignored")

    # concept folders

    def concept_folder(self, folder: Path) -> _Folder:
        name = folder.name
        parsed = parse_folder_name(name)
        if parsed is None:
            fixed = f"{DEFAULT_REPEATS}_{name}"
            if name.isdigit():
                fixed = f"{name}_my_concept"
                self.problem(folder, "the folder name has a repeat count but no concept name",
                             "rename it to <repeats>_<concept>: "
                             f"{move_command(folder, folder.with_name(fixed))}")
            else:
                self.problem(folder, "the folder name does not start with a repeat count "
                             "(<repeats>_<concept>)",
                             f"rename it, e.g. for {DEFAULT_REPEATS} repeats: "
                             f"{move_command(folder, folder.with_name(fixed))}")
            repeats, concept = DEFAULT_REPEATS, name
        else:
            repeats, concept = parsed
            if not concept.strip():
                self.problem(folder, "the folder name has no concept name after the repeat count",
                             "rename it: "
                             f"{move_command(folder, folder.with_name(f'{repeats}_my_concept'))}")
                concept = name
            if repeats == 0:
                self.problem(folder, "has 0 repeats, so its images would never be trained",
                             "rename it with at least 1 repeat, e.g. " + move_command(
                                 folder, folder.with_name(f"{DEFAULT_REPEATS}_{concept}")))
            elif repeats > MAX_REPEATS:
                shown = str(repeats) if len(str(repeats)) <= 12 else f"{str(repeats)[:12]}..."
                self.problem(folder, f"has {shown} repeats; at most {MAX_REPEATS} are allowed "
                             "(the community uses 1 to about 100, aiming at 200-400 images x "
                             "repeats per concept)",
                             "rename it with fewer repeats, e.g. " + move_command(
                                 folder, folder.with_name(f"{DEFAULT_REPEATS}_{concept}")))
                repeats = DEFAULT_REPEATS
            if "," in concept:
                plain = "_".join(part.strip() for part in concept.split(",") if part.strip())
                self.warn(folder, f"the concept name `{concept}` holds a comma, so its "
                          "trigger is several caption tags (shuffling can part them, and "
                          "`dataset tag --append` adds it again on every run); rename it "
                          "without commas: "
                          f"{move_command(folder, folder.with_name(f'{repeats}_{plain}'))}")
        result = _Folder(folder, concept, repeats)
        self.list_concept(result)
        return result

    def shared_names(self, folders: list[_Folder]) -> None:
        """`5_x` beside `10_x`: one concept trained from two folders. kohya users do this on
        purpose (a subset repeated more often), so it is a warning, not an error."""
        by_name: dict[str, list[_Folder]] = {}
        for folder in folders:
            by_name.setdefault(folder.name, []).append(folder)
        for name, same in sorted(by_name.items()):
            if len(same) > 1:
                names = " and ".join(f.path.name for f in same)
                self.warn(same[0].path, f"{names} all train the concept `{name}`: one "
                          f"activation tag and one [dataset.concepts.{name}] for both, each "
                          "folder with its own repeats; if they are different characters, "
                          "rename one folder")

    def list_concept(self, folder: _Folder) -> None:
        for entry in self.entries(folder.path):
            stem = caption_stem(entry.name, self.ext)
            if entry.is_dir() and self.pose_folder(entry):
                continue
            if entry.is_dir():
                own = self.root / f"{DEFAULT_REPEATS}_{entry.name}"
                self.problem(entry, "is a folder inside a concept folder; its files would not "
                             "be trained", f"move its files up into {shell_path(folder.path)}/, "
                             f"or make it a concept of its own: {move_command(entry, own)}")
            elif not entry.is_file():
                what = "a broken link" if entry.is_symlink() else "not a regular file"
                self.problem(entry, f"is {what}", "delete it or replace it with the real file")
            elif is_pose_output(entry.name):
                folder.pose_maps.append(entry)
            elif stem is not None:
                other = folder.captions.get(stem)
                if other is not None:  # a.TXT and a.txt: which one describes a.png?
                    self.problem(entry, f"is a second caption of {stem}, beside {other.name}",
                                 f"keep one: merge what you want into one of them and delete "
                                 f"the other (e.g. rm {shell_path(other)})")
                folder.captions[stem] = entry
            elif entry.suffix.lower() in IMAGE_EXTENSIONS:
                folder.images.setdefault(entry.stem, []).append(entry)
            else:
                self.other_file(entry)

    def other_file(self, path: Path) -> None:
        suffix = path.suffix.lower()
        kind = sniff_file(path)
        if suffix == ".npz":
            self.problem(path, "is a kohya latent cache file, not an image or a caption",
                         "delete it (loraforge keeps its own latent cache under the storage "
                         "root's cache/)")
        elif suffix in _CAPTION_LIKE and kind is not None and "text" in kind:
            self.problem(path, f"looks like a caption, but captions here end in {self.ext} "
                         "(dataset.caption_extension)",
                         f"rename it to {path.stem}{self.ext}, or set dataset.caption_extension "
                         f"= \"{suffix}\" in forge.toml")
        elif kind in SUPPORTED_KIND_EXTENSION:
            right = path.with_suffix(SUPPORTED_KIND_EXTENSION[kind])  # keeps its own caption
            if right.exists():
                right = free_name(right, self.ext, "_")
            self.problem(path, f"is {kind}, but its extension is not one of {_IMAGE_LIST}",
                         f"rename it: mv {shell_path(path)} {shell_path(right)}")
        elif is_image_kind(kind):
            self.problem(path, f"is {kind}; dataset images must be {_IMAGE_LIST}",
                         "convert it to PNG or JPEG, or move it out of the dataset folder")
        else:
            what = f" (it is {kind})" if kind else ""
            if path.stat().st_size == 0:
                what = " (it is an empty file)"
            self.problem(path, f"is neither an image nor a {self.ext} caption{what}",
                         f"move it out of the dataset folder: a concept folder holds only images "
                         f"({_IMAGE_LIST}) and {self.ext} captions")

    # probing and assembling

    def assemble(self, folders: list[_Folder]) -> list[Concept]:
        paths = [p for f in folders for stem in sorted(f.images) for p in f.images[stem]]
        sizes = dict(zip(paths, _probe_all(paths), strict=True))
        concepts = []
        for folder in folders:
            concept = Concept(folder.name, folder.path, folder.repeats)
            if not folder.images:
                self.problem(folder.path, "has no images",
                             f"add {_IMAGE_LIST} images to it, or delete the folder")
            for stem in sorted(folder.images):
                same = folder.images[stem]
                if len(same) > 1:
                    others = ", ".join(p.name for p in same[1:])
                    caption = f"{stem}{self.ext}"
                    self.problem(same[0], f"has the same name as {others}, so a caption "
                                 f"{caption} could not tell which image it describes",
                                 f"rename all but one, e.g. mv {shell_path(same[1])} "
                                 f"{shell_path(free_name(same[1], self.ext, '_'))} "
                                 "(and give it its own caption)")
                for path in same:
                    size = sizes[path]
                    if size is None:
                        folder.pose_maps.append(path)
                        continue
                    if isinstance(size, ForgeError):
                        self.problem(path, size.message, size.fix)
                        continue
                    record = self.record(folder, path, folder.captions.get(stem), size)
                    if record is not None:
                        concept.images.append(record)
            self.orphan_captions(folder)
            self.skip_pose_maps(folder)
            concepts.append(concept)
        return concepts

    def skip_pose_maps(self, folder: _Folder) -> None:
        """One warning per concept folder for its pose maps: not trained, and how to move them
        out (`move_out`)."""
        if not folder.pose_maps:
            return
        maps = sorted(folder.pose_maps)
        names = ", ".join(p.name for p in maps[:3]) + (
            f" and {len(maps) - 3} more" if len(maps) > 3 else "")
        self.warn(folder.path, f"{len(maps)} loraforge pose map file(s) ({names}) are not "
                  f"pictures of `{folder.name}`: skipped, not trained; {self.move_out(maps)}")

    def pose_folder(self, folder: Path) -> bool:
        """Whether `folder` holds loraforge pose maps and nothing else (`pose extract -o` into
        the dataset folder): then it is skipped with a warning saying how to move them out."""
        try:
            maps = [folder / name for name in sorted(os.listdir(folder)) if not is_clutter(name)]
        except OSError:
            return False  # said where the folder is listed as a concept or inside one
        if not maps or not all(is_pose_output(p.name) and p.is_file() for p in maps):
            return False
        self.warn(folder, f"holds only loraforge pose maps ({len(maps)} file(s)), not pictures "
                  f"to train: skipped; {self.move_out(maps)} && rmdir {shell_path(folder)}")
        return True

    def move_out(self, maps: list[Path]) -> str:
        """How to move pose maps to a `poses/` folder beside the dataset folder (where
        `generate --pose` can use them)."""
        poses = shell_path(self.root.parent / "poses")
        files = " ".join(shell_path(p) for p in maps)
        them = "it" if len(maps) == 1 else "them"
        return f"move {them} out of the dataset folder: mkdir -p {poses} && mv -n {files} {poses}/"

    def record(self, folder: _Folder, path: Path, caption_path: Path | None,
               size: tuple[int, int]) -> ImageRecord | None:
        width, height = size
        if min(width, height) < MIN_SIDE:
            self.warn(path, f"is only {width}x{height} px (short side under {MIN_SIDE}): it "
                      "is enlarged to its bucket (or, with dataset.bucket_no_upscale = true, "
                      "trains at its own small size) and teaches little detail; use a larger "
                      "image or remove it")
        tags: list[str] = []
        if caption_path is not None:
            try:
                tags = read_caption(caption_path)
            except ForgeError as exc:
                self.problem(caption_path, exc.message, exc.fix)
                return None
            if not tags:
                self.warn(caption_path, f"is empty, so {path.name} trains on the concept name "
                          f"'{folder.name}' alone: add its tags, or delete the empty file")
        captioned = bool(tags)
        return ImageRecord(path, caption_path, tags or [folder.name], width, height, captioned)

    def orphan_captions(self, folder: _Folder) -> None:
        by_name = {p.name: p for paths in folder.images.values() for p in paths}
        lowered = {stem.lower(): stem for stem in folder.images}
        for stem, caption in sorted(folder.captions.items()):
            if stem in folder.images:
                continue
            hint = ""
            if stem in by_name:  # a.png.txt beside a.png
                hint = f"; for {stem} it should be named {Path(stem).stem}{self.ext}"
            elif stem.lower() in lowered:  # A.txt beside a.png: names are case-sensitive
                image = lowered[stem.lower()]
                hint = f"; for {folder.images[image][0].name} it should be named {image}{self.ext}"
            self.warn(caption, f"is a caption without an image (no {stem}.png/.jpg/...), so it "
                      f"is not used{hint}")


def move_command(folder: Path, target: Path) -> str:
    """The shell command that renames `folder` to `target`. Where `target` is a folder already,
    `mv` would put `folder` inside it (where nothing trains): its files join `target` instead,
    none overwritten (`-n`; `rmdir` then fails on any file left behind, which stays)."""
    if target.is_dir():
        return (f"mv -n {shell_path(folder)}/* {shell_path(target)}/ && "
                f"rmdir {shell_path(folder)} (a folder {target.name} is there already: this "
                "moves the files into it)")
    return f"mv {shell_path(folder)} {shell_path(target)}"


def free_name(image: Path, caption_extension: str, mark: str) -> Path:
    """`image`, else `<stem><mark>N<suffix>` for the first N >= 2, whichever no file has, nor
    its caption's name: a rename or a move there overwrites nothing."""
    candidate, n = image, 1
    while candidate.exists() or candidate.with_suffix(caption_extension).exists():
        n += 1
        candidate = image.with_name(f"{image.stem}{mark}{n}{image.suffix}")
    return candidate


def is_free_name(stem: str, original: str, mark: str) -> bool:
    """Whether `stem` is one `free_name` gives a file of stem `original`: `original` itself, or
    `<original><mark>N` (N from 2, no leading zero). A mark in `original` is part of its name:
    `pic~edit~2` is pic~edit's, not pic's."""
    head, found, number = stem.rpartition(mark)
    return stem == original or bool(found and head == original and number.isascii()
                                     and number.isdigit() and number[0] != "0"
                                     and int(number) >= 2)


#: What a project or storage folder holds and a dataset folder never does.
_PROJECT_FILES = (CONFIG_NAME, "master_dataset", "Multi_Concept_Output", "Final_Images")


def scan_dataset(dataset_dir: Path, caption_extension: str = ".txt",
                 rerun: str = _RERUN) -> Dataset:
    """Scan and validate the dataset; raise one ForgeError listing every problem found, each
    fix ending in `rerun` (the command to run once they are mended)."""
    root = Path(dataset_dir)
    if not root.exists():
        raise ForgeError("dataset folder not found", path=display_path(root),
                         fix=f"create it (mkdir -p {shell_path(root)}) and add "
                             "<repeats>_<concept>/ folders of images, set dataset.path in "
                             "forge.toml to where your images are, or run `loraforge init`")
    if not root.is_dir():
        raise ForgeError("is not a folder", path=display_path(root),
                         fix="set dataset.path in forge.toml to the folder holding your "
                             "<repeats>_<concept>/ folders")
    project = [name for name in _PROJECT_FILES if (root / name).exists()]
    if project:  # its advice would rename the project's own folders into concepts
        raise ForgeError(f"is a project or storage folder (it holds {', '.join(project)}), not "
                         "a dataset folder", path=display_path(root),
                         fix="set dataset.path in forge.toml to the folder of your "
                             "<repeats>_<concept>/ folders (master_dataset, beside forge.toml, "
                             "by default)")
    return _Scanner(root, caption_extension, rerun).run()

