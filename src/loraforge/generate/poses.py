"""OpenPose pose maps: data model, exchange JSON, drawing, random plausible figures, checks.

The format (see reference/openpose.md): 18 body keypoints in COCO order, 17 limbs, 18 colours;
limbs are filled ellipses along each segment at 60% colour strength, drawn first; keypoints are
filled circles in full colour, drawn on top; missing keypoints and their limbs are not drawn.

Scale: the reference widths (limb half-width 4 px, keypoint radius 4 px) are for a 512 px image.
A W x H canvas draws them times ``min(W, H) / 512`` (never below 1 px). SD 1.5 generates with a
shortest side of 512, so a map resized to the generation size has the widths the OpenPose
ControlNet was trained on, whatever the aspect ratio.

Random figures are built in 2-D from human proportions (fractions of stature, after the
anthropometric tables in Winter, "Biomechanics and Motor Control of Human Movement", and Drillis &
Contini), facing the viewer (the person's right on the image's left), from a small set of base
poses whose joint angles are drawn within anatomical ranges. Only numpy and Pillow here.
"""

from __future__ import annotations

import bisect
import colorsys
import itertools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from loraforge.dataset.images import POSE_MARK, has_pose_mark, png_texts
from loraforge.errors import ForgeError
from loraforge.fsutil import DEFAULT_FILE_MODE, save_atomic, write_atomic

# --- the format -------------------------------------------------------------------------------

KEYPOINT_NAMES: tuple[str, ...] = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
    "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)
NUM_KEYPOINTS = 18
(NOSE, NECK, R_SHOULDER, R_ELBOW, R_WRIST, L_SHOULDER, L_ELBOW, L_WRIST, R_HIP, R_KNEE, R_ANKLE,
 L_HIP, L_KNEE, L_ANKLE, R_EYE, L_EYE, R_EAR, L_EAR) = range(NUM_KEYPOINTS)

# The 17 limbs as 0-based keypoint pairs (the reference lists them 1-based), in drawing order.
LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
    (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)
COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)
LIMB_STRENGTH = 0.6
LIMB_COLORS: tuple[tuple[int, int, int], ...] = tuple(
    (round(r * LIMB_STRENGTH), round(g * LIMB_STRENGTH), round(b * LIMB_STRENGTH))
    for r, g, b in COLORS)
REFERENCE_SIZE = 512
REFERENCE_RADIUS = 4.0   # limb half-width and keypoint radius at 512 px
MAX_CANVAS_SIDE = 16384
#: A keypoint may lie off its canvas (a limb cut by the frame), but not this far.
MAX_COORDINATE = 1_000_000

# Hands (OpenPose's 21 hand keypoints: 0 wrist, then 4 per finger from thumb to little finger,
# base to tip), drawn as the OpenPose ControlNet's hand maps are: the 20 bones as lines 2 px wide
# (at 512 px) coloured around the hue circle (bone i at hue i/20), the keypoints as blue dots.
NUM_HAND_KEYPOINTS = 21
HAND_BONES: tuple[tuple[int, int], ...] = tuple(
    pair for finger in range(5) for pair in
    ((0 if j == 0 else 4 * finger + j, 4 * finger + j + 1) for j in range(4)))
HAND_BONE_COLORS: tuple[tuple[int, int, int], ...] = tuple(
    (round(255 * r), round(255 * g), round(255 * b))
    for r, g, b in (colorsys.hsv_to_rgb(i / len(HAND_BONES), 1.0, 1.0)
                    for i in range(len(HAND_BONES))))
HAND_POINT_COLOR = (0, 0, 255)
REFERENCE_HAND_WIDTH = 2.0
HAND_KEYS = ("hand_left_keypoints_2d", "hand_right_keypoints_2d")  # the person's left, right
# Faces: OpenPose's 70 face keypoints, drawn as the ControlNet's face maps: white dots, radius
# 3 px at 512 px, no lines.
NUM_FACE_KEYPOINTS = 70
FACE_KEY = "face_keypoints_2d"
FACE_POINT_COLOR = (255, 255, 255)
REFERENCE_FACE_RADIUS = 3.0

Point = tuple[float, float]
Hand = tuple[Point | None, ...]


def draw_scale(width: int, height: int) -> float:
    """How much wider than the 512 px reference strokes are drawn on a W x H canvas."""
    return min(width, height) / REFERENCE_SIZE


def stroke_radius(width: int, height: int) -> float:
    """Limb half-width and keypoint radius in pixels on a W x H canvas (at least 1 px)."""
    return max(1.0, REFERENCE_RADIUS * draw_scale(width, height))


# --- data model -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Person:
    """One body: 18 keypoints in COCO order, each ``(x, y)`` in pixels or ``None`` (missing);
    and optionally the person's (left, right) hands, 21 keypoints each, and face, 70."""

    keypoints: tuple[Point | None, ...]
    hands: tuple[Hand | None, Hand | None] = (None, None)
    face: tuple[Point | None, ...] | None = None

    def __post_init__(self) -> None:
        points = _points(self.keypoints)
        if len(points) != NUM_KEYPOINTS:
            raise ValueError(f"a person has {NUM_KEYPOINTS} keypoints, got {len(points)}")
        object.__setattr__(self, "keypoints", points)
        hands = tuple(None if hand is None else _points(hand) for hand in self.hands)
        if len(hands) != 2 or any(h is not None and len(h) != NUM_HAND_KEYPOINTS for h in hands):
            raise ValueError(f"a person has two hands of {NUM_HAND_KEYPOINTS} keypoints or None")
        object.__setattr__(self, "hands", hands)
        face = None if self.face is None else _points(self.face)
        if face is not None and len(face) != NUM_FACE_KEYPOINTS:
            raise ValueError(f"a face has {NUM_FACE_KEYPOINTS} keypoints, got {len(face)}")
        object.__setattr__(self, "face", face)

    def moved(self, move: Callable[[Point], Point]) -> Person:
        """The same person with every keypoint (body, hands, face) passed through ``move``."""
        def each(points: tuple[Point | None, ...]) -> tuple[Point | None, ...]:
            return tuple(None if p is None else move(p) for p in points)

        hands = tuple(None if hand is None else each(hand) for hand in self.hands)
        return Person(each(self.keypoints), (hands[0], hands[1]),
                      None if self.face is None else each(self.face))

    def __getitem__(self, index: int) -> Point | None:
        return self.keypoints[index]

    def present(self) -> list[int]:
        """Indices of the keypoints that are not missing."""
        return [i for i, p in enumerate(self.keypoints) if p is not None]

    def is_complete(self) -> bool:
        return all(p is not None for p in self.keypoints)

    def bbox(self, pad: float = 0.0) -> tuple[float, float, float, float] | None:
        """``(x0, y0, x1, y1)`` around the present keypoints, grown by ``pad``; None if empty."""
        pts = [p for p in self.keypoints if p is not None]
        if not pts:
            return None
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        return min(xs) - pad, min(ys) - pad, max(xs) + pad, max(ys) + pad

    def flat(self) -> list[float]:
        """The exchange format's 54 numbers: x, y, c per keypoint (missing: 0, 0, 0)."""
        return _flat(self.keypoints)

    def entry(self) -> dict[str, list[float]]:
        """This person in the exchange format: the body, and the hands and face detected."""
        values = {"pose_keypoints_2d": self.flat()}
        for key, part in (*zip(HAND_KEYS, self.hands, strict=True), (FACE_KEY, self.face)):
            if part is not None:
                values[key] = _flat(part)
        return values


