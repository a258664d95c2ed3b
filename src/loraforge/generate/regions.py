"""Casting regions: where each posed figure's character acts, from its OpenPose keypoints.

A figure's region is the bounding box of its keypoints grown by `pad` times the box's longer
side (the head and hands reach past the keypoints), optionally softened at the edges. Where two
grown boxes meet, each pixel belongs to the figure whose keypoint box is nearer, so regions never
share a pixel; keypoint boxes that overlap are refused (the two characters would have to share
pixels). The background is everything else. A drawn pose map has no keypoints: its figures'
boxes are those of their strokes (`map_boxes`). Figures are numbered left to right (by the centre of
their keypoint box), whatever order the pose file lists them in.

Only numpy and Pillow here: regions are checked before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from loraforge.errors import ForgeError
from loraforge.generate.poses import Person, PoseMap

#: Colours of figures 1, 2, ... in `<name>.masks.png` (the background is black).
MASK_COLORS: tuple[tuple[int, int, int], ...] = (
    (230, 60, 60), (60, 110, 235), (70, 200, 90), (240, 200, 40), (190, 80, 220),
    (60, 210, 220), (245, 140, 40), (240, 120, 190),
)

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Regions:
    """Per-pixel weights on the generation canvas: `figures[i]` is figure i's region (0..1), the
    background is what the figures leave (`background()`)."""

    boxes: tuple[Box, ...]  # each figure's keypoint box, left to right
    figures: np.ndarray  # [F, H, W] float32, sum over figures <= 1 at every pixel

    @property
    def count(self) -> int:
        return len(self.boxes)

    def background(self) -> np.ndarray:
        return np.clip(1.0 - self.figures.sum(axis=0), 0.0, 1.0)

    def image(self) -> Image.Image:
        """The masks as a picture a user can check: each figure in its colour on black."""
        colours = np.array([MASK_COLORS[i % len(MASK_COLORS)] for i in range(self.count)],
                           dtype=np.float32)
        rgb = np.tensordot(self.figures, colours, axes=([0], [0]))
        return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")


def figures_left_to_right(pose: PoseMap) -> list[tuple[Person, Box]]:
    """The people that have keypoints, each with its keypoint box, ordered by the box's centre."""
    found = [(person, box) for person in pose.people
             if (box := person.bbox()) is not None]
    return sorted(found, key=lambda item: (item[1][0] + item[1][2]) / 2)


