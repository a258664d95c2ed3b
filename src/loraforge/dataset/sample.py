"""A small, deterministic two-concept dataset for the demo: drawn with Pillow, no downloads.

`10_red_knight/` (a red-armoured knight with sword and shield) and `10_blue_mage/` (a blue-robed
mage with a pointed hat and a staff), seven images each in varied poses, backgrounds, sizes and
aspect ratios (so bucketing has something to do), each with a caption whose first tag is the
activation tag. The same call always writes the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from loraforge.fsutil import save_atomic, write_atomic

Color = tuple[int, int, int]

_BACKGROUNDS: dict[str, tuple[Color, Color, Color, list[str]]] = {
    # name: sky top, sky bottom, ground, tags
    "meadow": ((90, 150, 230), (190, 220, 250), (70, 150, 60), ["outdoors", "grass", "blue sky"]),
    "sunset": ((250, 120, 60), (250, 210, 120), (110, 80, 60),
               ["outdoors", "sunset", "orange sky"]),
    "night": ((10, 15, 50), (40, 50, 110), (30, 40, 45), ["outdoors", "night", "night sky"]),
    "castle": ((150, 150, 160), (200, 200, 205), (110, 100, 95), ["indoors", "stone wall"]),
    "snow": ((170, 200, 230), (230, 240, 250), (245, 245, 250), ["outdoors", "snow", "winter"]),
    "desert": ((120, 180, 240), (220, 230, 240), (220, 190, 120), ["outdoors", "desert", "sand"]),
    "forest": ((60, 110, 70), (120, 170, 110), (60, 90, 40), ["outdoors", "forest", "tree"]),
}


@dataclass(frozen=True)
class _Shot:
    size: tuple[int, int]
    background: str
    pose: str      # "standing", "arms up", "attack", "walking"
    flip: bool     # facing left instead of right
    scale: float   # figure height / image height
    x: float       # figure centre, fraction of width
    ext: str = ".png"


_SHOTS = (
    _Shot((256, 256), "meadow", "standing", False, 0.80, 0.50),
    _Shot((256, 320), "castle", "arms up", True, 0.78, 0.45),
    _Shot((320, 256), "sunset", "walking", False, 0.75, 0.35),
    _Shot((256, 384), "snow", "attack", False, 0.70, 0.55, ".jpg"),
    _Shot((384, 256), "night", "standing", True, 0.72, 0.65),
    _Shot((288, 288), "desert", "attack", True, 0.85, 0.50),
    _Shot((320, 320), "forest", "walking", True, 0.60, 0.40),
)

_POSE_TAGS = {"standing": ["standing"], "arms up": ["standing", "arms up"],
              "attack": ["fighting stance"], "walking": ["walking"]}


def _gradient(draw: ImageDraw.ImageDraw, size: tuple[int, int], top: Color, bottom: Color,
              horizon: int) -> None:
    for y in range(horizon):
        t = y / max(horizon - 1, 1)
        draw.line([(0, y), (size[0], y)],
                  fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)))


def _background(im: Image.Image, name: str) -> None:
    draw = ImageDraw.Draw(im)
    width, height = im.size
    top, bottom, ground, _ = _BACKGROUNDS[name]
    horizon = int(height * 0.72)
    _gradient(draw, im.size, top, bottom, horizon)
    draw.rectangle([0, horizon, width, height], fill=ground)
    if name == "night":
        for i in range(12):
            x, y = (i * 53 + 17) % width, (i * 37 + 11) % (horizon - 10)
            draw.ellipse([x, y, x + 3, y + 3], fill=(250, 250, 210))
    elif name == "castle":
        for row in range(0, horizon, 24):
            shift = 0 if (row // 24) % 2 else 20
            for col in range(-shift, width, 40):
                draw.rectangle([col, row, col + 38, row + 22], outline=(125, 125, 135))
    elif name == "forest":
        for i, x in enumerate(range(10, width, 70)):
            trunk_top = horizon - 90 - (i % 3) * 15
            draw.rectangle([x + 12, trunk_top + 40, x + 22, horizon], fill=(90, 60, 30))
            draw.polygon([(x, trunk_top + 55), (x + 17, trunk_top), (x + 34, trunk_top + 55)],
                         fill=(30, 100, 40))
    elif name == "sunset":
        draw.ellipse([width - 90, horizon - 40, width - 30, horizon + 20], fill=(255, 230, 120))
        draw.rectangle([0, horizon, width, height], fill=ground)


class _Figure:
    """Draws in a figure-local frame: x from the centre line (mirrored when flipped), y from top."""

    def __init__(self, im: Image.Image, shot: _Shot) -> None:
        self.draw = ImageDraw.Draw(im)
        width, height = im.size
        self.h = shot.scale * height
        self.cx = shot.x * width
        self.top = height * 0.95 - self.h
        self.flip = -1 if shot.flip else 1
        self.pose = shot.pose

    def p(self, x: float, y: float) -> tuple[float, float]:
        return (self.cx + self.flip * x * self.h, self.top + y * self.h)

    def poly(self, points: list[tuple[float, float]], fill: Color,
             outline: Color | None = None) -> None:
        self.draw.polygon([self.p(x, y) for x, y in points], fill=fill, outline=outline)

    def line(self, points: list[tuple[float, float]], fill: Color, width: float) -> None:
        self.draw.line([self.p(x, y) for x, y in points], fill=fill,
                       width=max(1, round(width * self.h)))

    def circle(self, x: float, y: float, r: float, fill: Color,
               outline: Color | None = None) -> None:
        cx, cy = self.p(x, y)
        rr = r * self.h
        self.draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=fill, outline=outline)

    def legs(self, color: Color) -> None:
        if self.pose == "walking":
            self.line([(-0.03, 0.62), (-0.10, 0.99)], color, 0.06)
            self.line([(0.03, 0.62), (0.11, 0.99)], color, 0.06)
        elif self.pose == "attack":
            self.line([(-0.03, 0.62), (-0.13, 0.99)], color, 0.06)
            self.line([(0.03, 0.62), (0.14, 0.99)], color, 0.06)
        else:
            self.line([(-0.04, 0.62), (-0.05, 0.99)], color, 0.06)
            self.line([(0.04, 0.62), (0.05, 0.99)], color, 0.06)

    def hand(self) -> tuple[float, float]:
        """Where the weapon hand is (front arm), by pose."""
        return {"arms up": (0.14, 0.02), "attack": (0.26, 0.30),
                "walking": (0.15, 0.50)}.get(self.pose, (0.17, 0.55))

    def arms(self, color: Color, shoulder_y: float) -> tuple[float, float]:
        hand = self.hand()
        back = (-0.14, 0.02) if self.pose == "arms up" else (-0.17, 0.52)
        self.line([(0.09, shoulder_y), hand], color, 0.055)
        self.line([(-0.09, shoulder_y), back], color, 0.055)
        return hand


def _knight(im: Image.Image, shot: _Shot) -> None:
    f = _Figure(im, shot)
    red, dark_red, steel, gold = (200, 30, 35), (120, 15, 20), (175, 180, 190), (230, 190, 50)
    f.legs(steel)
    f.poly([(-0.12, 0.24), (0.12, 0.24), (0.10, 0.64), (-0.10, 0.64)], red, dark_red)
    f.line([(-0.10, 0.50), (0.10, 0.50)], gold, 0.02)
    hand = f.arms(red, 0.27)
    if f.pose == "attack":
        tip = (hand[0] + 0.40, hand[1] - 0.12)
    else:
        tip = (hand[0] + 0.05, hand[1] - 0.42)
    f.line([hand, tip], steel, 0.025)
    f.line([(hand[0] - 0.05, hand[1] - 0.02), (hand[0] + 0.05, hand[1] + 0.02)], gold, 0.02)
    f.poly([(-0.26, 0.30), (-0.10, 0.30), (-0.10, 0.50), (-0.18, 0.58), (-0.26, 0.50)],
           dark_red, gold)
    f.line([(-0.18, 0.32), (-0.18, 0.54)], gold, 0.02)
    f.circle(0.0, 0.14, 0.10, steel, (90, 90, 100))
    f.line([(-0.06, 0.13), (0.08, 0.13)], (40, 40, 50), 0.02)
    f.poly([(-0.02, 0.05), (0.03, -0.06), (0.07, 0.05)], red)


def _mage(im: Image.Image, shot: _Shot) -> None:
    f = _Figure(im, shot)
    blue, dark_blue, skin, wood = (40, 80, 200), (20, 40, 120), (240, 205, 175), (120, 80, 40)
    f.legs(dark_blue)
    f.poly([(-0.07, 0.26), (0.07, 0.26), (0.20, 0.90), (-0.20, 0.90)], blue, dark_blue)
    for x, y in ((-0.08, 0.60), (0.06, 0.72), (0.0, 0.48)):
        f.circle(x, y, 0.018, (250, 240, 140))
    hand = f.arms(blue, 0.30)
    f.line([(hand[0], hand[1] - 0.25), (hand[0], min(hand[1] + 0.45, 0.99))], wood, 0.025)
    f.circle(hand[0], hand[1] - 0.28, 0.05, (120, 230, 255), (255, 255, 255))
    f.circle(0.0, 0.18, 0.08, skin)
    f.circle(0.03, 0.17, 0.012, (30, 30, 60))
    f.poly([(-0.15, 0.14), (0.15, 0.14), (0.04, -0.12)], dark_blue, blue)


@dataclass(frozen=True)
class _Concept:
    folder: str
    tag: str
    base_tags: tuple[str, ...]
    drawer: Callable[[Image.Image, _Shot], None]
    held: str


_CONCEPTS = (
    _Concept("10_red_knight", "red_knight", ("1boy", "solo", "knight", "red armor", "helmet",
                                             "shield"), _knight, "sword"),
    _Concept("10_blue_mage", "blue_mage", ("1girl", "solo", "mage", "blue robe", "wizard hat"),
             _mage, "staff"),
)

#: The concept folders `write_sample_dataset` makes.
SAMPLE_FOLDERS = tuple(concept.folder for concept in _CONCEPTS)


def _render(concept: _Concept, shot: _Shot) -> Image.Image:
    im = Image.new("RGB", shot.size)
    _background(im, shot.background)
    concept.drawer(im, shot)
    return im


def _caption(concept: _Concept, shot: _Shot) -> str:
    tags = [concept.tag, *concept.base_tags, f"holding {concept.held}",
            *_POSE_TAGS[shot.pose], "full body"]
    if shot.flip:
        tags.append("facing left")
    tags.extend(_BACKGROUNDS[shot.background][3])
    return ", ".join(tags) + "\n"


def _saver(im: Image.Image, ext: str) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        if ext == ".jpg":
            im.save(tmp, format="JPEG", quality=95)
        else:
            im.save(tmp, format="PNG", optimize=False)
    return write


def write_sample_dataset(dataset_dir: Path) -> list[Path]:
    """Write the sample dataset under `dataset_dir`; return the files written.

    Existing files are never overwritten (they are skipped and not returned), so a rerun is
    harmless; every write is atomic.
    """
    written: list[Path] = []
    for concept in _CONCEPTS:
        folder = Path(dataset_dir) / concept.folder
        for index, shot in enumerate(_SHOTS, start=1):
            stem = f"{concept.tag}_{index:02d}"
            image_path = folder / f"{stem}{shot.ext}"
            caption_path = folder / f"{stem}.txt"
            if not image_path.exists():
                save_atomic(image_path, _saver(_render(concept, shot), shot.ext))
                written.append(image_path)
            if not caption_path.exists():
                write_atomic(caption_path, _caption(concept, shot))
                written.append(caption_path)
    return written