def _points(points: tuple[Point | None, ...]) -> tuple[Point | None, ...]:
    return tuple(None if p is None else (float(p[0]), float(p[1])) for p in points)


def _flat(points: tuple[Point | None, ...]) -> list[float]:
    values: list[float] = []
    for p in points:
        values.extend((p[0], p[1], 1.0) if p is not None else (0.0, 0.0, 0.0))
    return values


@dataclass(frozen=True)
class PoseMap:
    """A canvas size and the people on it; coordinates in pixels of that canvas."""

    width: int
    height: int
    people: tuple[Person, ...] = ()

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise ValueError(f"canvas size must be positive, got {self.width}x{self.height}")
        object.__setattr__(self, "people", tuple(self.people))

    def to_dict(self) -> dict[str, Any]:
        return {"canvas_width": self.width, "canvas_height": self.height,
                "people": [p.entry() for p in self.people]}

    def to_json(self) -> str:
        """The OpenPose exchange JSON, one keypoint (x, y, c) a line; floats round-trip exactly."""
        lines = ["{", f'  "canvas_width": {self.width},', f'  "canvas_height": {self.height},',
                 '  "people": [']
        for k, person in enumerate(self.people):
            parts = []
            for key, values in person.entry().items():
                rows = [", ".join(json.dumps(v) for v in values[i:i + 3])
                        for i in range(0, len(values), 3)]
                parts.append(f'"{key}": [\n      ' + ",\n      ".join(rows) + "\n    ]")
            comma = "," if k < len(self.people) - 1 else ""
            lines.append("    {" + ",\n     ".join(parts) + "}" + comma)
        lines += ["  ]", "}"]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_dict(cls, data: Any, path: Path | str | None = None) -> PoseMap:
        """Validate a parsed exchange JSON; ForgeError naming ``path`` and the problem if bad."""
        fix = ('expected {"canvas_width": W, "canvas_height": H, "people": '
               '[{"pose_keypoints_2d": [x, y, c] * 18}]} with pixel coordinates')
        if isinstance(data, list):  # ComfyUI's POSE_KEYPOINT: a list of frames
            if len(data) != 1:
                raise ForgeError(f"holds a list of {len(data)} poses; expected one", path=path,
                                 fix="keep one pose (one frame) per file")
            data = data[0]
        if not isinstance(data, dict):
            raise ForgeError(f"is not an OpenPose pose object (found a JSON {_kind(data)})",
                             path=path, fix=fix)
        size = []
        for key in ("canvas_width", "canvas_height"):
            if key not in data:
                raise ForgeError(f"has no {key}", path=path,
                                 fix='add "canvas_width" and "canvas_height" (pixels) beside '
                                     '"people"')
            value = data[key]
            if (not _is_finite_number(value) or value != int(value)
                    or not 1 <= value <= MAX_CANVAS_SIDE):
                raise ForgeError(f"{key} must be a whole number of pixels from 1 to "
                                 f"{MAX_CANVAS_SIDE}, got {value!r}", path=path, fix=fix)
            size.append(int(value))
        people_data = data.get("people")
        if not isinstance(people_data, list):
            raise ForgeError('has no "people" list' if people_data is None
                             else f'"people" must be a list, found a JSON {_kind(people_data)}',
                             path=path, fix=fix)
        people = []
        for i, entry in enumerate(people_data):
            where = f"people[{i}]"
            if not isinstance(entry, dict) or "pose_keypoints_2d" not in entry:
                raise ForgeError(f"{where} has no pose_keypoints_2d", path=path, fix=fix)
            values = entry["pose_keypoints_2d"]
            if not isinstance(values, list):
                raise ForgeError(f"{where}.pose_keypoints_2d must be a list of numbers, found a "
                                 f"JSON {_kind(values)}", path=path, fix=fix)
            if len(values) != 3 * NUM_KEYPOINTS:
                hint = " (BODY_25 format? convert it to the 18-keypoint COCO body)" \
                    if len(values) == 75 else ""
                raise ForgeError(f"{where}.pose_keypoints_2d has {len(values)} numbers; expected "
                                 f"54 (18 keypoints x, y, confidence){hint}", path=path, fix=fix)
            for j, v in enumerate(values):
                if not _is_finite_number(v):
                    raise ForgeError(f"{where}.pose_keypoints_2d[{j}] ({KEYPOINT_NAMES[j // 3]} "
                                     f"{'xyc'[j % 3]}) must be a finite number, got {v!r}",
                                     path=path, fix=fix)
                if j % 3 < 2 and abs(v) > MAX_COORDINATE:  # past any canvas: not a pixel
                    raise ForgeError(f"{where}.pose_keypoints_2d[{j}] ({KEYPOINT_NAMES[j // 3]} "
                                     f"{'xyc'[j % 3]}) is {v:g} px, beyond any canvas (at most "
                                     f"{MAX_COORDINATE:,} px either way)", path=path, fix=fix)
            parts: list[tuple[Point | None, ...] | None] = []
            for key, count in ((HAND_KEYS[0], NUM_HAND_KEYPOINTS),
                               (HAND_KEYS[1], NUM_HAND_KEYPOINTS), (FACE_KEY, NUM_FACE_KEYPOINTS)):
                part = entry.get(key) or None  # OpenPose writes [] for what it did not detect
                if part is not None and (
                        not isinstance(part, list) or len(part) != 3 * count
                        or not all(_is_finite_number(v) for v in part)
                        or any(abs(v) > MAX_COORDINATE for i, v in enumerate(part) if i % 3 < 2)):
                    raise ForgeError(f"{where}.{key} must be {3 * count} finite numbers ({count}"
                                     " keypoints x, y, confidence; x and y within "
                                     f"{MAX_COORDINATE:,} px) or empty", path=path, fix=fix)
                parts.append(None if part is None else _unflat(part))
            people.append(Person(_unflat(values), (parts[0], parts[1]), parts[2]))
        return cls(size[0], size[1], _in_pixels(people, size[0], size[1]))

    @classmethod
    def from_json(cls, text: str, path: Path | str | None = None) -> PoseMap:
        """Parse and validate exchange JSON text; ForgeError naming ``path`` if it is bad."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ForgeError(f"is not valid JSON: {exc.msg} (line {exc.lineno}, column "
                             f"{exc.colno})", path=path,
                             fix="fix the JSON, or export the pose again from the editor") from None
        return cls.from_dict(data, path)


#: How far past 0..1 a normalised keypoint may lie: a canvas (a limb dragged out of the frame
#: in a pose editor). A pose drawn in pixels whose every point lies within 2 px of the corner
#: would be a dot, no pose: read so, it is normalised.
NORMALISED_SLACK = 1.0


def _in_pixels(people: list[Person], width: int, height: int) -> tuple[Person, ...]:
    """The people with pixel coordinates. A1111's ControlNet extension and ComfyUI's pose nodes
    write keypoints normalised to 0..1 beside a canvas size in pixels: such a pose is scaled to
    its canvas (drawn as it stands, it would be a dot in the corner)."""
    coords = [c for person in people
              for part in (person.keypoints, *person.hands, person.face) if part is not None
              for point in part if point is not None for c in point]
    if not coords or not all(-NORMALISED_SLACK <= c <= 1 + NORMALISED_SLACK for c in coords) \
            or min(width, height) <= 8:
        return tuple(people)
    return tuple(person.moved(lambda p: (p[0] * width, p[1] * height)) for person in people)


def _unflat(values: list[Any]) -> tuple[Point | None, ...]:
    """x, y, c triples -> points (c = 0: missing)."""
    return tuple((float(values[i]), float(values[i + 1])) if values[i + 2] > 0 else None
                 for i in range(0, len(values), 3))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    """A JSON number (not a boolean) that is finite as a float (huge integers are not)."""
    if not _is_number(value):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean",
            type(None): "null"}.get(type(value), "number")


def read_pose_json(path: Path) -> PoseMap:
    """Read an OpenPose exchange JSON file; ForgeError naming the file if missing or bad."""
    path = Path(path)
    if not path.exists():
        raise ForgeError("no such file", path=path, fix="check the path to the pose JSON")
    if path.is_dir():
        raise ForgeError("is a folder, not a pose JSON file", path=path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ForgeError("is not a text (UTF-8) JSON file", path=path,
                         fix="pass the .json the pose editor exported") from None
    except OSError as exc:
        raise ForgeError(f"cannot be read: {exc.strerror or exc}", path=path) from None
    return PoseMap.from_json(text, path)


def write_pose_json(path: Path, pose: PoseMap, mode: int = DEFAULT_FILE_MODE) -> None:
    """Write ``pose`` as OpenPose exchange JSON, atomically, with permissions ``mode``
    (storage.file_mode) (never over another kind of file: see `refuse_foreign`)."""
    refuse_foreign(Path(path))
    write_atomic(Path(path), pose.to_json(), mode)


#: The PNG text chunk in which `pose extract` records the SHA-256 of the JSON it wrote beside
#: the map (the JSON itself stays the plain exchange format that pose editors read).
JSON_DIGEST_KEY = "loraforge pose json sha256"
#: What `pose extract` made the map from: the picture's SHA-256 and the options that shape it.
SOURCE_KEY = "loraforge pose source"


def recorded_source(png: Path) -> str | None:
    """What the pose map at `png` records having been extracted from (`SOURCE_KEY`), or None."""
    texts = png_texts(png)
    return texts.get(SOURCE_KEY) if texts.get(POSE_MARK[0]) == POSE_MARK[1] else None


def written_json_digest(png: Path) -> str | None:
    """The SHA-256 that the pose map at `png` records of the JSON written beside it (see
    `save_png`), or None: no such map, or one that records none (written by `pose random` or
    `pose render`, or before the digest was recorded)."""
    texts = png_texts(png)
    return texts.get(JSON_DIGEST_KEY) if texts.get(POSE_MARK[0]) == POSE_MARK[1] else None


def _is_pose_json(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    # ours and pose editors' carry a canvas size, OpenPose's own a version: not just any
    # JSON of the user's with a "people" key
    return (isinstance(data, dict) and isinstance(data.get("people"), list)
            and ("canvas_width" in data or "version" in data))


def refuse_foreign(path: Path) -> None:
    """Refuse (ForgeError) to write a pose map or OpenPose JSON over an existing file of
    another kind: replacing one's earlier pose map (a PNG carrying POSE_MARK) is the normal
    case, but a photo, a logo, another tool's map or a config given as the output by mistake is
    the user's, and would be lost. Pixels are not judged: a dark, colourful logo looks like a
    pose map."""
    if not path.exists() or path.is_dir():
        return
    json_out = path.suffix.lower() == ".json"
    if _is_pose_json(path) if json_out else has_pose_mark(path):
        return
    kind, option = (("an OpenPose JSON file", "--pose-json") if json_out
                    else ("a pose map that loraforge wrote", "-o"))
    raise ForgeError(f"exists and is not {kind}: writing here would replace it", path=path,
                     fix=f"pass another output name ({option}), or remove that file first if it "
                         "may go")


# --- drawing ----------------------------------------------------------------------------------

def _ellipse_polygon(p: Point, q: Point, half_width: float) -> list[tuple[float, float]]:
    """Vertices of the ellipse with major axis p-q and minor semi-axis ``half_width``."""
    (x0, y0), (x1, y1) = p, q
    dx, dy = x1 - x0, y1 - y0
    semi_major = math.hypot(dx, dy) / 2
    angle = math.atan2(dy, dx)
    n = int(min(180, max(32, semi_major / 2)))
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    u, v = semi_major * np.cos(t), half_width * np.sin(t)
    ca, sa = math.cos(angle), math.sin(angle)
    xs = (x0 + x1) / 2 + u * ca - v * sa
    ys = (y0 + y1) / 2 + u * sa + v * ca
    return list(zip(xs.tolist(), ys.tolist(), strict=True))


def draw_pose(pose: PoseMap) -> Image.Image:
    """The pose map of ``pose``: black RGB canvas, limbs (60% colour) then keypoints (full colour).

    Limb i and keypoint i use colour i; a limb with a missing end is not drawn. Hands and faces,
    where a person has them, are drawn over every body. Deterministic.
    """
    image = Image.new("RGB", (pose.width, pose.height), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    radius = stroke_radius(pose.width, pose.height)
    for person in pose.people:
        for i, (a, b) in enumerate(LIMBS):
            pa, pb = person.keypoints[a], person.keypoints[b]
            if pa is not None and pb is not None:
                draw.polygon(_ellipse_polygon(pa, pb, radius), fill=LIMB_COLORS[i])
        for i, p in enumerate(person.keypoints):
            if p is not None:
                x, y = p
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=COLORS[i])
    width = max(1, round(REFERENCE_HAND_WIDTH * draw_scale(pose.width, pose.height)))
    for person in pose.people:
        for hand in person.hands:
            if hand is None:
                continue
            for (a, b), colour in zip(HAND_BONES, HAND_BONE_COLORS, strict=True):
                pa, pb = hand[a], hand[b]
                if pa is not None and pb is not None:
                    draw.line((pa, pb), fill=colour, width=width)
            for p in hand:
                if p is not None:
                    x, y = p
                    draw.ellipse((x - radius, y - radius, x + radius, y + radius),
                                 fill=HAND_POINT_COLOR)
    dot = max(1.0, REFERENCE_FACE_RADIUS * draw_scale(pose.width, pose.height))
    for person in pose.people:
        for p in person.face or ():
            if p is not None:
                x, y = p
                draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=FACE_POINT_COLOR)
    return image


def letterbox(image: Image.Image, width: int, height: int,
              resample: Image.Resampling = Image.Resampling.BILINEAR) -> Image.Image:
    """``image`` scaled to fit ``width`` x ``height`` keeping its aspect, centred on black."""
    if width < 1 or height < 1:
        raise ForgeError(f"letterbox size must be positive, got {width}x{height}")
    src = image.convert("RGB")
    iw, ih = src.size
    scale = min(width / iw, height / ih)
    nw = min(width, max(1, round(iw * scale)))
    nh = min(height, max(1, round(ih * scale)))
    resized = src if (nw, nh) == (iw, ih) else src.resize((nw, nh), resample)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(resized, ((width - nw) // 2, (height - nh) // 2))
    return canvas


def fit_pose(pose: PoseMap, width: int, height: int) -> PoseMap:
    """``pose`` moved onto a ``width`` x ``height`` canvas the way ``letterbox`` moves its image.

    Redrawing the fitted pose keeps exact colours and reference stroke widths, which resizing a
    drawn map does not.
    """
    scale = min(width / pose.width, height / pose.height)
    ox = (width - pose.width * scale) / 2
    oy = (height - pose.height * scale) / 2
    people = tuple(person.moved(lambda p: (p[0] * scale + ox, p[1] * scale + oy))
                   for person in pose.people)
    return PoseMap(width, height, people)


# --- sizes ------------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX×*]\s*(\d+)\s*$")


def parse_size(text: str, max_side: int = MAX_CANVAS_SIDE) -> tuple[int, int]:
    """``"1024x768"`` -> ``(1024, 768)``; ForgeError for anything else, non-positive sides or
    a side above `max_side`."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise ForgeError(f"size {text!r} is not WIDTHxHEIGHT", fix="write it like 1024x768")
    width, height = int(match.group(1)), int(match.group(2))
    if width < 1 or height < 1:
        raise ForgeError(f"size {text!r}: width and height must be positive",
                         fix="write it like 1024x768")
    if width > max_side or height > max_side:
        raise ForgeError(f"size {text!r} is too large (at most {max_side} px a side)",
                         fix="use a smaller size; the pipeline resizes the map anyway")
    return width, height


