"""What to render, checked completely before any model is loaded.

A *scene* is one prompt with its pose, size, sampler settings, LoRAs and seeds. The command line
describes one scene (every value defaulting to `[generate]` in forge.toml); `--scenes FILE` reads
many from a TOML file of `[[scene]]` tables, each field defaulting to the command line's value:

    [[scene]]
    name = "beach"                  # output files: Final_Images/beach-<seed>.png
    prompt = "2 characters on a beach, (sunset:1.2)"
    negative = "lowres"
    pose = "poses/beach.png"        # or "random"; or an OpenPose .json; relative to this file
    seeds = [1, 2, 3]               # or seed = 1 (with count = 3: seeds 1, 2, 3)
    size = "768x512"
    figures = 2                     # people in a random pose map
    loras = ["blake_v2:0.8", { path = "style.safetensors", weight = 0.5 }]
    steps = 30                      # cfg, sampler, control_scale, clip_skip, count also allowed

Casting: `[[scene.figure]]` tables, one per posed figure, left to right, each with `character`
(a concept of the scene's LoRA, or a training run of one concept), `lora` (its own LoRA file)
and `prompt`; the scene's prompt is then the background's (see generate/casting.py):

    [[scene.figure]]
    character = "blake"
    prompt = "smiling, red scarf"

Every scene is checked (values, files, LoRA headers, poses) before the first image is rendered:
one bad entry names the scene and field, and nothing is rendered.
"""

from __future__ import annotations

import difflib
import logging
import math
import secrets
import shlex
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.errors import ForgeError
from loraforge.generate import loras as lora_files
from loraforge.generate.pnginfo import without_lora_tags
from loraforge.generate.prompts import extract_lora_tags
from loraforge.runs import NAME_PATTERN, OtherProjectsOnly, final_lora
from loraforge.sample_prompts import MAX_SEED
from loraforge.samplers import check_sampler

if TYPE_CHECKING:
    from PIL import Image

    from loraforge.config import Settings
    from loraforge.generate.poses import PoseMap
    from loraforge.generate.regions import Regions

log = logging.getLogger("loraforge.generate")

RANDOM = "random"
DEFAULT_SCENE = "scene"
FINAL_NAME = "final_command_scene"
MIN_SIDE, MAX_SIDE = 64, 4096
SCENE_FIELDS = ("name", "prompt", "negative", "pose", "seed", "seeds", "count", "size",
                "figures", "loras", "steps", "cfg", "sampler", "control_scale", "clip_skip",
                "figure", "background_weight", "region_pad", "region_soften")
FIGURE_FIELDS = ("character", "lora", "prompt")
#: Besides letters, digits and marks of any script, what a concept name (a dataset folder's
#: name after `<repeats>_`) may hold for `--figure "NAME: prompt"` to read NAME as a character.
_NAME_PUNCTUATION = frozenset(" _.'-")
#: The longest stem, in characters and in UTF-8 bytes: `<stem>-<seed>-v<n>.masks.png` stays
#: well under the 255 bytes a Linux file name may have.
STEM_CHARS, STEM_BYTES = 80, 160


@dataclass
class Options:
    """Values given on the command line (None: use the config's)."""

    prompt: str | None = None
    negative: str | None = None
    loras: list[str] | None = None
    pose: str | None = None
    figures: int | None = None
    seed: int | None = None
    count: int | None = None
    steps: int | None = None
    cfg: float | None = None
    sampler: str | None = None
    size: str | None = None
    control_scale: float | None = None
    clip_skip: int | None = None
    name: str | None = None
    scenes: Path | None = None
    cast: list[str] | None = None  # --figure "CHARACTER: prompt", one per figure
    source: Path | None = None  # --from IMAGE.png: the scene recorded in a generated image
    background_weight: float | None = None


@dataclass(frozen=True)
class Value:
    """A setting and where it came from (for error messages)."""

    value: Any
    origin: str  # e.g. "--steps", "generate.steps in forge.toml", 'scene "beach": steps'
    base: Path  # relative paths in this value resolve against this folder


@dataclass
class PoseSource:
    """Where a scene's pose map comes from: a prepared file, or random figures per seed."""

    path: Path | None
    figures: int
    image: Image.Image | None = None  # the file's map at the generation size
    reason: str = ""
    keypoints: PoseMap | None = None  # the figures, when given as OpenPose JSON

    def pose_for(self, seed: int, width: int, height: int) -> PoseMap | None:
        """The figures' keypoints (None for a drawn pose map file)."""
        from loraforge.generate.poses import random_pose

        if self.keypoints is not None:
            return self.keypoints
        if self.image is None:
            return random_pose(self.figures, width, height, seed)
        return None

    def record(self) -> str | dict[str, Any]:
        """The pose as a scene's `pose` field gives it again: a file, the keypoints, random."""
        if self.keypoints is not None:
            return self.keypoints.to_dict()
        return str(self.path) if self.path is not None else RANDOM

    def image_for(self, seed: int, width: int, height: int) -> Image.Image:
        from loraforge.generate.poses import draw_pose, random_pose

        if self.image is not None:
            return self.image
        return draw_pose(random_pose(self.figures, width, height, seed))

    def describe(self) -> str:
        if self.path is not None:
            return str(self.path)
        if self.keypoints is not None:
            return "OpenPose keypoints given in the scene"
        noun = "figure" if self.figures == 1 else "figures"
        return f"random ({self.figures} {noun}, seeded by the image seed)"


@dataclass
class Job:
    """One scene, resolved and checked: everything rendering needs except the models."""

    name: str
    stem: str
    prompt: str  # as written (recorded in PNG info)
    text: str  # what the text encoder sees (<lora:...> tags removed)
    negative: str
    negative_text: str
    seeds: list[int]
    width: int
    height: int
    steps: int
    cfg: float
    sampler: str
    control_scale: float
    clip_skip: int
    loras: list[lora_files.LoraUse]
    pose: PoseSource
    notes: list[str] = field(default_factory=list)
    cast: Cast | None = None
    #: The seed (or seeds list) to give in place of a -1 to render the same images again
    #: ("": none drawn at random).
    drawn_seeds: str = ""

    @property
    def all_loras(self) -> list[lora_files.LoraUse]:
        """The scene's LoRAs, then the figures' own."""
        own = [f.lora for f in self.cast.figures if f.lora] if self.cast else []
        return [*self.loras, *own]


