"""Near-duplicate pictures by perceptual hash (`loraforge dataset dedupe`, `dataset check`).

Each picture (as trained: EXIF orientation applied, transparency on white) gets the usual 64-bit
perceptual hash (pHash, as the imagehash library and most dedupe tools compute it): a 32 x 32
grey copy (Lanczos), its 2-D DCT-II, the 8 x 8 lowest frequencies, one bit per coefficient above
their median. Re-encoding, resizing, light edits and small crops keep it within a few bits;
different pictures differ by about half of the 64. It is computed here in plain Python (64
coefficients, each a sum over the 32 x 32 pixels: about a millisecond) rather than through
imagehash, whose scipy import alone would add a third of a second to every `dataset check`;
`phash` gives the same bits as imagehash's `phash`.

Flat pictures hash alike whatever their colour (every coefficient but the first is zero), and a
recoloured picture keeps its grey structure, so colours count too: a 4 x 4 colour thumbnail
(box-averaged RGB), whose values differ by at most COLOUR_TOLERANCE levels on average between
near-duplicates (a re-saved JPEG or a resized copy: about one; a red and a black picture, or a
red and a blue knight: forty and more).

Each picture is scaled down once, to a 32 x 32 RGB copy (Pillow's `reducing_gap`: a whole-factor
box reduction, then Lanczos: on a 12 MP picture about 15 ms, where a plain Lanczos resize takes
50 and more), and both the hash and the colours are taken from that copy. A picture's hash may
therefore differ from imagehash's by a bit or two of the 64 (the grey is taken after the
reduction, not before); re-saved, resized and slightly cropped copies stay as near.

A group is a kept picture and the pictures of its concept folder near it: within `distance`
bits of its hash, and of about its colours. The same picture in two concept folders teaches two
triggers (a group picture, or the `5_blake` / `10_blake` subset that is repeated more often), so
it is no duplicate. Pictures are taken in the order of the keep rule (the largest, a file
before a link to one, a captioned one, then the first by name): each one not yet in a group
keeps those near it not yet in one, so every picture moved is near the one kept, never only
near another near-duplicate (a camera pan, each frame a few bits from the next, is several
groups, not one). `--move` puts the others, with their captions, into
`<dataset>/.duplicates/<concept folder>/` (never deleted; a hidden folder no scan reads; across
file systems a copy, then a delete).
A kept picture without a caption first gets a copy of the first captioned near-duplicate's
caption (that one still goes with its picture), listed in `.duplicates/copied_captions.txt`:
the undo (moving the files back) deletes those copies, and the dataset is as it was.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import stat
import statistics
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from loraforge.dataset.caption_edit import caption_tags, read_caption
from loraforge.dataset.folders import ConceptFolder
from loraforge.dataset.images import load_image
from loraforge.dataset.scan import (
    caption_stem,
    display_path,
    free_name,
    is_free_name,
    shell_path,
)
from loraforge.errors import ForgeError
from loraforge.fsutil import write_atomic, write_refused

DEFAULT_DISTANCE = 6
#: Most mean difference (of 255 levels) between near-duplicates' colour thumbnails.
COLOUR_TOLERANCE = 24
_THUMBNAIL = 4  # pixels a side of the colour thumbnail
DUPLICATES_DIR = ".duplicates"
RENAMED_MARK = "~"  # a picture moved where its name is taken: name~2.png (scan.free_name)
#: In `.duplicates/`: each caption `--move` copied to a kept picture that had none.
COPIED_CAPTIONS = "copied_captions.txt"
_COPIED_HEADER = (
    "# Captions `loraforge dataset dedupe --move` gave kept pictures that had none: each a copy\n"
    "# of a near-duplicate's caption, which went with its picture into .duplicates/<concept\n"
    "# folder>/. To undo the move: move those files back into the dataset's concept folder\n"
    "# (mv -n), then delete (or empty) each copy listed here, as its line says.\n")


@dataclass
class Picture:
    concept: ConceptFolder
    path: Path
    width: int
    height: int
    hash: int
    colours: bytes  # the colour thumbnail: 4 x 4 RGB pixels, row-major
    captioned: bool


_SIDE, _LOW = 32, 8
_REDUCING_GAP = 2.0  # box-reduce to at least twice _SIDE before the Lanczos step
#: DCT-II basis rows of the 8 lowest frequencies over 32 samples (scale does not matter: the
#: bits compare coefficients with their median).
_BASIS = [[math.cos(math.pi * (2 * n + 1) * k / (2 * _SIDE)) for n in range(_SIDE)]
          for k in range(_LOW)]


def phash(image: Image.Image) -> int:
    """The 64-bit perceptual hash of an image, row-major, first coefficient in the top bit."""
    grey = image.convert("L").resize((_SIDE, _SIDE), Image.Resampling.LANCZOS)
    pixels = list(grey.tobytes())
    rows = [pixels[i * _SIDE:(i + 1) * _SIDE] for i in range(_SIDE)]
    # along each row, then along the columns: low[u][v] = sum_y B[u][y] sum_x B[v][x] p[y][x]
    across = [[sum(b * p for b, p in zip(basis, row, strict=True)) for basis in _BASIS]
              for row in rows]
    low = [[sum(_BASIS[u][y] * across[y][v] for y in range(_SIDE)) for v in range(_LOW)]
           for u in range(_LOW)]
    # rounded: a flat picture's zero coefficients must not differ by float noise
    values = [round(value, 4) for row in low for value in row]
    median = statistics.median(values)
    return sum(1 << (63 - i) for i, value in enumerate(values) if value > median)


def _colour_thumbnail(image: Image.Image) -> bytes:
    """The image's colours: a 4 x 4 RGB copy, each pixel the mean of its area."""
    return image.convert("RGB").resize((_THUMBNAIL, _THUMBNAIL), Image.Resampling.BOX).tobytes()