# --- proportions (fractions of stature, top of head to soles) --------------------------------

STATURE_TO_TORSO = 0.288   # neck (shoulder line, 0.818 H above the floor) to mid-hip (0.530 H)
SHOULDER_HALF = 0.125      # neck to each shoulder joint (biacromial breadth ~0.25 H)
HIP_HALF = 0.090           # mid-hip to each hip joint
UPPER_ARM = 0.186          # shoulder to elbow
FOREARM = 0.146            # elbow to wrist
THIGH = 0.245              # hip to knee (knee 0.285 H above the floor)
SHANK = 0.246              # knee to ankle (ankle 0.039 H above the floor)
NECK_TO_NOSE = 0.085       # nose half way between the eyes (0.936 H) and the chin (0.870 H)
EYE_HALF, EYE_ABOVE_NOSE, EYE_DEPTH = 0.018, 0.033, 0.035
EAR_HALF, EAR_ABOVE_NOSE = 0.042, 0.025
NOSE_DEPTH = 0.050         # in front of the ear line: shifts the face sideways when the head turns

# Expected length of each limb (LIMBS order), in statures, and the accepted range as a ratio.
LIMB_LENGTHS: tuple[float, ...] = (
    SHOULDER_HALF, SHOULDER_HALF, UPPER_ARM, FOREARM, UPPER_ARM, FOREARM,
    math.hypot(STATURE_TO_TORSO, HIP_HALF), THIGH, SHANK,
    math.hypot(STATURE_TO_TORSO, HIP_HALF), THIGH, SHANK,
    NECK_TO_NOSE, math.hypot(EYE_HALF, EYE_ABOVE_NOSE),
    math.hypot(EAR_HALF - EYE_HALF, EYE_ABOVE_NOSE - EAR_ABOVE_NOSE),
    math.hypot(EYE_HALF, EYE_ABOVE_NOSE),
    math.hypot(EAR_HALF - EYE_HALF, EYE_ABOVE_NOSE - EAR_ABOVE_NOSE),
)
BODY_RANGE = (0.72, 1.15)   # proportions vary ±5%, turning and stepping foreshorten to ~0.8
FACE_RANGE = (0.35, 2.0)    # the face's small segments change most as the head turns
FACE_LIMBS = frozenset({13, 14, 15, 16})
REACH_SLACK = 1.15
SIMILAR_HEIGHTS = 1.35      # tallest / shortest figure on one canvas, at most
STATURE_RANGE = (0.5, 0.95)  # figure stature as a fraction of canvas height (generated maps)