@dataclass(frozen=True)
class Figure:
    """One cast figure."""

    prompt: str  # as written
    text: str  # what its slot of the text encoder sees: the character's trigger, then prompt
    character: str | None
    lora: lora_files.LoraUse | None  # its own LoRA, acting in its region only


@dataclass
class Cast:
    """A scene's figures, left to right, and how their regions are drawn."""

    figures: list[Figure]
    background_weight: float
    pad: float
    soften: float

    def regions(self, pose: PoseSource, seed: int, width: int, height: int,
                where: str = "the pose") -> Regions:
        from loraforge.generate.regions import box_regions, figure_regions, map_boxes

        keypoints = pose.pose_for(seed, width, height)
        if keypoints is not None:
            regions = figure_regions(keypoints, width, height, self.pad, self.soften, where)
        else:  # a drawn pose map: the figures' boxes from its ink
            boxes = map_boxes(pose.image_for(seed, width, height))
            regions = box_regions(boxes, width, height, self.pad, self.soften, where)
        if regions.count == len(self.figures):
            return regions
        found = f"{where} has {regions.count} figure{'' if regions.count == 1 else 's'}"
        fix = "give one [[scene.figure]] (or --figure) per posed figure, left to right"
        if keypoints is None and regions.count < len(self.figures):
            found += (" (in a drawn pose map, figures that touch or share columns count as one: "
                      "a black column must part them)")
            json = pose.path.with_suffix(".json") if pose.path is not None else None
            given = (str(json) if json is not None and json.is_file() else
                     "its OpenPose JSON (a pose editor's export; `pose extract` and `pose random "
                     "--pose-json` write one beside the map)")
            fix = (f"if the map draws more figures, pose with {given} instead, which keeps the "
                   f"figures apart, or move them apart in the map; else {fix}")
        raise ForgeError(f"{found}, the scene casts {len(self.figures)}", path=pose.path,
                         fix=fix)


def safe_stem(name: str) -> str:
    """A file-name-safe version of a scene name: its letters, digits and marks in any script
    (NFC), `.`, `_`, `+` and `-`; every other run (spaces, path separators, control
    and invisible characters, the characters Windows, A1111 and ComfyUI refuse) becomes one
    `_`; no leading or trailing `.`, `_`, `-`; at most STEM_CHARS characters, STEM_BYTES bytes."""
    kept = "".join(char if char in "._+-" or unicodedata.category(char)[0] in "LMN" else " "
                   for char in unicodedata.normalize("NFC", name))
    stem = "_".join(kept.split())[:STEM_CHARS]
    while len(stem.encode("utf-8")) > STEM_BYTES:
        stem = stem[:-1]
    return stem.strip("._-") or DEFAULT_SCENE


# --- typed fields ------------------------------------------------------------------------------

def _err(value: Value, message: str, fix: str | None = None) -> ForgeError:
    return ForgeError(f"{value.origin}: {message}", fix=fix)


def _int(value: Value, low: int, high: int, fix: str) -> int:
    v = value.value
    if isinstance(v, bool) or not isinstance(v, int | float) or (
            isinstance(v, float) and (not math.isfinite(v) or v != int(v))):
        raise _err(value, f"must be a whole number, got {v!r}", fix)
    if not low <= int(v) <= high:
        raise _err(value, f"must be from {low} to {high}, got {int(v)}", fix)
    return int(v)


def _float(value: Value, low: float, high: float, fix: str) -> float:
    v = value.value
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise _err(value, f"must be a number, got {v!r}", fix)
    if not low <= float(v) <= high:
        raise _err(value, f"must be from {low:g} to {high:g}, got {v}", fix)
    return float(v)


def _text(value: Value) -> str:
    if not isinstance(value.value, str):
        raise _err(value, f"must be text, got {value.value!r}", 'write it in quotes: "..."')
    return value.value.strip()


