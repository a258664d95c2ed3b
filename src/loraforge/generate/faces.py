"""Faces for the people found in a picture: a square around each head the body reveals, run
through the face network, one keypoint per heatmap (70, OpenPose's face layout).

Where the face is: centred on the nose, reaching 3 times the nose-eye distance and 1.5 times
the nose-ear distance (the larger, measured along x or y, whichever is longer) to each side,
the rule of OpenPose's body-based face detector. A face needs its nose and an eye or an ear;
its square is clipped to the picture and skipped under 20 px.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from PIL import Image

from loraforge.generate.hands import MIN_SIDE, detect_in_square
from loraforge.generate.poses import (
    L_EAR,
    L_EYE,
    NOSE,
    NUM_FACE_KEYPOINTS,
    R_EAR,
    R_EYE,
    Person,
    PoseMap,
)

if TYPE_CHECKING:
    import torch

EYE_REACH = 3.0
EAR_REACH = 1.5


def face_box(person: Person, width: int, height: int) -> tuple[float, float, float] | None:
    """(left, top, side) of the square around the face in a W x H picture; None if the head is
    not visible or the square is too small."""
    nose = person[NOSE]
    if nose is None:
        return None
    reach = 0.0
    for index, factor in ((R_EYE, EYE_REACH), (L_EYE, EYE_REACH), (R_EAR, EAR_REACH),
                          (L_EAR, EAR_REACH)):
        point = person[index]
        if point is not None:
            reach = max(reach, factor * max(abs(point[0] - nose[0]), abs(point[1] - nose[1])))
    if reach == 0:
        return None
    left, top = max(0.0, nose[0] - reach), max(0.0, nose[1] - reach)
    side = min(2 * reach, width - left, height - top)
    return (left, top, side) if side >= MIN_SIDE else None


def add_faces(net: torch.nn.Module, picture: Image.Image, pose: PoseMap) -> PoseMap:
    """``pose`` (in ``picture``'s pixels) with each visible face's keypoints detected."""
    people = []
    for person in pose.people:
        box = face_box(person, picture.width, picture.height)
        face = None if box is None else detect_in_square(net, picture, box, NUM_FACE_KEYPOINTS)
        people.append(Person(person.keypoints, person.hands, face))
    return PoseMap(pose.width, pose.height, tuple(people))