def _fingerprint(path: Path) -> tuple[int, int, int, bytes] | ForgeError:
    """(width, height, pHash, colour thumbnail), or the error that makes it unreadable; both
    taken from one 32 x 32 copy of the picture."""
    try:
        image = load_image(path)
    except ForgeError as exc:
        return exc
    small = image.resize((_SIDE, _SIDE), Image.Resampling.LANCZOS, reducing_gap=_REDUCING_GAP)
    return image.width, image.height, phash(small), _colour_thumbnail(small)


def hash_pictures(concepts: list[ConceptFolder], extension: str, warnings: list[str],
                  ) -> list[Picture]:
    """Every readable picture of `concepts` with its pHash and colours (an unreadable one: a
    warning)."""
    jobs = [(c, p) for c in concepts for p in c.images]
    workers = max(1, min(4, len(os.sched_getaffinity(0))))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        hashed = list(pool.map(lambda job: _fingerprint(job[1]), jobs))
    pictures = []
    for (concept, path), got in zip(jobs, hashed, strict=True):
        if isinstance(got, ForgeError):
            warnings.append(f"{display_path(path)}: {got.message}; not compared")
            continue
        captioned = _captioned(concept.caption_path(path, extension))
        pictures.append(Picture(concept, path, *got, captioned))
    return pictures


def _captioned(caption: Path) -> bool:
    """Whether a picture's caption holds a tag: an empty or blank one (a line break) is no
    caption, as for `dataset check`; one that cannot be read counts as one (never replaced)."""
    try:
        return bool(caption_tags(read_caption(caption)))
    except FileNotFoundError:
        return False
    except (OSError, UnicodeDecodeError):
        return True