def round_size(width: int, height: int) -> tuple[int, int]:
    """To the nearest multiples of 8 (the VAE's scale factor; halves round up), at least 8."""
    return max(8, (width + 4) // 8 * 8), max(8, (height + 4) // 8 * 8)


def _size(value: Value, notes: list[str]) -> tuple[int, int]:
    from loraforge.generate.poses import parse_size

    v = value.value
    fix = f"write it like 768x576 (each side {MIN_SIDE} to {MAX_SIDE} px)"
    if isinstance(v, tuple):
        width, height = v
    elif isinstance(v, str):
        try:
            width, height = parse_size(v, MAX_SIDE)
        except ForgeError as exc:
            raise _err(value, exc.message, fix) from None
    else:
        raise _err(value, f"must be text like \"768x576\", got {v!r}", fix)
    if width < 1 or height < 1:
        raise _err(value, f"width and height must be positive, got {width}x{height}", fix)
    rounded = round_size(width, height)
    if rounded != (width, height):
        notes.append(f"size {width}x{height} rounded to {rounded[0]}x{rounded[1]} "
                     "(multiples of 8)")
    for side in rounded:
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise _err(value, f"{rounded[0]}x{rounded[1]} is out of range: each side must be "
                              f"{MIN_SIDE} to {MAX_SIDE} px", fix)
    return rounded


def _seeds(seed: Value, seeds: Value | None, count: Value) -> tuple[list[int], str]:
    """The scene's seeds, and what to give in place of its -1 to render them again ("": no
    seed drawn at random)."""
    fix = "use whole numbers from 0 (or -1 for a random seed)"
    n = _int(count, 1, 1000, "use a count from 1 to 1000")
    if seeds is not None:
        items = seeds.value
        if not isinstance(items, list) or not items:
            raise _err(seeds, f"must be a non-empty list of seeds, got {items!r}",
                       "write it like seeds = [1, 2, 3]")
        asked = [_int(Value(s, seeds.origin, seeds.base), -1, MAX_SEED, fix) for s in items]
        found = [secrets.randbelow(2**32) if s == -1 else s for s in asked]
        if len(set(found)) != len(found):
            raise _err(seeds, f"lists a seed twice ({found}): the images would overwrite "
                              "each other", "list each seed once")
        return found, str(found) if -1 in asked else ""
    first = _int(seed, -1, MAX_SEED, fix)
    drawn = first == -1
    if drawn:
        first = secrets.randbelow(2**32)
    if first + n - 1 > MAX_SEED:
        raise _err(seed, "seed + count is too large", fix)
    return [first + i for i in range(n)], str(first) if drawn else ""


# --- poses -----------------------------------------------------------------------------------

class PoseCache:
    """Pose map files read, checked and letterboxed once per (file, size).

    A picture that is not a pose map (a photo, a drawing) goes to ``from_photo``, which returns
    the people in it (`generate.pose_from_photo = "extract"`); without one it is refused.
    """

    def __init__(self, warn: Callable[[str], None],
                 from_photo: Callable[[Path, Image.Image], PoseMap] | None) -> None:
        self.warn = warn
        self.from_photo = from_photo
        self.images: dict[tuple[Path, int, int], Image.Image] = {}
        self.people: dict[Path, PoseMap] = {}  # extracted from a picture, at its size
        self.keypoints: dict[tuple[Path, int, int], PoseMap] = {}  # fitted to a scene's size

    def load(self, path: Path, width: int, height: int) -> Image.Image:
        key = (path, width, height)
        if key not in self.images:
            self.images[key] = self._load(path, width, height)
        return self.images[key]

    def _load(self, path: Path, width: int, height: int) -> Image.Image:
        from loraforge.dataset.images import load_image
        from loraforge.generate import poses
        from loraforge.generate.extract import DECODE_BOX

        if path.suffix.lower() == ".json":
            pose = poses.fit_pose(poses.read_pose_json(path), width, height)
            image = poses.draw_figures(pose, path, "add the figures' keypoints (export the pose "
                                       "again from the editor), or use --pose random")
            self.keypoints[(path, width, height)] = pose
            return image
        # Only ever scaled down, onto the scene or into the detector's input: a huge JPEG
        # photo is decoded at a fraction of its size.
        image = load_image(path, fit=(max(width, DECODE_BOX[0]), max(height, DECODE_BOX[1])))
        ok, reason = poses.looks_like_pose_map(image)
        if not ok and reason.startswith("blank"):
            raise ForgeError(f"is not usable as a pose map: {reason}", path=path,
                             fix="draw the figures (`loraforge pose random` or a pose editor), "
                                 "or use --pose random")
        if not ok:
            if self.from_photo is None:
                raise ForgeError(f"is not a pose map ({reason}), and generate.pose_from_photo "
                                 "is \"refuse\"", path=path,
                                 fix=f"extract its people first (`loraforge pose extract {path}`"
                                     f", then --pose {path.with_name(path.stem + '.pose.png')})"
                                     ", or set "
                                     "generate.pose_from_photo = \"extract\"")
            if path not in self.people:
                self.people[path] = self.from_photo(path, image)
                n = len(self.people[path].people)
                self.warn(f"{path}: {reason}; extracted {n} {'person' if n == 1 else 'people'} "
                          "from it with the pose detector (models.detector)")
            fitted = poses.fit_pose(self.people[path], width, height)
            self.keypoints[(path, width, height)] = fitted
            return poses.draw_pose(fitted)
        if image.size != (width, height):
            if abs(image.width / image.height - width / height) > 0.01:
                self.warn(f"{path}: {image.width}x{image.height} letterboxed onto {width}x"
                          f"{height} (black bars keep its aspect)")
            image = poses.letterbox(image, width, height)
        return image


def _pose_path(raw: str, base: Path) -> Path:
    """A scene's pose file as written (`~` expanded; relative: to `base`, the scenes file's or
    the image's folder)."""
    path = Path(raw.strip()).expanduser()
    return path if path.is_absolute() else base / path


def _pose(value: Value, figures: Value, size: Value, width: int, height: int, first_seed: int,
          cache: PoseCache, optional: bool) -> PoseSource:
    from loraforge.generate.poses import PoseMap, draw_pose, fit_pose, max_figures, random_pose

    count = _figure_count(figures)
    raw = value.value
    if isinstance(raw, dict):  # keypoints inline (an image's recorded scene)
        try:
            keypoints = fit_pose(PoseMap.from_dict(raw), width, height)
        except ForgeError as exc:
            raise _err(value, f"the pose {exc.message}", exc.fix) from None
        return PoseSource(None, count, draw_pose(keypoints), keypoints=keypoints)
    if raw is not None and not isinstance(raw, str):
        raise _err(value, f"must be a file name or \"random\", got {raw!r}")
    path: Path | None = None
    reason = ""
    if raw is not None and raw.strip() and raw.strip().lower() != RANDOM:
        path = _pose_path(raw, value.base)
        if not path.exists() and optional:
            reason = f"no pose map at {path}: drawing random figures"
            path = None
        elif not path.exists() and (path, width, height) not in cache.images:
            raise ForgeError(f"{value.origin}: pose map not found", path=path,
                             fix="check the path, or use \"random\" for generated figures")
    if path is not None:
        try:
            image = cache.load(path, width, height)
        except ForgeError as exc:
            raise ForgeError(f"{value.origin}: {exc.message}", path=exc.path or path,
                             fix=exc.fix) from None
        return PoseSource(path, count, image, reason,
                          cache.keypoints.get((path, width, height)))
    try:
        random_pose(count, width, height, first_seed)
    except ForgeError as exc:  # blame the size when no figure fits it at all
        blamed = size if max_figures(width, height) == 0 else figures
        raise ForgeError(f"{blamed.origin}: {exc.message}", fix=exc.fix) from None
    return PoseSource(None, count, None, reason)


# --- LoRAs -----------------------------------------------------------------------------------

class LoraResolver:
    """Turns LoRA references into checked files (each file read once), and finds the default."""

    def __init__(self, settings: Settings, widths: lora_files.BaseWidths) -> None:
        self.settings = settings
        self.widths = widths
        self.files: dict[Path, lora_files.LoraFile] = {}
        self._default: lora_files.LoraFile | None = None
        self._default_said = ""  # which run it is (`runs.Chosen.said`)

    def file(self, path: Path) -> lora_files.LoraFile:
        key = path.resolve()
        if key not in self.files:
            self.files[key] = lora_files.inspect_lora(key, self.widths)
        return self.files[key]

    def default(self) -> lora_files.LoraFile:
        if self._default is None:
            chosen = lora_files.newest_finished_lora(self.settings.runs_dir,
                                                     self.settings.base_dir)
            self._default = self.file(final_lora(chosen.run_dir))
            self._default_said = chosen.said
        return self._default

    def default_used(self, jobs: list[Job]) -> str | None:
        """Which run the default LoRA is, when a scene of `jobs` uses it (None: none does)."""
        used = self._default is not None and any(
            use.lora is self._default for job in jobs for use in job.all_loras)
        return self._default_said if used else None

    def ref(self, ref: str, weight: float | None, origin: str, base: Path,
            text: str | None = None) -> lora_files.LoraUse:
        """The LoRA `ref` names (`text`: as written, weight included)."""
        default_weight = self.settings.config.generate.lora_weight
        path = None
        try:
            path = lora_files.resolve_lora(ref, self.settings.runs_dir, base)
            lora = self.file(path)
        except ForgeError as exc:
            if path is None:  # no such file: perhaps FILE:abc, a weight that is not a number
                self._check_weight_text(text or ref, origin, base)
            raise ForgeError(f"{origin}: {exc.message}", path=exc.path, fix=exc.fix) from None
        weight = default_weight if weight is None else lora_files.check_weight(weight, origin)
        return lora_files.LoraUse(lora, weight)

    def _check_weight_text(self, ref: str, origin: str, base: Path) -> None:
        """`FILE:abc` names an existing LoRA with a weight that is not a number: say that,
        rather than that no file `FILE:abc` exists."""
        for index in (i for i, char in enumerate(ref) if char == ":" and i > 0):
            head, tail = ref[:index], ref[index + 1:]
            try:
                lora_files.resolve_lora(head, self.settings.runs_dir, base)
            except ForgeError:
                continue
            raise ForgeError(f"{origin}: the LoRA weight `{tail}` of {head} is not a number",
                             fix=f"write it as {head}:0.8")

    def items(self, value: Value) -> list[lora_files.LoraUse] | None:
        """The LoRAs a `loras` value names; None for none given, [] for "none"."""
        raw = value.value
        if raw is None:
            return None
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list):
            raise _err(value, f"must be a list of LoRAs, got {raw!r}",
                       'write it like loras = ["run_name:0.8", "file.safetensors"]')
        uses: list[lora_files.LoraUse] = []
        said_none = False
        for item in raw:
            if isinstance(item, str):
                ref, weight = lora_files.split_weight(item)
            elif isinstance(item, dict):
                unknown = set(item) - {"path", "name", "weight"}
                ref = item.get("path", item.get("name"))
                weight = item.get("weight")
                if unknown or not isinstance(ref, str) or (
                        weight is not None and (isinstance(weight, bool)
                                                or not isinstance(weight, int | float))):
                    raise _err(value, f"bad LoRA entry {item!r}",
                               'write { path = "file.safetensors", weight = 0.8 }')
            else:
                raise _err(value, f"bad LoRA entry {item!r}",
                           'write "file.safetensors:0.8" or { path = "...", weight = 0.8 }')
            if ref.strip().lower() == lora_files.NO_LORA:
                said_none = True
                continue
            uses.append(self.ref(ref, None if weight is None else float(weight), value.origin,
                                 value.base, item if isinstance(item, str) else None))
        if said_none and uses:
            raise _err(value, f"names `{lora_files.NO_LORA}` (the base model alone) and LoRAs "
                              "too", f"leave out `{lora_files.NO_LORA}` to apply the LoRAs, or "
                                     "give it alone for none")
        return uses


