"""Hands for the people found in a picture: a square around each hand the body reveals, run
through the hand network, one keypoint per heatmap (the crop and peak steps serve faces too).

Where a hand is: past the wrist, a third of the forearm further along it; how big: 1.5 times
the longer of the forearm and 0.9 times the upper arm (the rule of OpenPose's body-based hand
detector, Simon et al. 2017). A hand needs its shoulder, elbow and wrist; its square is clipped
to the picture and skipped under 20 px. The crop is scaled to the network's 368 px input; each
of the 21 heatmaps (upsampled, smoothed) gives its highest point as the keypoint when that is
above ``PEAK``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from loraforge.generate.poses import (
    L_ELBOW,
    L_SHOULDER,
    L_WRIST,
    NUM_HAND_KEYPOINTS,
    R_ELBOW,
    R_SHOULDER,
    R_WRIST,
    Hand,
    Person,
    PoseMap,
)

if TYPE_CHECKING:
    import torch

# (shoulder, elbow, wrist) of the person's left hand, then of the right: Person.hands' order.
ARMS = ((L_SHOULDER, L_ELBOW, L_WRIST), (R_SHOULDER, R_ELBOW, R_WRIST))
PAST_WRIST = 0.33
SIZE_FACTOR = 1.5
UPPER_ARM_FACTOR = 0.9
MIN_SIDE = 20
INPUT_SIDE = 368
PEAK = 0.05


def hand_box(person: Person, arm: tuple[int, int, int], width: int, height: int,
             ) -> tuple[float, float, float] | None:
    """(left, top, side) of the square around one hand in a W x H picture; None if the arm is
    not visible or the square is too small."""
    shoulder, elbow, wrist = (person[i] for i in arm)
    if shoulder is None or elbow is None or wrist is None:
        return None
    cx = wrist[0] + PAST_WRIST * (wrist[0] - elbow[0])
    cy = wrist[1] + PAST_WRIST * (wrist[1] - elbow[1])
    side = SIZE_FACTOR * max(math.dist(wrist, elbow),
                             UPPER_ARM_FACTOR * math.dist(elbow, shoulder))
    left, top = max(0.0, cx - side / 2), max(0.0, cy - side / 2)
    side = min(side, width - left, height - top)
    return (left, top, side) if side >= MIN_SIDE else None


def part_points(heatmaps: np.ndarray, count: int) -> tuple[tuple[float, float] | None, ...]:
    """One keypoint for each of the first ``count`` heatmaps (C, side, side): its highest
    point (after smoothing) when above ``PEAK``."""
    from loraforge.generate.skeletons import smooth_maps

    smooth = smooth_maps(heatmaps[:count])
    points: list[tuple[float, float] | None] = []
    for channel in smooth:
        y, x = np.unravel_index(int(np.argmax(channel)), channel.shape)
        points.append((float(x), float(y)) if channel[y, x] > PEAK else None)
    return tuple(points)


def hand_points(heatmaps: np.ndarray) -> Hand:
    """The 21 hand keypoints from the hand network's heatmaps over its crop."""
    return part_points(heatmaps, NUM_HAND_KEYPOINTS)


def crop_maps(net: torch.nn.Module, crop: Image.Image) -> np.ndarray:
    """A hand or face network's heatmaps over a square crop scaled to 368 px."""
    import torch

    from loraforge.generate.extract import network_input
    from loraforge.generate.skeletons import upsample_maps

    with torch.no_grad():
        heatmaps = net(network_input(crop.resize((INPUT_SIDE, INPUT_SIDE),
                                                 Image.Resampling.BICUBIC)))
    return upsample_maps(heatmaps[0], INPUT_SIDE, INPUT_SIDE)


def add_hands(net: torch.nn.Module, picture: Image.Image, pose: PoseMap) -> PoseMap:
    """``pose`` (in ``picture``'s pixels) with each person's visible hands detected."""
    people = []
    for person in pose.people:
        hands: list[Hand | None] = []
        for arm in ARMS:
            box = hand_box(person, arm, picture.width, picture.height)
            if box is None:
                hands.append(None)
                continue
            hands.append(detect_in_square(net, picture, box, NUM_HAND_KEYPOINTS))
        people.append(Person(person.keypoints, (hands[0], hands[1]), person.face))
    return PoseMap(pose.width, pose.height, tuple(people))


def detect_in_square(net: torch.nn.Module, picture: Image.Image,
                     box: tuple[float, float, float], count: int,
                     ) -> tuple[tuple[float, float] | None, ...] | None:
    """``count`` keypoints found by ``net`` in the (left, top, side) square of ``picture``, in
    the picture's pixels; None when none is found."""
    left, top, side = box
    crop = picture.crop((round(left), round(top), round(left + side), round(top + side)))
    sx, sy = crop.width / INPUT_SIDE, crop.height / INPUT_SIDE
    found = part_points(crop_maps(net, crop), count)
    points = tuple(None if p is None else (round(left) + (p[0] + 0.5) * sx - 0.5,
                                           round(top) + (p[1] + 0.5) * sy - 0.5) for p in found)
    return points if any(p is not None for p in points) else None