def hash_distance(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def near_duplicate_groups(pictures: list[Picture], distance: int = DEFAULT_DISTANCE,
                          ) -> list[list[Picture]]:
    """Groups of pictures of one concept folder, each the picture to keep first (the first by
    `_keep_order` not yet in a group), then those within `distance` bits of it and of about its
    colours (COLOUR_TOLERANCE) by name; groups in order of their kept picture's path."""
    by_folder: dict[Path, list[Picture]] = {}
    for picture in sorted(pictures, key=_keep_order):
        by_folder.setdefault(picture.concept.folder, []).append(picture)
    groups = [group for folder in by_folder.values()
              for group in _groups_around_kept(folder, distance) if len(group) > 1]
    return sorted(groups, key=lambda g: g[0].path)


def _keep_order(picture: Picture) -> tuple[int, bool, bool, Path]:
    """The largest first, a file before a link to one (keeping a link to a moved file would
    break it), a captioned one, then by name."""
    return (-picture.width * picture.height, picture.path.is_symlink(), not picture.captioned,
            picture.path)


def _groups_around_kept(pictures: list[Picture], distance: int) -> Iterator[list[Picture]]:
    """`pictures` (one concept folder's, in keep order) as groups, singletons included: the
    first not yet grouped, then the others not yet grouped that are near it, by name."""
    import numpy as np

    hashes = np.array([p.hash for p in pictures], dtype=np.uint64)
    colours = np.frombuffer(b"".join(p.colours for p in pictures), dtype=np.uint8,
                            ).reshape(len(pictures), -1).astype(np.int16)
    left = np.arange(len(pictures))
    while left.size:
        keep = left[0]
        close = np.bitwise_count(hashes[left] ^ hashes[keep]) <= distance
        close[close] = (np.abs(colours[left[close]] - colours[keep]).mean(axis=1)
                        <= COLOUR_TOLERANCE)
        yield [pictures[keep], *sorted((pictures[i] for i in left[close][1:]),
                                       key=lambda p: p.path)]
        left = left[~close]


@dataclass(frozen=True)
class Step:
    """One file `--move` handled: `moved` into `.duplicates/`, `copied` (a near-duplicate's
    caption given to the kept picture, which had none), or `gone` (no longer there: another
    `--move` running at the same time moved it; skipped)."""

    source: Path
    dest: Path
    done: str


def caption_donor(group: list[Picture]) -> Picture | None:
    """The near-duplicate whose caption the kept picture (first) gets, because it has none (no
    caption file, or one without a tag): the first captioned one by name; None when no copy is
    due."""
    if group[0].captioned:
        return None
    return next((p for p in group[1:] if p.captioned), None)


def move_extras(dataset_dir: Path, groups: list[list[Picture]], extension: str,
                ) -> Iterator[Step]:
    """Move every picture but the kept one of each group, with its caption, into
    `<dataset>/.duplicates/<concept folder>/` (renamed `name~2.png` where a name is taken),
    yielding each step as it is done; first, a kept picture without a caption gets a copy of
    its `caption_donor`'s (listed in COPIED_CAPTIONS for the undo). ForgeError naming the file
    when one cannot be moved (what was moved before stays moved)."""
    for group in groups:
        donor = caption_donor(group)
        if donor is not None:
            yield _give_caption(Path(dataset_dir), group[0], donor, extension)
        for picture in group[1:]:
            folder = Path(dataset_dir) / DUPLICATES_DIR / picture.concept.folder.name
            dest = free_name(folder / picture.path.name, extension, RENAMED_MARK)
            caption = picture.concept.caption_path(picture.path, extension)
            step = _move(picture.path, dest)
            yield step
            if step.done == "moved" and caption.is_file():
                yield _move(caption, dest.with_name(dest.stem + extension))


def _give_caption(dataset_dir: Path, keep: Picture, donor: Picture, extension: str) -> Step:
    """Copy `donor`'s caption to `keep`'s, listed in COPIED_CAPTIONS first (a stop between the
    two leaves a line for a copy not yet made, which the rerun makes; never a copy unlisted)."""
    source = donor.concept.caption_path(donor.path, extension)
    dest = keep.concept.caption_path(keep.path, extension)
    undo = "empty it (its caption held no tag)" if dest.is_file() else "delete it"
    line = (f"{dest.relative_to(dataset_dir).as_posix()}: copied from "
            f"{source.relative_to(dataset_dir).as_posix()}; to undo, {undo}\n")
    record = dataset_dir / DUPLICATES_DIR / COPIED_CAPTIONS
    try:
        text = source.read_bytes()
        record.parent.mkdir(parents=True, exist_ok=True)
        listed = record.read_text(encoding="utf-8") if record.is_file() else ""
        if line not in listed:
            with open(record, "a", encoding="utf-8") as fh:
                fh.write(("" if listed else _COPIED_HEADER) + line)
        try:
            write_atomic(dest, text, stat.S_IMODE(source.stat().st_mode))
        except OSError:  # no copy made: the list as it was
            if listed:
                write_atomic(record, listed)
            else:
                record.unlink()
            raise
    except OSError as exc:
        if not source.exists():  # another `--move` moved it meanwhile, and gave it
            return Step(source, dest, "gone")
        raise _move_error(source, dest, exc, "cannot be copied to") from None
    return Step(source, dest, "copied")


def left_behind(dataset_dir: Path, concepts: list[ConceptFolder], extension: str,
                ) -> Iterator[Step]:
    """Move the captions a stopped `--move` left behind (it moves a picture, then its caption):
    a caption without a picture in its concept folder whose picture is in
    `.duplicates/<concept folder>/` (as `name.png`, or `name~N.png` where the name was taken)
    without a caption of its own goes beside it. Only where that picture is the one candidate.
    A caption's extension is read in any case (`a.TXT`), as `dataset check` and training
    read it."""
    from loraforge.dataset.images import IMAGE_EXTENSIONS

    for concept in concepts:
        moved = Path(dataset_dir) / DUPLICATES_DIR / concept.folder.name
        if not moved.is_dir():
            continue
        here = {p.stem for p in concept.folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
        captioned = {stem for p in moved.iterdir()
                     if (stem := caption_stem(p.name, extension)) is not None}
        for caption in sorted(concept.folder.iterdir()):
            stem = caption_stem(caption.name, extension)
            if stem is None or stem in here:
                continue
            pictures = [p for p in moved.iterdir()
                        if p.suffix.lower() in IMAGE_EXTENSIONS
                        and is_free_name(p.stem, stem, RENAMED_MARK) and p.stem not in captioned]
            if len(pictures) == 1:
                yield _move(caption, pictures[0].with_suffix(extension))
                captioned.add(pictures[0].stem)


def _move(source: Path, dest: Path) -> Step:
    """Rename `source` to `dest` (a `gone` step when `source` is no longer there: another
    `--move` moved it). ForgeError naming the file, and the folder that refused, otherwise."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _rename(source, dest)
    except OSError as exc:
        if not os.path.lexists(source):
            return Step(source, dest, "gone")
        raise _move_error(source, dest, exc, "cannot be moved to") from None
    return Step(source, dest, "moved")


def _rename(source: Path, dest: Path) -> None:
    """`os.rename`; only onto another file system (EXDEV) a copy, then a delete of `source`,
    the copy removed again when that fails: never a file in both places. A refused rename
    (a read-only, immutable or sticky folder) is an error, not a copy."""
    try:
        os.rename(source, dest)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    try:
        shutil.copy2(source, dest, follow_symlinks=False)
        os.unlink(source)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def _move_error(source: Path, dest: Path, exc: OSError, verb: str) -> ForgeError:
    """What the user sees when `source` cannot be moved (or copied) to `dest`."""
    again = ("then run `loraforge dataset dedupe --move` again: what was moved before stays "
             "moved")
    blocker = next((p for p in (dest.parent.parent, dest.parent)
                    if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return ForgeError(f"{verb} {display_path(dest)}: {display_path(blocker)} is a file, not "
                          "a folder", path=display_path(source),
                          fix=f"rename or move that file away, {again}")
    why = exc.strerror or str(exc)
    folder = next((f for f in (source.parent, dest.parent) if write_refused(f) is not None), None)
    if folder is None and source.parent.stat().st_mode & stat.S_ISVTX:
        return ForgeError(f"{verb} {display_path(dest)}: {why} ({display_path(source.parent)} "
                          "is a shared folder with the sticky bit, where only a file's owner "
                          "may move it)", path=display_path(source),
                          fix=f"ask the file's owner to move it, or copy the dataset into a "
                              f"folder of your own and set dataset.path in forge.toml; {again}")
    folder = folder or source.parent
    return ForgeError(f"{verb} {display_path(dest)}: {why} ({display_path(folder)} refuses "
                      "changes: read-only, immutable or not yours)", path=display_path(source),
                      fix=f"make it writable (chmod u+w {shell_path(folder)}; an immutable "
                          f"folder: chattr -i {shell_path(folder)}, as root; shared storage: ask "
                          "its owner), or copy the dataset into a folder of your own and set "
                          f"dataset.path in forge.toml; {again}")