def _merge_tags(uses: list[lora_files.LoraUse], tagged: list[lora_files.LoraUse],
                ) -> list[lora_files.LoraUse]:
    """Prompt tags add LoRAs; a tag naming a LoRA already used sets its weight."""
    result = list(uses)
    for use in tagged:
        same = [i for i, u in enumerate(result) if u.lora.path == use.lora.path]
        if same:
            result[same[0]] = use
        else:
            result.append(use)
    return result


def _unique(uses: list[lora_files.LoraUse], origin: str) -> list[lora_files.LoraUse]:
    seen: set[Path] = set()
    for use in uses:
        if use.lora.path in seen:
            raise ForgeError(f"{origin}: the LoRA {use.lora.path} is listed twice",
                             fix="list each LoRA once, with the weight you want")
        seen.add(use.lora.path)
    return uses


# --- a scene -----------------------------------------------------------------------------------

def resolve_job(values: dict[str, Value], settings: Settings, resolver: LoraResolver,
                poses: PoseCache) -> Job:
    """Check every field of one scene; ForgeError naming the field's origin when one is bad."""
    notes: list[str] = []
    name = _text(values["name"]) or DEFAULT_SCENE
    if "/" in name or "\\" in name:
        raise _err(values["name"], f"{name!r} is a path; a scene's name only names its files, "
                                   f"which are written to {settings.images_dir}",
                   "give a plain name without / (such as beach)")
    prompt = _text(values["prompt"])
    negative = _text(values["negative"])
    width, height = _size(values["size"], notes)
    steps = _int(values["steps"], 1, 500, "use 1 to 500 steps")
    cfg = _float(values["cfg"], 0, 50, "use a CFG scale from 0 to 50 (7 is usual)")
    control = _float(values["control_scale"], 0, 5, "use 0 to 5 (1 is usual)")
    sampler_value = values["sampler"]
    if not isinstance(sampler_value.value, str):
        raise _err(sampler_value, f"must be a sampler name, got {sampler_value.value!r}")
    sampler = check_sampler(sampler_value.value, sampler_value.origin)
    seeds, drawn = _seeds(values["seed"], values.get("seeds"), values["count"])
    entries = _figure_entries(values.get("figure"))
    figures = values["figures"]
    if entries:
        figures = _cast_count(figures, len(entries), values["figure"])
    pose = _pose(values["pose"], figures, values["size"], width, height, seeds[0], poses,
                 optional=values["pose"].origin.startswith("generate.pose_map"))
    if pose.reason:
        notes.append(pose.reason)

    tagged: list[lora_files.LoraUse] = []
    texts = []
    for key, text in (("prompt", prompt), ("negative", negative)):
        try:
            clean, tags = extract_lora_tags(text)
        except ValueError as exc:
            raise _err(values[key], str(exc), "write tags like <lora:name:0.8>") from None
        texts.append(clean)
        for tag in tags:
            tagged.append(resolver.ref(tag.name, tag.weight, f"{values[key].origin} "
                                       f"{tag.text}", values[key].base))
    explicit = resolver.items(values["loras"])
    said_none = explicit == []  # `--lora none`: no LoRA unless a figure names its own
    wearing = any(item.get("character", "").strip() or item.get("lora", "").strip()
                  or "<lora:" in item.get("prompt", "") for _, item in entries)
    if explicit is None and wearing:
        explicit = []  # the characters say which LoRAs act (`_cast`)
    elif explicit is None:
        if tagged:
            try:
                explicit = [lora_files.LoraUse(resolver.default(),
                                               settings.config.generate.lora_weight)]
            except ForgeError:
                explicit = []
        else:
            explicit = [lora_files.LoraUse(resolver.default(),
                                           settings.config.generate.lora_weight)]
    uses = _merge_tags(_unique(explicit, values["loras"].origin), tagged)
    cast = None
    if not entries:  # checked all the same: a wrong value is a mistake with or without figures
        _cast_settings(values)
    if entries:
        cast, uses = _cast(entries, values, settings, resolver, uses, not said_none)
        cast.regions(pose, seeds[0], width, height, f"{values['pose'].origin} "
                                                    f"({pose.describe()})")

    own = [f.lora for f in cast.figures if f.lora] if cast else []
    clip_value = values.get("clip_skip")
    if clip_value is not None and clip_value.value is not None:
        clip_skip = _int(clip_value, 1, 12, "use a clip skip from 1 to 12 (2 is usual for "
                                            "anime models)")
    else:
        trained = [(u.lora, u.lora.clip_skip) for u in [*uses, *own]
                   if u.lora.clip_skip is not None]
        if trained:
            clip_skip = trained[0][1] or 1
            others = {c for _, c in trained if c != clip_skip}
            if others:
                notes.append(f"the LoRAs were trained with different clip skips; using "
                             f"{clip_skip} (from {trained[0][0].path.name})")
        else:
            clip_skip = settings.config.train.clip_skip
    return Job(name=name, stem=safe_stem(name), prompt=prompt, text=texts[0], negative=negative,
               negative_text=texts[1], seeds=seeds, width=width, height=height, steps=steps,
               cfg=cfg, sampler=sampler, control_scale=control, clip_skip=clip_skip, loras=uses,
               pose=pose, notes=notes, cast=cast, drawn_seeds=drawn)