# Capacity: each figure needs a slot at least this wide, and the canvas this tall.
MIN_SLOT_FRACTION = 0.25    # of the canvas height
MIN_SLOT_PX = 40
MIN_CANVAS_HEIGHT = 96      # so that a figure stays at least ~64 px tall
ATTENTION_MAX_WIDTH = 0.36  # widest "at attention" figure, in statures (all extremes at once)


@dataclass(frozen=True)
class _Limb:
    """Angle ranges (degrees) for one arm or leg of a figure facing the viewer.

    ``angle``: upper segment from straight down, positive outward (90 = horizontal, 180 = up);
    ``bend``: lower segment relative to the upper, positive outward; ``shorten``: projected length
    of the upper segment (below 1 when it points toward or away from the camera).
    """

    angle: tuple[float, float]
    bend: tuple[float, float]
    shorten: tuple[float, float] = (1.0, 1.0)


@dataclass(frozen=True)
class _BasePose:
    name: str
    arms: tuple[_Limb, _Limb]   # mirrored at random, so either side does the first arm's move
    legs: tuple[_Limb, _Limb]
    weight: float = 1.0


_HANG = _Limb((3, 10), (-3, 6))
_STAND = _Limb((2, 7), (-4, 2))
_ATTENTION = _BasePose("at attention", (_Limb((1, 5), (0, 4)),) * 2, (_Limb((1, 4), (-2, 1)),) * 2)
_BASE_POSES: tuple[_BasePose, ...] = (
    _ATTENTION,
    _BasePose("standing", (_HANG, _HANG), (_STAND, _STAND), weight=2.0),
    _BasePose("arms raised", (_Limb((135, 165), (-15, 15)),) * 2, (_Limb((3, 12), (-4, 4)),) * 2),
    _BasePose("arms out", (_Limb((80, 100), (-15, 15)),) * 2, (_STAND, _STAND)),
    _BasePose("waving", (_Limb((70, 110), (50, 90)), _HANG), (_STAND, _STAND)),
    _BasePose("hands on hips", (_Limb((30, 45), (-115, -90)),) * 2, (_Limb((4, 12), (-4, 2)),) * 2),
    _BasePose("walking", (_Limb((3, 12), (0, 20), (0.85, 1.0)), _Limb((3, 12), (0, 15))),
              (_Limb((0, 5), (-3, 3), (0.82, 0.95)), _Limb((3, 8), (-4, 2), (0.9, 1.0)))),
    _BasePose("action", (_Limb((140, 170), (-10, 20)), _Limb((60, 100), (-20, 30))),
              (_Limb((15, 28), (-10, 0)),) * 2),
    _BasePose("pointing", (_Limb((75, 100), (-8, 8)), _HANG), (_STAND, _STAND)),
    _BasePose("cheering", (_Limb((150, 175), (-30, 5)), _Limb((30, 45), (-115, -90))),
              (_Limb((4, 12), (-4, 2)),) * 2),
)
_POSE_CUMULATIVE = tuple(itertools.accumulate(b.weight for b in _BASE_POSES))

