"""The OpenPose hand and face networks: convolutional pose machines on one trunk (hand: Simon et
al., "Hand Keypoint Detection in Single Images using Multiview Bootstrapping", CVPR 2017; the
face network was trained the same way), written from the published architecture.

A VGG-19 trunk (its first fourteen 3x3 convolutions, three 2x2 max-pools: stride 8) and a 3x3
reduction to 128 feature channels; stage 1 maps them (a 1x1 to 512, a 1x1 out) to heatmaps: 22
for a hand (21 keypoints and the background), 71 for a face (70 and the background); stages
2-6 read the previous heatmaps and the features, concatenated in that order (five 7x7
convolutions, a 1x1, a 1x1 out). Every convolution but the outputs is followed by a ReLU.
Parameter names are the published ones (``conv1_1.weight`` ... ``Mconv7_stage6.bias``), so the
state dicts of ``lllyasviel/Annotators`` ``hand_pose_model.pth`` and ``facenet.pth`` load as
they are. Input: a square crop, BGR in [-0.5, 0.5), like the body network's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.errors import ForgeError
from loraforge.models.bodypose import FETCH_FIX, conv_stack, fill, read_state
from loraforge.models.manifest import FACE_DETECTOR_FILE, HAND_DETECTOR_FILE

if TYPE_CHECKING:
    import torch

HAND_CHANNELS = 22
FACE_CHANNELS = 71
STAGES = 6


@dataclass(frozen=True)
class Widths:
    """Channel widths of a hand or face network; the defaults are the published models'."""

    vgg: tuple[int, int, int, int] = (64, 128, 256, 512)  # conv1_x .. conv5_2
    features: int = 128  # conv5_3_CPM
    stage: int = 128  # the 7x7 convolutions of stages 2-6
    wide: int = 512  # conv6_1_CPM


FULL = Widths()


def layer_table(outputs: int, widths: Widths = FULL) -> list[tuple[str, int, int, int, bool]]:
    """Every convolution in order: (name, in channels, out channels, kernel, ReLU after)."""
    v1, v2, v3, v4 = widths.vgg
    f, s = widths.features, widths.stage
    layers: list[tuple[str, int, int, int, bool]] = [
        ("conv1_1", 3, v1, 3, True), ("conv1_2", v1, v1, 3, True),
        ("conv2_1", v1, v2, 3, True), ("conv2_2", v2, v2, 3, True),
        ("conv3_1", v2, v3, 3, True), ("conv3_2", v3, v3, 3, True),
        ("conv3_3", v3, v3, 3, True), ("conv3_4", v3, v3, 3, True),
        ("conv4_1", v3, v4, 3, True), ("conv4_2", v4, v4, 3, True),
        ("conv4_3", v4, v4, 3, True), ("conv4_4", v4, v4, 3, True),
        ("conv5_1", v4, v4, 3, True), ("conv5_2", v4, v4, 3, True),
        ("conv5_3_CPM", v4, f, 3, True),
        ("conv6_1_CPM", f, widths.wide, 1, True),
        ("conv6_2_CPM", widths.wide, outputs, 1, False),
    ]
    for stage in range(2, STAGES + 1):
        layers += [(f"Mconv1_stage{stage}", outputs + f, s, 7, True)]
        layers += [(f"Mconv{i}_stage{stage}", s, s, 7, True) for i in range(2, 6)]
        layers += [(f"Mconv6_stage{stage}", s, s, 1, True),
                   (f"Mconv7_stage{stage}", s, outputs, 1, False)]
    return layers


def build_network(outputs: int, widths: Widths = FULL) -> torch.nn.Module:
    """A hand (22 outputs) or face (71) network with fresh weights and the published names."""
    import torch

    table = layer_table(outputs, widths)
    trunk = [name for name, *_ in table[:15]]
    stages = {1: ["conv6_1_CPM", "conv6_2_CPM"]}
    stages.update({stage: [name for name, *_ in table if name.endswith(f"_stage{stage}")]
                   for stage in range(2, STAGES + 1)})

    class PoseMachine(conv_stack(table)):  # type: ignore[misc]
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """The last stage's heatmaps, at 1/8 of the input size."""
            features = self.run(trunk, x)
            heatmaps = self.run(stages[1], features)
            for stage in range(2, STAGES + 1):
                heatmaps = self.run(stages[stage], torch.cat([heatmaps, features], 1))
            return heatmaps

    return PoseMachine()


def widths_of(state: dict[str, Any]) -> Widths | None:
    """The widths of a hand or face network's state dict; None if it is not one."""
    try:
        return Widths(
            vgg=(state["conv1_1.weight"].shape[0], state["conv2_1.weight"].shape[0],
                 state["conv3_1.weight"].shape[0], state["conv4_1.weight"].shape[0]),
            features=state["conv5_3_CPM.weight"].shape[0],
            stage=state["Mconv1_stage2.weight"].shape[0],
            wide=state["conv6_1_CPM.weight"].shape[0])
    except (KeyError, AttributeError, IndexError):
        return None


def _load(folder: Path, name: str, outputs: int, what: str) -> torch.nn.Module:
    path = Path(folder) / name
    if not path.is_file():
        raise ForgeError(f"no {what} detector here ({name} is missing)", path=Path(folder),
                         fix=FETCH_FIX)
    state = read_state(path)
    widths = widths_of(state)
    if widths is None:
        raise ForgeError(f"is not an OpenPose {what} network (no conv1_1 ... Mconv1_stage2 "
                         "weights)", path=path, fix=FETCH_FIX)
    return fill(build_network(outputs, widths), state, path, f"an OpenPose {what} network")


def load_hand_detector(folder: Path) -> torch.nn.Module:
    """The hand network from ``<folder>/hand_pose_model.safetensors``, in eval mode."""
    return _load(folder, HAND_DETECTOR_FILE, HAND_CHANNELS, "hand")


def load_face_detector(folder: Path) -> torch.nn.Module:
    """The face network from ``<folder>/facenet.safetensors``, in eval mode."""
    return _load(folder, FACE_DETECTOR_FILE, FACE_CHANNELS, "face")