# --- casting -----------------------------------------------------------------------------------

def _figure_entries(value: Value | None) -> list[tuple[Value, dict[str, Any]]]:
    """The `[[scene.figure]]` tables (or --figure values), checked for shape."""
    if value is None or value.value is None:
        return []
    raw = value.value
    fix = ('write one table per figure: [[scene.figure]] with character = "...", lora = '
           '"file.safetensors:0.8" and/or prompt = "..."')
    if not isinstance(raw, list) or not raw:
        raise _err(value, f"must be [[scene.figure]] tables, got {raw!r}", fix)
    entries = []
    for index, item in enumerate(raw):
        where = Value(item, f"{value.origin} #{index + 1}", value.base)
        if not isinstance(item, dict):
            raise _err(where, f"must be a table, got {item!r}", fix)
        unknown = [key for key in item if key not in FIGURE_FIELDS]
        if unknown:
            raise _err(where, f"unknown field `{unknown[0]}`",
                       "figure fields: " + ", ".join(FIGURE_FIELDS))
        for key in FIGURE_FIELDS:
            if key in item and not isinstance(item[key], str):
                raise _err(where, f"`{key}` must be text, got {item[key]!r}", fix)
        entries.append((where, item))
    return entries


def _posed_figures(figures: Value, job: Job) -> None:
    """A figure count the scene gives beside a pose file counts nothing (the file's figures
    are drawn as they are): refused when the file has another number of figures (`--figures`
    beside a scenes file is the count of its scenes' random poses, not checked). A cast is
    checked against the pose by `Cast.regions`; `generate.figures` is for random poses. An
    image's recorded scene (`--from`) is not checked: its count is the one asked for then."""
    from loraforge.generate.regions import map_boxes

    pose = job.pose
    if job.cast is not None or pose.path is None or pose.image is None or \
            figures.origin.startswith("generate.figures"):
        return
    drawn = len(pose.keypoints.people) if pose.keypoints is not None else \
        len(map_boxes(pose.image))
    if drawn == pose.figures:
        return
    counted = "" if pose.keypoints is not None or drawn > pose.figures else (
        " (in a drawn pose map, figures that touch or share columns count as one)")
    command = figures.origin.startswith("--figures")
    field = "--figures" if command else "`figures`"
    random = "--pose random" if command else 'pose = "random"'
    asked = f"{pose.figures} figure{'' if pose.figures == 1 else 's'}"
    raise ForgeError(f"{figures.origin}: asks for {asked}, but the pose {pose.path} has "
                     f"{drawn}{counted}; a figure count only counts the people of a random "
                     "pose", fix=f"leave {field} out (the pose's figures are drawn as they "
                                 f"are), or pick a pose of {asked} (or {random})")


def _figure_count(figures: Value) -> int:
    """The number of people in a random pose map. Tables there are a cast written
    `[[scene.figures]]` (or `[scene.figures]`): say where a cast goes."""
    raw = figures.value
    tables = [raw] if isinstance(raw, dict) else raw if isinstance(raw, list) else []
    if tables and all(isinstance(item, dict) for item in tables):
        raise _err(figures, "is the number of people in a random pose map (figures = 2), "
                            f"but holds {len(tables)} table{'' if len(tables) == 1 else 's'}: "
                            "a cast is written [[scene.figure]], one table per figure",
                   "rename each [[scene.figures]] to [[scene.figure]]")
    return _int(figures, 1, 16, "use 1 to 16 figures")