Vec = tuple[float, float]


def _pick_base(rng: np.random.Generator) -> _BasePose:
    r = float(rng.random()) * _POSE_CUMULATIVE[-1]
    return _BASE_POSES[min(bisect.bisect_right(_POSE_CUMULATIVE, r), len(_BASE_POSES) - 1)]


def _step(start: Vec, length: float, side: float, degrees: float) -> Vec:
    """``start`` moved ``length`` at ``degrees`` from straight down, outward on ``side``."""
    a = math.radians(degrees)
    return start[0] + side * length * math.sin(a), start[1] + length * math.cos(a)


def _rotated(point: Vec, center: Vec, degrees: float) -> Vec:
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    dx, dy = point[0] - center[0], point[1] - center[1]
    return center[0] + c * dx - s * dy, center[1] + s * dx + c * dy


_DRAWS_PER_FIGURE = 24


def _build_figure(rng: np.random.Generator, base: _BasePose) -> list[Vec]:
    """18 points of a figure of stature 1, neck at the origin, y down, facing the viewer.

    Proportions vary ±5% per person (torso ±3%); the body turns up to 18 degrees (narrowing
    shoulders and hips, shifting the face), the head tilts up to 10 and the body leans up to 5.
    """
    draws = iter(rng.random(_DRAWS_PER_FIGURE).tolist())

    def u(lo: float = 0.0, hi: float = 1.0) -> float:
        return lo + (hi - lo) * next(draws)

    arm_j, leg_j, head_j = u(0.95, 1.05), u(0.95, 1.05), u(0.95, 1.05)
    yaw = math.radians(u(-18, 18))
    cy, sy = math.cos(yaw), math.sin(yaw)
    torso = STATURE_TO_TORSO * u(0.97, 1.03)
    shoulder = SHOULDER_HALF * u(0.95, 1.05) * cy
    hip = HIP_HALF * u(0.95, 1.05) * cy
    pts: list[Vec] = [(0.0, 0.0)] * NUM_KEYPOINTS
    pts[R_SHOULDER], pts[L_SHOULDER] = (-shoulder, 0.0), (shoulder, 0.0)
    pts[R_HIP], pts[L_HIP] = (-hip, torso), (hip, torso)
    arms = base.arms if u() < 0.5 else base.arms[::-1]
    legs = base.legs if u() < 0.5 else base.legs[::-1]
    for side, (j0, j1, j2), spec, upper, lower in (
            (-1.0, (R_SHOULDER, R_ELBOW, R_WRIST), arms[0], UPPER_ARM * arm_j, FOREARM * arm_j),
            (1.0, (L_SHOULDER, L_ELBOW, L_WRIST), arms[1], UPPER_ARM * arm_j, FOREARM * arm_j),
            (-1.0, (R_HIP, R_KNEE, R_ANKLE), legs[0], THIGH * leg_j, SHANK * leg_j),
            (1.0, (L_HIP, L_KNEE, L_ANKLE), legs[1], THIGH * leg_j, SHANK * leg_j)):
        a, e, f = u(*spec.angle), u(*spec.bend), u(*spec.shorten)
        pts[j1] = _step(pts[j0], upper * f, side, a)
        pts[j2] = _step(pts[j1], lower, side, a + e)
    nose_y = -NECK_TO_NOSE * head_j
    pts[NOSE] = (NOSE_DEPTH * head_j * sy, nose_y)
    for side, eye, ear in ((-1.0, R_EYE, R_EAR), (1.0, L_EYE, L_EAR)):
        pts[eye] = ((side * EYE_HALF * cy + EYE_DEPTH * sy) * head_j,
                    nose_y - EYE_ABOVE_NOSE * head_j)
        pts[ear] = (side * EAR_HALF * cy * head_j, nose_y - EAR_ABOVE_NOSE * head_j)
    tilt = u(-10, 10)
    for i in (NOSE, R_EYE, L_EYE, R_EAR, L_EAR):
        pts[i] = _rotated(pts[i], pts[NECK], tilt)
    mid_hip = (0.0, torso)
    lean = u(-5, 5)
    return [_rotated(p, mid_hip, lean) for p in pts]