def _overlap(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _distance_to_box(box: Box, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    dx = np.maximum(np.maximum(box[0] - xs, 0.0), xs - box[2])
    dy = np.maximum(np.maximum(box[1] - ys, 0.0), ys - box[3])
    return np.hypot(dx, dy)


def figure_regions(pose: PoseMap, width: int, height: int, pad: float = 0.15,
                   soften: float = 0.0, where: str = "the pose") -> Regions:
    """The regions of `pose`'s figures on a `width` x `height` canvas (the pose is fitted to
    it first, as its drawn map is). `soften` blurs each region's edge over that fraction of the
    canvas's shorter side. ForgeError when the pose has no figure or two figures overlap."""
    from loraforge.generate.poses import fit_pose

    if (pose.width, pose.height) != (width, height):
        pose = fit_pose(pose, width, height)
    boxes = [box for _, box in figures_left_to_right(pose)]
    return box_regions(boxes, width, height, pad, soften, where)


#: A drawn pose map's pixels brighter than this (on any channel) are figure, not background.
INK = 40
#: Runs of inked columns with fewer pixels than this are specks, not figures.
MIN_FIGURE_PIXELS = 12


def map_boxes(image: Image.Image) -> list[Box]:
    """The figures of a drawn pose map, left to right: inked columns split where a whole column
    is black, each run's box around its ink. (Figures side by side, as pose maps draw them;
    figures sharing columns count as one.)"""
    ink = np.asarray(image.convert("RGB")).max(axis=2) > INK
    columns = np.concatenate([[False], ink.any(axis=0), [False]])
    edges = np.flatnonzero(np.diff(columns.astype(np.int8)))
    boxes: list[Box] = []
    for x0, x1 in zip(edges[::2], edges[1::2], strict=True):
        part = ink[:, x0:x1]
        if part.sum() < MIN_FIGURE_PIXELS:
            continue
        rows = np.flatnonzero(part.any(axis=1))
        boxes.append((float(x0), float(rows[0]), float(x1), float(rows[-1] + 1)))
    return boxes


#: A figure region smaller than one latent cell (8x8 pixels) would cast nothing.
MIN_REGION_PIXELS = 64


def _box_size(box: Box) -> str:
    return f"{box[2] - box[0]:.0f}x{box[3] - box[1]:.0f} px"


def box_regions(boxes: list[Box], width: int, height: int, pad: float = 0.15,
                soften: float = 0.0, where: str = "the pose") -> Regions:
    """The regions of figures with these boxes (left to right) on a `width` x `height` canvas."""
    if not boxes:
        raise ForgeError(f"{where} has no figures: casting needs one figure per "
                         "character", fix="use a pose with the figures drawn, or leave out the "
                                          "[[scene.figure]] tables")
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            if _overlap(boxes[i], boxes[j]):
                raise ForgeError(
                    f"{where}: figures {i + 1} and {j + 1} (from the left) overlap, so their "
                    "regions would share pixels and their characters would blend",
                    fix="move the figures apart in the pose (or use a random pose); or take "
                        "one of them out of the pose, and its [[scene.figure]] (--figure) out "
                        "of the cast; or render the scene uncast (no [[scene.figure]] or "
                        "--figure)")
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    distances = []
    for box in boxes:
        grow = pad * max(box[2] - box[0], box[3] - box[1])
        d = _distance_to_box(box, xs, ys)
        distances.append(np.where(d <= grow, d, np.inf))
    stacked = np.stack(distances)
    nearest = np.argmin(stacked, axis=0)
    inside = np.isfinite(stacked.min(axis=0))
    masks = np.stack([((nearest == i) & inside).astype(np.float32) for i in range(len(boxes))])
    for i, mask in enumerate(masks):
        if mask.sum() < MIN_REGION_PIXELS:
            raise ForgeError(
                f"{where}: figure {i + 1} (from the left) is too small to cast: its region "
                f"covers {int(mask.sum())} pixels (its keypoints span "
                f"{_box_size(boxes[i])}), less than one latent cell of 8x8",
                fix="give that figure its keypoints (head, shoulders and hips at least); or "
                    "take it out of the pose, and its [[scene.figure]] (--figure) out of the "
                    "cast")
    if soften > 0:
        # a Gaussian's edge rises from 2% to 98% over 4 sigma: that width is `soften`
        radius = soften * min(width, height) / 4
        masks = np.stack([np.asarray(Image.fromarray(m * 255).convert("L").filter(
            ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255 for m in masks])
        total = masks.sum(axis=0)
        masks = masks / np.maximum(total, 1.0)
    return Regions(tuple(boxes), masks.astype(np.float32))


def separation(image: np.ndarray, references: list[np.ndarray], regions: Regions) -> float:
    """The bleed metric: how much each figure's region looks like its own character rather
    than the others', averaged over figures. `references[i]` is the same scene rendered with
    figure i's character everywhere. In figure i's region (weight > 0.5), with `d` the mean
    absolute pixel difference: `(mean over j != i of d(image, ref j) - d(image, ref i)) /
    mean d(ref i, ref j)`. 1: no bleed (the region is its character's alone); 0: the region is
    no closer to its own character than to the others; negative: it wears another's."""
    scores = []
    pixels = [np.asarray(r, dtype=np.float64) for r in references]
    shot = np.asarray(image, dtype=np.float64)
    for i in range(regions.count):
        inside = regions.figures[i] > 0.5

        def d(a: np.ndarray, b: np.ndarray, inside: np.ndarray = inside) -> float:
            return float(np.abs(a - b)[inside].mean())

        others = [j for j in range(regions.count) if j != i]
        gap = np.mean([d(pixels[i], pixels[j]) for j in others])
        scores.append((np.mean([d(shot, pixels[j]) for j in others]) - d(shot, pixels[i]))
                      / max(gap, 1e-9))
    return float(np.mean(scores))


def closeness(image: np.ndarray, looks: list[np.ndarray], regions: Regions) -> list[float]:
    """How much each figure's region looks like its own character's look rather than the
    others': `looks[i]` is character i's mean colour (or latent) vector, `image` is [H, W, C] at
    the regions' size. In figure i's region (weight > 0.5), with `m` its mean vector:
    `(mean over j != i of |m - look j| - |m - look i|) / mean |look i - look j|`. 1: the region
    is its character's look; 0: halfway; negative: closer to another's."""
    scores = []
    for i in range(regions.count):
        mean = np.asarray(image, dtype=np.float64)[regions.figures[i] > 0.5].mean(axis=0)
        others = [j for j in range(regions.count) if j != i]
        gap = np.mean([np.linalg.norm(looks[i] - looks[j]) for j in others])
        scores.append(float((np.mean([np.linalg.norm(mean - looks[j]) for j in others])
                             - np.linalg.norm(mean - looks[i])) / max(gap, 1e-9)))
    return scores