def _cast_count(figures: Value, cast: int, figure: Value) -> Value:
    """Random figures: as many as are cast (a figure count given for the scene must agree),
    named after the figures cast."""
    if not figures.origin.startswith("generate.figures") and \
            _figure_count(figures) != cast:
        raise _err(figures, f"asks for {figures.value} figures, the scene casts {cast}",
                   "cast one figure per posed figure (or leave the figure count out)")
    return Value(cast, f"{figure.origin} ({cast} figures cast)", figure.base)


def _character(name: str, where: Value, settings: Settings, resolver: LoraResolver,
               uses: list[lora_files.LoraUse], use_default: bool,
               ) -> tuple[str, lora_files.LoraUse | None, lora_files.LoraUse | None]:
    """(trigger, its own LoRA, a shared LoRA it needs) for a character: a concept of the
    scene's LoRAs (else, unless the scene said `none`, of this project's newest finished
    run's), or a training run of that name."""
    weight = settings.config.generate.lora_weight
    for use in uses:
        if name in use.lora.concepts:
            return use.lora.concepts[name], None, None
    known: list[str] = [c for use in uses for c in use.lora.concepts]
    default = None
    unavailable = ""  # the finished runs are other projects': their concepts are not looked at
    if use_default:
        try:
            default = resolver.default()
        except OtherProjectsOnly as exc:
            unavailable = f" ({exc.message.removeprefix('no LoRA given, and ')})"
        except ForgeError:
            pass  # no finished run: the concepts listed below say so
    if default is not None and name in default.concepts:
        return default.concepts[name], None, lora_files.LoraUse(default, weight)
    if default is not None:
        known += [c for c in default.concepts if c not in known]
    if NAME_PATTERN.match(name) and (settings.runs_dir / name).is_dir():  # not `../x`
        own = resolver.ref(name, None, where.origin, where.base)
        acting = {u.lora.path for u in uses} | ({default.path} if default is not None else set())
        return _run_trigger(name, own.lora, where, own.lora.path in acting), own, None
    runs = sorted(p.name for p in settings.runs_dir.glob("*") if p.is_dir()) \
        if settings.runs_dir.is_dir() else []
    close = difflib.get_close_matches(name, known + runs, n=1, cutoff=0.6)
    hint = f" (did you mean `{close[0]}`?)" if close else ""
    listed = f"concepts: {', '.join(known) or 'none'}; runs: {', '.join(runs) or 'none'}"
    fix = (f"name a concept of the scene's LoRA or a training run ({listed}), or give the "
           "figure its own ")
    if where.origin.startswith("--figure"):
        fix += ("LoRA instead: --figure \"<lora:FILE:0.8> prompt\"; if the words before the "
                f"colon are prompt, start with a colon: --figure \": {name}: ...\"")
    else:
        fix += "lora = \"FILE.safetensors\""
    raise _err(where, f"unknown character `{name}`{hint}{unavailable}", fix)


def _run_trigger(name: str, lora: lora_files.LoraFile, where: Value, acting: bool) -> str:
    """The trigger of a training run named as a character: its one concept's (the run's name
    when its LoRA records none). A run of several concepts is no one character, and its name
    no word its LoRA learned: refused, naming its concepts."""
    concepts = lora.concepts
    if name in concepts:
        return concepts[name]
    if len(concepts) <= 1:
        return next(iter(concepts.values()), name)
    first = next(iter(concepts))
    if where.origin.startswith("--figure"):
        fix = f'name one of them: --figure "{first}: ..."'
        fix += "" if acting else f" with --lora {name}"
    else:
        fix = f'name one of them: character = "{first}"'
        fix += "" if acting else f', with loras = ["{name}"] in the scene'
    raise _err(where, f"`{name}` is a training run of {len(concepts)} characters "
                      f"({', '.join(concepts)}), not one character", fix)


def _cast(entries: list[tuple[Value, dict[str, Any]]], values: dict[str, Value],
          settings: Settings, resolver: LoraResolver, uses: list[lora_files.LoraUse],
          use_default: bool) -> tuple[Cast, list[lora_files.LoraUse]]:
    """The figures, and the scene's LoRAs (with any a character needs). A LoRA every figure
    wears alike (one multi-concept LoRA) acts on the whole image, as a scene LoRA."""
    uses = list(uses)
    figures: list[Figure] = []
    for where, item in entries:
        try:
            prompt, tags = extract_lora_tags(item.get("prompt", ""))
        except ValueError as exc:
            raise _err(where, str(exc), "write tags like <lora:name:0.8>") from None
        prompt = prompt.strip()
        if len(tags) > 1 or (tags and item.get("lora", "").strip()):
            raise _err(where, "gives more than one LoRA (a figure wears one: its `lora` or "
                       "one <lora:...> tag in its prompt)", "keep one; a LoRA for the whole "
                       "image goes in the scene's `loras` or prompt")
        character = item.get("character", "").strip() or None
        trigger, own = "", None
        if character is not None:
            trigger, own, shared = _character(character, where, settings, resolver, uses,
                                              use_default)
            if shared is not None:
                uses.append(shared)
        if item.get("lora", "").strip():
            ref, weight = lora_files.split_weight(item["lora"])
            own = resolver.ref(ref, weight, f"{where.origin}, field `lora`", where.base,
                               item["lora"])
        elif tags:
            own = resolver.ref(tags[0].name, tags[0].weight, f"{where.origin} {tags[0].text}",
                               where.base)
        text = ", ".join(part for part in (trigger, prompt) if part)
        figures.append(Figure(prompt, text, character, own))
    first = figures[0].lora
    if first is not None and len(figures) > 1 and all(f.lora == first for f in figures):
        uses.append(first)
        figures = [Figure(f.prompt, f.text, f.character, None) for f in figures]
    everywhere = {u.lora.path: u for u in uses}
    for index, ((where, _), figure) in enumerate(zip(entries, figures, strict=True)):
        own = figure.lora
        if own is None or own.lora.path not in everywhere:
            continue
        acting = everywhere[own.lora.path]
        if own.weight != acting.weight:
            raise _err(where, f"its LoRA {own.lora.name} (weight {own.weight:g}) already acts "
                       f"on the whole image with weight {acting.weight:g} (as the scene's "
                       "LoRA, or for another figure's character)",
                       "give that LoRA one weight: leave the figure's own out, or give both "
                       "the same weight")
        figures[index] = Figure(figure.prompt, figure.text, figure.character, None)
    return Cast(figures, *_cast_settings(values)), uses