def _extent(pts: list[Vec]) -> tuple[float, float, float, float]:
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    return min(xs), min(ys), max(xs), max(ys)


def min_slot_width(height: int) -> int:
    """The narrowest horizontal slot, in pixels, that one figure needs on a canvas this tall."""
    return max(MIN_SLOT_PX, math.ceil(MIN_SLOT_FRACTION * height))


def max_figures(width: int, height: int) -> int:
    """How many figures fit side by side on a ``width`` x ``height`` canvas."""
    if height < MIN_CANVAS_HEIGHT:
        return 0
    return width // min_slot_width(height)


def _check_canvas(figures: int, width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ForgeError(f"canvas size must be positive, got {width}x{height}",
                         fix="pass --size like 1024x768")
    if figures < 1:
        raise ForgeError(f"--figures must be at least 1, got {figures}",
                         fix="pass --figures 1 or more")
    if height < MIN_CANVAS_HEIGHT:
        raise ForgeError(f"a {width}x{height} canvas is too short for a figure: it must be at "
                         f"least {MIN_CANVAS_HEIGHT} px tall",
                         fix=f"use a taller --size, e.g. {max(width, 512)}x512")
    fit = max_figures(width, height)
    if figures > fit:
        slot = min_slot_width(height)
        at_most = "no figure fits" if fit == 0 else f"at most {fit} fit"
        fewer = f"--figures {fit} or fewer, or " if fit else ""
        widest = max_figures(MAX_CANVAS_SIDE, height)
        fix = (f"use {fewer}a wider --size, e.g. {figures * slot}x{height}"
               if figures * slot <= MAX_CANVAS_SIDE else
               f"use {fewer}a wider --size; even the widest canvas, {MAX_CANVAS_SIDE}x{height}, "
               f"holds at most {widest} figures")
        raise ForgeError(
            f"{figures} figures do not fit side by side on a {width}x{height} canvas: {at_most} "
            f"at this size (each figure needs a slot at least {slot} px wide)", fix=fix)


def random_pose(figures: int, width: int, height: int, seed: int) -> PoseMap:
    """``figures`` plausible people side by side on a ``width`` x ``height`` canvas.

    Each figure gets an equal horizontal slot and stays inside it (with a gap), so bounding boxes
    never overlap; statures are similar, 74-88% of the canvas height where the slot is wide enough
    (narrow slots scale them down to what a figure standing at attention needs, ~60% at the
    narrowest slot allowed). Poses too wide or tall for the slot are drawn again. Same seed, same
    pose.
    """
    _check_canvas(figures, width, height)
    if seed < 0:
        raise ForgeError(f"--seed must be 0 or more, got {seed}")
    rng = np.random.default_rng(seed)
    slot = width / figures
    pad = stroke_radius(width, height) + 1.0
    gap = max(2.0, 0.02 * slot)
    margin_y = max(2.0, 0.02 * height)
    avail_w = slot - 2 * gap - 2 * pad
    avail_h = height - 2 * margin_y - 2 * pad
    first, second = rng.random(2).tolist()
    common = min((0.74 + 0.14 * first) * height, avail_w / ATTENTION_MAX_WIDTH)
    floor_t = 0.5 * second
    people = []
    for index in range(figures):
        target = common * (0.96 + 0.06 * float(rng.random()))
        for _ in range(60):
            pts = _build_figure(rng, _pick_base(rng))
            x0, y0, x1, y1 = _extent(pts)
            fit = min(avail_w / (x1 - x0), avail_h / (y1 - y0))
            if fit >= 0.95 * target:
                break
        else:  # a narrow slot where nothing else fitted: "at attention" always fits the cap
            pts = _build_figure(rng, _ATTENTION)
            x0, y0, x1, y1 = _extent(pts)
            fit = min(avail_w / (x1 - x0), avail_h / (y1 - y0))
        stature = min(target, fit)
        slack_x = avail_w - stature * (x1 - x0)
        slack_y = avail_h - stature * (y1 - y0)
        left = index * slot + gap + pad + float(rng.random()) * 0.6 * slack_x + 0.2 * slack_x
        bottom = height - margin_y - pad - floor_t * slack_y
        dx, dy = left - stature * x0, bottom - stature * y1
        people.append(Person(tuple((round(stature * x + dx, 2), round(stature * y + dy, 2))
                                   for x, y in pts)))
    return PoseMap(width, height, tuple(people))


# --- checks -----------------------------------------------------------------------------------

def _dist(a: Vec, b: Vec) -> float:
    return math.hypot(b[0] - a[0], b[1] - a[1])


def _angle_from(a: Vec, b: Vec, down: bool = True) -> float:
    """Degrees between the direction a->b and straight down (or straight up)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    if dx == 0 and dy == 0:
        return 0.0
    return abs(math.degrees(math.atan2(dx, dy if down else -dy)))


def _interior(a: Vec, b: Vec, c: Vec) -> float:
    """Interior angle at b (degrees) of the chain a-b-c."""
    ux, uy, vx, vy = a[0] - b[0], a[1] - b[1], c[0] - b[0], c[1] - b[1]
    if (ux == 0 and uy == 0) or (vx == 0 and vy == 0):
        return 180.0
    return abs(math.degrees(math.atan2(ux * vy - uy * vx, ux * vx + uy * vy)))


_PAIRS = ((R_SHOULDER, L_SHOULDER, "shoulders"), (R_HIP, L_HIP, "hips"),
          (R_EYE, L_EYE, "eyes"), (R_EAR, L_EAR, "ears"))


def _check_person(person: Person, pose: PoseMap, pad: float) -> tuple[list[str], float | None]:
    """Problems with one generated figure, and its stature estimate (None if unknown)."""
    problems: list[str] = []
    missing = [KEYPOINT_NAMES[i] for i, p in enumerate(person.keypoints) if p is None]
    if missing:
        return [f"missing keypoints: {', '.join(missing)}"], None
    box = person.bbox(pad)
    assert box is not None
    x0, y0, x1, y1 = box
    if x0 < 0 or y0 < 0 or x1 > pose.width or y1 > pose.height:
        problems.append(f"drawn extent ({x0:.1f}, {y0:.1f})-({x1:.1f}, {y1:.1f}) leaves the "
                        f"{pose.width}x{pose.height} canvas")
    p: list[Vec] = [q if q is not None else (0.0, 0.0) for q in person.keypoints]  # all present
    mid_hip = ((p[R_HIP][0] + p[L_HIP][0]) / 2, (p[R_HIP][1] + p[L_HIP][1]) / 2)
    torso = _dist(p[NECK], mid_hip)
    if torso == 0:
        return [*problems, "torso has zero length"], None
    stature = torso / STATURE_TO_TORSO
    for i, (a, b) in enumerate(LIMBS):
        ratio = _dist(p[a], p[b]) / (stature * LIMB_LENGTHS[i])
        lo, hi = FACE_RANGE if i in FACE_LIMBS else BODY_RANGE
        if not lo <= ratio <= hi:
            problems.append(f"{KEYPOINT_NAMES[a]}-{KEYPOINT_NAMES[b]} is {ratio:.2f}x its "
                            f"expected length (allowed {lo}-{hi})")
    for j0, j2, reach, what in ((R_SHOULDER, R_WRIST, UPPER_ARM + FOREARM, "right wrist"),
                                (L_SHOULDER, L_WRIST, UPPER_ARM + FOREARM, "left wrist"),
                                (R_HIP, R_ANKLE, THIGH + SHANK, "right ankle"),
                                (L_HIP, L_ANKLE, THIGH + SHANK, "left ankle")):
        if _dist(p[j0], p[j2]) > REACH_SLACK * reach * stature:
            problems.append(f"{what} is out of reach of its {KEYPOINT_NAMES[j0]}")
    if _angle_from(p[NECK], mid_hip) > 15:
        problems.append("torso leans more than 15 degrees (or is upside down)")
    if _angle_from(p[NECK], p[NOSE], down=False) > 35:
        problems.append("head is tilted more than 35 degrees (or hangs below the neck)")
    for name, (h, k, a) in (("right", (R_HIP, R_KNEE, R_ANKLE)),
                            ("left", (L_HIP, L_KNEE, L_ANKLE))):
        if _angle_from(p[h], p[k]) > 50 or _angle_from(p[k], p[a]) > 50:
            problems.append(f"{name} leg is raised more than 50 degrees (not a standing pose)")
        if _interior(p[h], p[k], p[a]) < 140:
            problems.append(f"{name} knee bends more than 40 degrees")
        if not p[h][1] < p[k][1] < p[a][1]:
            problems.append(f"{name} hip, knee and ankle are not in order from top to bottom")
    for name, (sh, el, wr) in (("right", (R_SHOULDER, R_ELBOW, R_WRIST)),
                               ("left", (L_SHOULDER, L_ELBOW, L_WRIST))):
        if _interior(p[sh], p[el], p[wr]) < 20:
            problems.append(f"{name} elbow folds past its limit")
    for r, left, what in _PAIRS:
        if not p[r][0] < p[left][0]:
            problems.append(f"right/left swapped: the person's right {what[:-1]} should be on "
                            "the image's left for a figure facing the viewer")
    return problems, stature


def validate_pose(pose: PoseMap, *, strict: bool = True) -> list[str]:
    """Problems with ``pose``, one message each; an empty list means it passes.

    ``strict`` (generated figures): every keypoint present; the drawn extent (keypoints plus
    stroke width) inside the canvas; limb lengths within the proportion ranges and joints within
    reach, relative to a stature estimated from the torso; standing-family joint angles; facing
    the viewer (right on the image's left); bounding boxes of different people apart; statures
    similar and 50-95% of the canvas height.

    Not strict (poses from editors, partly visible people): keypoints inside the canvas, left and
    right labelled consistently, and a hint when coordinates look normalised (0..1) not pixels.
    """
    problems: list[str] = []
    pad = stroke_radius(pose.width, pose.height) + 0.5
    if not strict:
        coords = [c for person in pose.people for p in person.keypoints if p is not None
                  for c in p]
        if coords and max(coords) <= 1.0 and min(pose.width, pose.height) > 8:
            problems.append("all coordinates lie within 0..1: they look normalised, but the "
                            "exchange format uses pixels")
        for k, person in enumerate(pose.people, 1):
            outside = [KEYPOINT_NAMES[i] for i, p in enumerate(person.keypoints)
                       if p is not None and not (0 <= p[0] <= pose.width
                                                 and 0 <= p[1] <= pose.height)]
            if outside:
                problems.append(f"person {k}: outside the canvas: {', '.join(outside)}")
            signs = {what: person[r][0] < person[left][0] for r, left, what in _PAIRS
                     if person[r] is not None and person[left] is not None
                     and person[r][0] != person[left][0]}
            if len(set(signs.values())) > 1:
                problems.append(f"person {k}: right and left look swapped for some keypoints "
                                f"({', '.join(w for w, s in signs.items() if not s)})")
        return problems
    statures: list[float] = []
    for k, person in enumerate(pose.people, 1):
        found, stature = _check_person(person, pose, pad)
        problems += [f"person {k}: {msg}" for msg in found]
        if stature is not None:
            statures.append(stature)
            share = stature / pose.height
            if not STATURE_RANGE[0] <= share <= STATURE_RANGE[1]:
                problems.append(f"person {k}: stature is {share:.0%} of the canvas height "
                                f"(expected {STATURE_RANGE[0]:.0%}-{STATURE_RANGE[1]:.0%})")
    if len(statures) > 1 and max(statures) > SIMILAR_HEIGHTS * min(statures):
        problems.append(f"figure heights differ too much ({min(statures):.0f}-"
                        f"{max(statures):.0f} px)")
    boxes = [person.bbox(pad) for person in pose.people]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            a, b = boxes[i], boxes[j]
            if a is None or b is None:
                continue
            if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                problems.append(f"people {i + 1} and {j + 1} overlap")
    return problems


_PALETTE = np.array(COLORS + LIMB_COLORS, dtype=np.int16)


def looks_like_pose_map(image: Image.Image) -> tuple[bool, str]:
    """Whether ``image`` looks like an OpenPose map (mostly black, OpenPose colours), and why."""
    im = image.convert("RGB")
    if max(im.size) > 256:
        scale = 256 / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                       Image.Resampling.NEAREST)
    a = np.asarray(im, dtype=np.int16).reshape(-1, 3)
    if a.size == 0 or int((a.max(axis=0) - a.min(axis=0)).max()) <= 4:
        colour = "all black" if a.size == 0 or int(a.max()) <= 32 else "a single flat colour"
        return False, f"blank: the image is {colour}, no figure is drawn"
    black = a.max(axis=1) <= 32
    black_share = float(black.mean())
    if float((a.min(axis=1) >= 224).mean()) >= 0.5:
        return False, "mostly white background: OpenPose maps are drawn on black"
    if black_share < 0.6:
        return False, (f"looks like a photo, not a pose map: only {black_share:.0%} of it is "
                       "black background (a pose map is mostly black)")
    coloured = a[~black]
    if len(coloured) < max(4, 0.0005 * len(a)):
        return False, "blank: the image is almost all black, no figure is drawn"
    distance = np.abs(coloured[:, None, :] - _PALETTE[None, :, :]).max(axis=2).min(axis=1)
    match = float((distance <= 48).mean())
    if match < 0.5:
        return False, (f"looks like a photo or drawing, not a pose map: only {match:.0%} of its "
                       "coloured pixels are OpenPose colours")
    return True, (f"pose map: {black_share:.0%} black background, {match:.0%} of the coloured "
                  "pixels in the OpenPose palette")


# --- CLI glue ---------------------------------------------------------------------------------

def _check_output(output: Path, *, png: bool = True) -> None:
    if output.is_dir():
        raise ForgeError("is a folder; expected a file name", path=output,
                         fix="pass a file path, e.g. pose_map.png")
    existing = next((folder for folder in output.parents if folder.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ForgeError(f"cannot be written: {existing} is a file, not a folder", path=output,
                         fix="pass a path inside a folder")
    if png and output.suffix.lower() != ".png":
        raise ForgeError("pose maps are written as PNG (a lossy format would change the "
                         "colours the ControlNet reads)", path=output,
                         fix=f"name the output {output.with_suffix('.png').name}")
    if not png and output.suffix.lower() != ".json":
        raise ForgeError("the OpenPose JSON needs its own .json name", path=output,
                         fix="pass --pose-json with a .json name, e.g. pose_map.json")


def save_png(image: Image.Image, output: Path, mode: int = DEFAULT_FILE_MODE,
             json_digest: str | None = None, source: str | None = None) -> None:
    """Write a pose map as PNG, atomically, with permissions ``mode`` (storage.file_mode),
    marked as one (never over another kind of file: see `refuse_foreign`), recording
    ``json_digest`` (the SHA-256 of the JSON written beside it) and ``source`` (what it was
    extracted from) when given; ForgeError naming the file if it cannot be."""
    from PIL.PngImagePlugin import PngInfo

    refuse_foreign(output)
    info = PngInfo()
    info.add_text(*POSE_MARK)
    if json_digest is not None:
        info.add_text(JSON_DIGEST_KEY, json_digest)
    if source is not None:
        info.add_text(SOURCE_KEY, source)
    try:
        save_atomic(output, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), mode)
    except OSError as exc:
        raise ForgeError(f"cannot be written: {exc.strerror or exc}", path=output,
                         fix="check the folder exists and is writable") from None


def random_pose_command(output: Path, figures: int, size: str, seed: int,
                        json_out: Path | None, mode: int = DEFAULT_FILE_MODE) -> list[str]:
    """``loraforge pose random``: draw random figures to ``output`` (and JSON), with permissions
    ``mode`` (storage.file_mode); lines to print."""
    width, height = parse_size(size)
    output = Path(output)
    _check_output(output)
    if json_out is not None:
        json_out = Path(json_out)
        if json_out.resolve() == output.resolve():
            raise ForgeError("the PNG and the JSON would be the same file", path=output,
                             fix="give --pose-json a different name, e.g. pose_map.json")
        _check_output(json_out, png=False)
    pose = random_pose(figures, width, height, seed)
    image = draw_pose(pose)
    if json_out is not None:  # checked before the PNG is written (save_png checks the PNG)
        refuse_foreign(json_out)
    save_png(image, output, mode)
    noun = "figure" if figures == 1 else "figures"
    lines = [f"wrote {output} ({figures} {noun}, {width}x{height}, seed {seed})"]
    if json_out is not None:
        try:
            write_pose_json(json_out, pose, mode)
        except OSError as exc:
            raise ForgeError(f"cannot be written: {exc.strerror or exc}", path=json_out) from None
        lines.append(f"wrote {json_out} (OpenPose JSON)")
    return lines


def draw_figures(pose: PoseMap, path: Path, fix: str) -> Image.Image:
    """`draw_pose(pose)`, or ForgeError naming `path` when that map would be blank (no people,
    or every keypoint missing or off the canvas), as a blank pose map image is refused: it
    steers no figure, and the render would silently be an unposed one. One keypoint inside is
    a figure (the map's pixels are not judged: a lone dot is too small for that)."""
    points = [point for person in pose.people
              for part in (person.keypoints, *person.hands, person.face or ())
              for point in part or () if point is not None]
    if not any(0 <= x < pose.width and 0 <= y < pose.height for x, y in points):
        n = len(pose.people)
        listed = f"{n} {'person' if n == 1 else 'people'}" if n else "no people"
        raise ForgeError(f"draws no figure on its {pose.width}x{pose.height} canvas ({listed}; "
                         "no keypoint with a confidence above 0 inside it)", path=path, fix=fix)
    return draw_pose(pose)


def render_pose_command(pose_json: Path, output: Path | None,
                        mode: int = DEFAULT_FILE_MODE) -> list[str]:
    """``loraforge pose render``: draw an OpenPose JSON as a pose map, with permissions ``mode``
    (storage.file_mode); lines to print."""
    from loraforge.dataset.images import is_image_kind, sniff_file

    pose_json = Path(pose_json)
    kind = sniff_file(pose_json) if pose_json.is_file() else None
    if is_image_kind(kind):
        raise ForgeError(f"is {kind}, not OpenPose JSON: `pose render` draws the JSON a pose "
                         "editor exports", path=pose_json,
                         fix=f"a pose map image needs no rendering: use it as it is, e.g. "
                             f"`loraforge generate --pose {pose_json}`")
    output = pose_json.with_suffix(".png") if output is None else Path(output)
    _check_output(output)
    if output.resolve() == pose_json.resolve():
        raise ForgeError("the output would overwrite the pose JSON", path=output,
                         fix="pass -o with another name")
    pose = read_pose_json(pose_json)
    save_png(draw_figures(pose, pose_json, "add the figures' keypoints (export the pose again "
                          "from the editor), or draw random ones: `loraforge pose random`"),
             output, mode)
    n = len(pose.people)
    lines = [f"wrote {output} ({n} {'person' if n == 1 else 'people'}, "
             f"{pose.width}x{pose.height})"]
    lines += [f"warning: {msg}" for msg in validate_pose(pose, strict=False)]
    return lines
