"""From the body network's outputs to people: keypoint peaks, limbs scored along part affinity
fields, limbs joined into skeletons (the bottom-up parsing of Cao et al. 2017, section 2.4).

1. Both outputs (stride 8) are upsampled to the input's pixels; heatmaps are smoothed (Gaussian,
   sigma 3 px). A keypoint candidate is a pixel above ``peak`` that is strictly higher than its
   eight neighbours (so a flat map yields none), at most ``max_peaks`` per keypoint.
2. Each of the 19 limbs (the 17 drawn ones, plus ear-shoulder links that only join parts) scores
   every candidate pair by sampling its affinity field at ``samples`` points along the segment
   and projecting onto the segment's direction. A pair is kept when more than ``min_ratio`` of the
   samples exceed ``field`` and the mean, less a penalty for limbs longer than half the picture's
   height, is positive. Pairs are then matched greedily by score, each candidate used once.
3. Limbs sharing a keypoint candidate join one person; two partial people that meet at a limb
   merge when they hold no keypoint in common. People with fewer than ``min_parts`` keypoints or a
   mean score (keypoints and limbs) under ``min_mean`` are dropped.

The channel layout of the fields is the trained COCO model's (Cao et al.'s release): limb i reads
its x component from channel ``FIELD_CHANNELS[i][0]`` and its y component from the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from loraforge.generate.poses import NUM_KEYPOINTS, Person

if TYPE_CHECKING:
    import torch

# The 19 limbs the network was trained with, as 0-based COCO keypoint pairs; the first 17 are the
# pose map's limbs, the last two (shoulder-ear) only join parts found through other limbs.
LIMB_PAIRS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
    (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17),
)
FIELD_CHANNELS: tuple[tuple[int, int], ...] = (
    (12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7),
    (8, 9), (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27),
)
JOINING_ONLY = 2  # the last LIMB_PAIRS never start a person
STRIDE = 8
SMOOTH_SIGMA = 3.0


@dataclass(frozen=True)
class Thresholds:
    peak: float = 0.1
    field: float = 0.05
    samples: int = 10
    min_ratio: float = 0.8
    min_parts: int = 4
    min_mean: float = 0.4
    max_peaks: int = 32


DEFAULT = Thresholds()


@dataclass(frozen=True)
class Candidate:
    part: int
    x: float
    y: float
    score: float


def upsample_maps(maps: torch.Tensor, width: int, height: int) -> np.ndarray:
    """Stride-8 maps (C, h, w) -> (C, height, width) over the unpadded input (bicubic)."""
    import torch
    from torch.nn import functional

    with torch.no_grad():
        big = functional.interpolate(maps[None].float(), scale_factor=STRIDE, mode="bicubic",
                                     align_corners=False)[0]
    return big[:, :height, :width].numpy()


def upsample(fields: torch.Tensor, heatmaps: torch.Tensor, width: int, height: int,
             ) -> tuple[np.ndarray, np.ndarray]:
    """The body network's outputs at the input's pixels: (fields, heatmaps)."""
    return upsample_maps(fields, width, height), upsample_maps(heatmaps, width, height)


def smooth_maps(maps: np.ndarray, sigma: float = SMOOTH_SIGMA) -> np.ndarray:
    """Each map blurred by a Gaussian (separable, edges replicated), as one depthwise conv."""
    import torch
    from torch.nn import functional

    radius = int(3 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    kernel /= kernel.sum()
    n = len(maps)
    x = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[None]
    with torch.no_grad():
        x = functional.conv2d(functional.pad(x, (radius, radius, 0, 0), mode="replicate"),
                              kernel.view(1, 1, 1, -1).expand(n, 1, 1, -1), groups=n)
        x = functional.conv2d(functional.pad(x, (0, 0, radius, radius), mode="replicate"),
                              kernel.view(1, 1, -1, 1).expand(n, 1, -1, 1), groups=n)
    return x[0].numpy()


def find_peaks(heatmaps: np.ndarray, limits: Thresholds = DEFAULT) -> list[list[Candidate]]:
    """Keypoint candidates per part (18 lists), from heatmaps (>= 18, H, W) at input pixels."""
    import torch
    from torch.nn import functional

    smooth = smooth_maps(heatmaps[:NUM_KEYPOINTS])
    with torch.no_grad():
        window = functional.max_pool2d(torch.from_numpy(smooth)[None], 3, 1, 1)[0].numpy()
    parts, ys, xs = np.nonzero((smooth == window) & (smooth > limits.peak))
    # A local maximum counts only when no neighbour equals it: a plateau has no peak.
    padded = np.pad(smooth, ((0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    strict = np.ones(len(parts), dtype=bool)
    for dy, dx in ((0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)):
        strict &= smooth[parts, ys, xs] > padded[parts, ys + dy, xs + dx]
    higher = np.zeros(smooth.shape, dtype=bool)
    higher[parts[strict], ys[strict], xs[strict]] = True
    candidates: list[list[Candidate]] = []
    for part in range(NUM_KEYPOINTS):
        ys, xs = np.nonzero(higher[part])
        scores = heatmaps[part, ys, xs]
        order = np.argsort(-scores, kind="stable")[:limits.max_peaks]
        candidates.append([Candidate(part, float(xs[i]), float(ys[i]), float(scores[i]))
                           for i in order])
    return candidates


def score_limbs(fields: np.ndarray, starts: list[Candidate], ends: list[Candidate],
                channels: tuple[int, int], limits: Thresholds = DEFAULT,
                ) -> list[tuple[int, int, float]]:
    """(start index, end index, score) of the limbs chosen between two keypoints' candidates,
    best first, each candidate used at most once."""
    if not starts or not ends:
        return []
    height, width = fields.shape[1:]
    a = np.array([(c.x, c.y) for c in starts])[:, None, :]
    b = np.array([(c.x, c.y) for c in ends])[None, :, :]
    vec = b - a
    norm = np.linalg.norm(vec, axis=2)
    unit = vec / np.maximum(norm, 1e-9)[..., None]
    t = np.linspace(0.0, 1.0, limits.samples)
    points = a[:, :, None, :] + t[None, None, :, None] * vec[:, :, None, :]
    xs = np.clip(np.rint(points[..., 0]).astype(int), 0, width - 1)
    ys = np.clip(np.rint(points[..., 1]).astype(int), 0, height - 1)
    along = (fields[channels[0]][ys, xs] * unit[..., 0:1]
             + fields[channels[1]][ys, xs] * unit[..., 1:2])
    mean = along.mean(axis=2) + np.minimum(0.5 * height / np.maximum(norm, 1e-9) - 1, 0)
    kept = ((along > limits.field).mean(axis=2) > limits.min_ratio) & (mean > 0) & (norm > 0)
    pairs = sorted(((float(mean[i, j]), i, j) for i, j in zip(*np.nonzero(kept), strict=True)),
                   reverse=True)
    chosen: list[tuple[int, int, float]] = []
    used_a: set[int] = set()
    used_b: set[int] = set()
    for score, i, j in pairs:
        if i not in used_a and j not in used_b:
            chosen.append((int(i), int(j), score))
            used_a.add(i)
            used_b.add(j)
            if len(chosen) == min(len(starts), len(ends)):
                break
    return chosen


@dataclass
class _Skeleton:
    parts: list[Candidate | None]
    score: float

    def count(self) -> int:
        return sum(p is not None for p in self.parts)


def assemble(candidates: list[list[Candidate]], fields: np.ndarray,
             limits: Thresholds = DEFAULT) -> list[Person]:
    """People from keypoint candidates and affinity fields (at the same pixels), left to right."""
    people: list[_Skeleton] = []
    for k, ((pa, pb), channels) in enumerate(zip(LIMB_PAIRS, FIELD_CHANNELS, strict=True)):
        starts, ends = candidates[pa], candidates[pb]
        for i, j, score in score_limbs(fields, starts, ends, channels, limits):
            a, b = starts[i], ends[j]
            found = [s for s in people if s.parts[pa] is a or s.parts[pb] is b]
            if len(found) == 1:  # the limb grows a person by the end it does not hold yet
                person = found[0]
                for part, candidate in ((pb, b), (pa, a)):
                    if person.parts[part] is None:
                        person.parts[part] = candidate
                        person.score += candidate.score + score
            elif len(found) == 2:
                first, second = found
                if all(x is None or y is None for x, y in zip(first.parts, second.parts,
                                                              strict=True)):
                    first.parts = [x if x is not None else y
                                   for x, y in zip(first.parts, second.parts, strict=True)]
                    first.score += second.score + score
                    people.remove(second)
                elif first.parts[pb] is None:
                    first.parts[pb] = b
                    first.score += b.score + score
            elif k < len(LIMB_PAIRS) - JOINING_ONLY:
                parts: list[Candidate | None] = [None] * NUM_KEYPOINTS
                parts[pa], parts[pb] = a, b
                people.append(_Skeleton(parts, a.score + b.score + score))
    kept = [s for s in people if s.count() >= limits.min_parts
            and s.score / s.count() >= limits.min_mean]
    result = [Person(tuple(None if p is None else (p.x, p.y) for p in s.parts)) for s in kept]
    return sorted(result, key=lambda person: _left(person))


def _left(person: Person) -> float:
    box = person.bbox()
    return box[0] if box is not None else 0.0


def people_from_maps(fields: np.ndarray, heatmaps: np.ndarray,
                     limits: Thresholds = DEFAULT) -> list[Person]:
    """People in pixel coordinates of full-resolution fields (38, H, W) and heatmaps (19, H, W)."""
    return assemble(find_peaks(heatmaps, limits), fields, limits)