def _cast_settings(values: dict[str, Value]) -> tuple[float, float, float]:
    """(background weight, region pad, region soften), each checked."""
    return (_float(values["background_weight"], 0, 1, "use 0 (the figures' prompts alone) "
                   "to 1 (the scene's prompt alone)"),
            _float(values["region_pad"], 0, 1, "use 0 (the skeleton's box) to 1"),
            _float(values["region_soften"], 0, 0.25, "use 0 (sharp edges) to 0.25"))


def command_values(settings: Settings, options: Options) -> dict[str, Value]:
    """The command line's scene: each value from its flag, else from `[generate]`."""
    gen = settings.config.generate
    where = f" in {settings.source}" if settings.source else " (default)"
    cwd = Path.cwd()

    def pick(flag: str, option: Any, config_key: str, config_value: Any) -> Value:
        if option is not None:
            return Value(option, flag, cwd)
        return Value(config_value, f"generate.{config_key}{where}", settings.base_dir)

    size_option = options.size
    values = {
        "name": Value(options.name if options.name is not None else DEFAULT_SCENE, "--name",
                      cwd),
        "prompt": pick("--prompt", options.prompt, "prompt", gen.prompt),
        "negative": pick("--negative", options.negative, "negative", gen.negative),
        "size": (Value(size_option, "--size", cwd) if size_option is not None else
                 Value((gen.width, gen.height), f"generate.width/height{where}",
                       settings.base_dir)),
        "steps": pick("--steps", options.steps, "steps", gen.steps),
        "cfg": pick("--cfg", options.cfg, "cfg", gen.cfg),
        "sampler": pick("--sampler", options.sampler, "sampler", gen.sampler),
        "seed": pick("--seed", options.seed, "seed", gen.seed),
        "count": pick("--count", options.count, "count", gen.count),
        "control_scale": pick("--control-scale", options.control_scale,
                              "control_scale", gen.control_scale),
        "figures": pick("--figures", options.figures, "figures", gen.figures),
        "pose": pick("--pose", options.pose, "pose_map", gen.pose_map),
        "loras": Value(options.loras or None, "--lora", cwd),
        "clip_skip": Value(options.clip_skip, "--clip-skip", cwd),
        "figure": Value([_figure_option(text) for text in options.cast] if options.cast
                        else None, "--figure", cwd),
        "background_weight": pick("--background-weight", options.background_weight,
                                  "background_weight", gen.background_weight),
        "region_pad": pick("--set generate.region_pad", None, "region_pad", gen.region_pad),
        "region_soften": pick("--set generate.region_soften", None, "region_soften",
                              gen.region_soften),
    }
    return values


def _figure_option(text: str) -> dict[str, str]:
    """`--figure "blake: smiling"` -> character blake, prompt "smiling"; `": a: b"` (no name
    before the first colon) or no `NAME:` -> the prompt alone. NAME is a concept name as a
    dataset folder spells it (`ohwx man`, `ブレイク`): text with a bracket, comma or other
    prompt syntax before its first colon (`(smile:1.2)`, `<lora:x:0.8>`) is a prompt. A
    full-width colon (`ブレイク：笑顔`, as a Japanese or Chinese input method types it) counts."""
    colons = [at for at in (text.find(":"), text.find("\uff1a")) if at >= 0]
    if not colons:
        return {"prompt": text}
    name, rest = text[:min(colons)].strip(), text[min(colons) + 1:].strip()
    if not name:
        return {"prompt": rest}
    if _is_concept_name(name):
        return {"character": name, "prompt": rest}
    return {"prompt": text}


def _is_concept_name(name: str) -> bool:
    return (name[0].isalnum() or name[0] == "_") and all(
        char.isalnum() or char in _NAME_PUNCTUATION or unicodedata.category(char)[0] == "M"
        for char in name)


# --- the scenes file ---------------------------------------------------------------------------

def read_scenes_file(path: Path) -> list[dict[str, Any]]:
    """The `[[scene]]` tables of a scenes file (structure checked, values not yet)."""
    from loraforge.config import read_toml

    if not path.is_file():
        raise ForgeError("scenes file not found" if not path.exists() else "is not a file",
                         path=path, fix="check the path given to --scenes")
    data = read_toml(path)
    unknown = [key for key in data if key != "scene"]
    if unknown:
        raise ForgeError(f"unknown top-level key(s): {', '.join(unknown)}", path=path,
                         fix="write each scene as a [[scene]] table")
    scenes = data.get("scene")
    if isinstance(scenes, dict):
        raise ForgeError("has a [scene] table (single brackets); a scenes file lists its "
                         "scenes as [[scene]] tables", path=path,
                         fix="write [[scene]] (double brackets) above each scene")
    if not isinstance(scenes, list) or not scenes or not all(isinstance(s, dict)
                                                             for s in scenes):
        raise ForgeError("holds no scenes", path=path,
                         fix='add at least one [[scene]] table with a prompt = "..."')
    return scenes


def recorded_scene(path: Path) -> dict[str, Any]:
    """The `[[scene]]` table a generated image records (its `loraforge` PNG chunk)."""
    from loraforge.dataset.images import has_pose_mark
    from loraforge.generate.pnginfo import parse_scene, scene_chunk

    if path.is_dir():
        raise ForgeError("is a folder; --from takes one image", path=path,
                         fix="give one PNG of it made by loraforge generate, e.g. "
                             f"{path / 'scene-42.png'}")
    if not path.is_file():
        raise ForgeError("image not found", path=path, fix="give a PNG made by loraforge generate")
    try:
        raw = scene_chunk(path)
    except OSError as exc:
        raise ForgeError(f"cannot be read as a PNG ({exc})", path=path,
                         fix="give a PNG made by loraforge generate") from None
    scene = parse_scene(raw)
    if scene is None and has_pose_mark(path):
        raise ForgeError("is a pose map written by `loraforge pose`, not a generated image: it "
                         "records no scene to render again", path=path,
                         fix="pose a scene with it: loraforge generate --pose "
                             f"{shlex.quote(str(path))}")
    if raw is not None and (scene is None or not isinstance(scene.get("scene"), dict)):
        raise ForgeError("holds a LoRA Forge scene record that is damaged (not JSON, or no "
                         "scene table in it)", path=path,
                         fix="render from an image whose record is intact; the .json beside "
                             "the image holds the same scene, to copy into a --scenes file")
    if scene is None or not isinstance(scene.get("scene"), dict):
        raise ForgeError("holds no LoRA Forge scene record (only images made by `loraforge "
                         "generate` carry one)", path=path,
                         fix="give an image from Final_Images/, or write its scene in a "
                             "--scenes file")
    return dict(scene["scene"])


