"""The reference pose detector, run by tests/test_pose_extract.py in its own environment
(lora_env/reference/, built by tests/setup_reference.sh): Google's MediaPipe BlazePose with the
trained weights its wheel ships, independent of loraforge.

    python reference_pose.py PEOPLE PICTURE...

prints a JSON list with, per picture, up to PEOPLE people as 18 COCO keypoints each ([x, y] in
the picture's pixels, centre of the first pixel at 0; null where BlazePose calls the keypoint
invisible or it lies outside the picture). BlazePose finds one person per pass; the columns that
person spans are painted grey before the next pass. The neck, which BlazePose lacks, is the
midpoint of the shoulders, as in OpenPose's COCO training data.
"""

import json
import sys

import numpy as np
from mediapipe.python.solutions import pose as blazepose
from PIL import Image

# COCO-18 keypoint -> BlazePose landmark (both name the subject's own left and right).
LANDMARKS = {0: 0, 2: 12, 3: 14, 4: 16, 5: 11, 6: 13, 7: 15, 8: 24, 9: 26, 10: 28, 11: 23,
             12: 25, 13: 27, 14: 5, 15: 2, 16: 8, 17: 7}
VISIBLE = 0.5


def people(net: blazepose.Pose, path: str, count: int) -> list[list[list[float] | None]]:
    pixels = np.array(Image.open(path).convert("RGB"))
    height, width = pixels.shape[:2]
    found = []
    for _ in range(count):
        result = net.process(pixels)
        if not result.pose_landmarks:
            break
        marks = result.pose_landmarks.landmark
        keypoints: list[list[float] | None] = [None] * 18
        for coco, mark in LANDMARKS.items():
            x, y = marks[mark].x * width - 0.5, marks[mark].y * height - 0.5
            if marks[mark].visibility >= VISIBLE and 0 <= x < width and 0 <= y < height:
                keypoints[coco] = [x, y]
        right, left = keypoints[2], keypoints[5]
        if right is not None and left is not None:
            keypoints[1] = [(right[0] + left[0]) / 2, (right[1] + left[1]) / 2]
        found.append(keypoints)
        xs = [m.x * width for m in marks]
        pixels[:, max(0, int(min(xs))):max(0, int(max(xs)) + 1)] = 128
    return found


def main() -> None:
    count, pictures = int(sys.argv[1]), sys.argv[2:]
    with blazepose.Pose(static_image_mode=True, model_complexity=1) as net:
        print(json.dumps([people(net, path, count) for path in pictures]))


if __name__ == "__main__":
    main()