def scene_label(index: int, scene: dict[str, Any]) -> str:
    name = scene.get("name")
    shown = f'"{name}"' if isinstance(name, str) and name.strip() else "(no name)"
    return f"scene {shown} (#{index + 1})"


def scene_values(index: int, scene: dict[str, Any], defaults: dict[str, Value],
                 base: Path) -> dict[str, Value]:
    """One scene's values over the command line's; ForgeError for unknown fields."""
    label = scene_label(index, scene)
    unknown = [key for key in scene if key not in SCENE_FIELDS]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, SCENE_FIELDS, n=1, cutoff=0.6)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        raise ForgeError(f"{label}: unknown field `{key}`{hint}",
                         fix="scene fields: " + ", ".join(SCENE_FIELDS))
    if "seed" in scene and "seeds" in scene:
        raise ForgeError(f"{label}: has both `seed` and `seeds`", fix="keep one of them")
    if "count" in scene and "seeds" in scene:
        raise ForgeError(f"{label}: has both `count` and `seeds` (`seeds` lists every image, "
                         "so `count` would do nothing)",
                         fix="keep one of them: `seeds` renders one image per seed listed, "
                             "`count` that many images from `seed` on")
    values = dict(defaults)
    values["name"] = Value(f"{DEFAULT_SCENE}{index + 1}", label, base)
    values.pop("seeds", None)
    for key, raw in scene.items():
        values[key] = Value(raw, f"{label}, field `{key}`", base)
    return values


_FLAGS = {"loras": "--lora", "cast": "--figure", "scenes": "--scenes", "pose": "--pose"}


def _from_alone(options: Options) -> None:
    """`--from` renders the recorded scene as it was: a scene option beside it is refused
    (it would be ignored)."""
    from dataclasses import fields

    given = [_FLAGS.get(f.name, "--" + f.name.replace("_", "-")) for f in fields(options)
             if f.name != "source" and getattr(options, f.name) is not None]
    if given:
        raise ForgeError(f"--from renders the image's recorded scene as it was, so it takes no "
                         f"{', '.join(given)}",
                         fix="drop them; to change the scene, copy the image's record into a "
                             "scenes file ([[scene]]) and edit it there")


def _saved_pose_map(source: Path, scene: dict[str, Any], poses: PoseCache) -> None:
    """A drawn pose map file is recorded by its path, and the map the image was rendered with is
    saved beside it (`<image>.pose.png`): `--from` renders with that one, so a pose file edited
    or deleted since does not change (or stop) the rendering."""
    from PIL import Image

    raw = scene.get("pose")
    saved = source.with_name(f"{source.stem}.pose.png")
    if not isinstance(raw, str) or raw.strip().lower() in ("", RANDOM) or not saved.is_file():
        return
    path = _pose_path(raw, source.parent)
    try:
        with Image.open(saved) as image:
            pose = image.convert("RGB")
    except OSError:  # not ours or damaged: the recorded file is read as usual
        return
    poses.images[(path, pose.width, pose.height)] = pose
    if not path.exists():
        poses.warn(f"the pose map {path} is gone; rendering with the one saved beside "
                   f"the image, {saved}")


def plan_jobs(settings: Settings, options: Options, resolver: LoraResolver, poses: PoseCache,
              ) -> list[Job]:
    """Every scene to render, checked. Scenes file: all errors are gathered and reported at
    once, naming each scene and field, and nothing is rendered."""
    defaults = command_values(settings, options)
    if options.source is not None:
        _from_alone(options)
        source = Path(options.source)
        scene = without_lora_tags(recorded_scene(source))  # `loras` names the tags' files
        _saved_pose_map(source, scene, poses)
        try:
            return [resolve_job(scene_values(0, scene, defaults, source.parent), settings,
                                resolver, poses)]
        except ForgeError as exc:
            if exc.path is not None:  # a file it names (a LoRA, a pose): named already
                raise
            raise ForgeError(f"the scene it records is not usable: {exc.message}", path=source,
                             fix="its record was edited or damaged: render from an image "
                                 "whose record is intact, or copy the record into a scenes "
                                 "file ([[scene]]) and mend it there") from None
    if options.scenes is None:
        job = resolve_job(defaults, settings, resolver, poses)
        _posed_figures(defaults["figures"], job)
        return [job]
    path = Path(options.scenes)
    scenes = read_scenes_file(path)
    base = path.resolve().parent
    jobs: list[Job] = []
    numbers: list[int] = []  # each job's place in the file (bad scenes have none)
    problems: list[str] = []
    for index, scene in enumerate(scenes):
        try:
            values = scene_values(index, scene, defaults, base)
            job = resolve_job(values, settings, resolver, poses)
            if values["figures"] is not defaults["figures"]:  # --figures: for random poses
                _posed_figures(values["figures"], job)
            jobs.append(job)
            numbers.append(index)
        except ForgeError as exc:
            problems.append(str(exc).replace("\n", "\n    "))
    stems: dict[str, str] = {}
    for index, job in zip(numbers, jobs, strict=True):
        other = stems.get(job.stem.lower())
        if other is not None:
            problems.append(f"scenes \"{other}\" and \"{job.name}\" (#{index + 1}) would write "
                            f"the same files ({job.stem}-<seed>.png)\n    fix: give each scene "
                            "its own name")
        stems[job.stem.lower()] = job.name
    if problems:
        count = len(problems)
        raise ForgeError(f"{count} bad scene entr{'y' if count == 1 else 'ies'}; nothing was "
                         "rendered:\n  - " + "\n  - ".join(problems), path=path,
                         fix="correct the scenes and fields named above")
    return jobs
