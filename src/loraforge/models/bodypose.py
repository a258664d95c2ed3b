"""The OpenPose body network (Cao et al., "Realtime Multi-Person 2D Pose Estimation using Part
Affinity Fields", CVPR 2017; the 18-keypoint COCO model), written from the paper's architecture.

A VGG-19 trunk (its first ten 3x3 convolutions, three 2x2 max-pools: stride 8) and two 3x3
convolutions that reduce it to 128 feature channels, then six stages of two branches each: L1
predicts 38 part affinity field channels (19 limbs, x and y), L2 19 heatmaps (18 keypoints and the
background). Stage 1 reads the features (three 3x3 convolutions, a 1x1 to 512, a 1x1 out); stages
2-6 read the previous stage's fields, heatmaps and the features, concatenated in that order
(five 7x7 convolutions, a 1x1, a 1x1 out). Every convolution but the branch outputs is followed
by a ReLU.

Parameter names are the published ones (``conv1_1.weight`` ... ``Mconv7_stage6_L2.bias``), so the
state dict that ``lllyasviel/Annotators/body_pose_model.pth`` holds loads as it is. The widths
are parameters: the embedded tiny detector has the same module tree, a few channels wide, and a
loader reads the widths back from a state dict's shapes.

Input: RGB scaled to [-0.5, 0.5) in *BGR* channel order (the original was trained through OpenCV),
padded to a multiple of 8.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.errors import ForgeError
from loraforge.models.manifest import DETECTOR_FILE

if TYPE_CHECKING:
    import torch

PAF_CHANNELS = 38
HEATMAP_CHANNELS = 19
STAGES = 6
STRIDE = 8


@dataclass(frozen=True)
class Widths:
    """Channel widths of the network; the defaults are the published model's."""

    vgg: tuple[int, int, int, int] = (64, 128, 256, 512)  # conv1_x .. conv4_2
    cpm: tuple[int, int] = (256, 128)  # conv4_3_CPM, conv4_4_CPM (the features)
    stage: int = 128  # the 3x3 / 7x7 convolutions of every stage
    wide: int = 512  # stage 1's 1x1 layer before its output


FULL = Widths()


def layer_table(widths: Widths = FULL) -> list[tuple[str, int, int, int, bool]]:
    """Every convolution in order: (name, in channels, out channels, kernel, ReLU after)."""
    v1, v2, v3, v4 = widths.vgg
    layers: list[tuple[str, int, int, int, bool]] = [
        ("conv1_1", 3, v1, 3, True), ("conv1_2", v1, v1, 3, True),
        ("conv2_1", v1, v2, 3, True), ("conv2_2", v2, v2, 3, True),
        ("conv3_1", v2, v3, 3, True), ("conv3_2", v3, v3, 3, True),
        ("conv3_3", v3, v3, 3, True), ("conv3_4", v3, v3, 3, True),
        ("conv4_1", v3, v4, 3, True), ("conv4_2", v4, v4, 3, True),
        ("conv4_3_CPM", v4, widths.cpm[0], 3, True),
        ("conv4_4_CPM", widths.cpm[0], widths.cpm[1], 3, True),
    ]
    features, s = widths.cpm[1], widths.stage
    for branch, out in (("L1", PAF_CHANNELS), ("L2", HEATMAP_CHANNELS)):
        layers += [(f"conv5_1_CPM_{branch}", features, s, 3, True),
                   (f"conv5_2_CPM_{branch}", s, s, 3, True),
                   (f"conv5_3_CPM_{branch}", s, s, 3, True),
                   (f"conv5_4_CPM_{branch}", s, widths.wide, 1, True),
                   (f"conv5_5_CPM_{branch}", widths.wide, out, 1, False)]
    joined = PAF_CHANNELS + HEATMAP_CHANNELS + features
    for stage in range(2, STAGES + 1):
        for branch, out in (("L1", PAF_CHANNELS), ("L2", HEATMAP_CHANNELS)):
            layers += [(f"Mconv1_stage{stage}_{branch}", joined, s, 7, True)]
            layers += [(f"Mconv{i}_stage{stage}_{branch}", s, s, 7, True) for i in range(2, 6)]
            layers += [(f"Mconv6_stage{stage}_{branch}", s, s, 1, True),
                       (f"Mconv7_stage{stage}_{branch}", s, out, 1, False)]
    return layers


# The trunk's 2x2 max-pools come after these layers (body, hand and face networks alike).
POOL_AFTER = ("conv1_2", "conv2_2", "conv3_4")


def conv_stack(table: list[tuple[str, int, int, int, bool]]) -> type[torch.nn.Module]:
    """What the OpenPose networks are made of: a module holding `table`'s convolutions by their
    published names (name, in, out, kernel, ReLU after), whose `run(names, x)` applies some of
    them in order, with the ReLUs the table asks for and the trunk's max-pools."""
    import torch
    from torch import nn

    relu = {name: after for name, *_, after in table}

    class ConvStack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name, cin, cout, kernel, _ in table:
                self.add_module(name, nn.Conv2d(cin, cout, kernel, padding=kernel // 2))

        def run(self, names: list[str], x: torch.Tensor) -> torch.Tensor:
            for name in names:
                x = getattr(self, name)(x)
                if relu[name]:
                    x = torch.relu(x)
                if name in POOL_AFTER:
                    x = torch.nn.functional.max_pool2d(x, 2, 2)
            return x

    return ConvStack


def build_network(widths: Widths = FULL) -> torch.nn.Module:
    """A body network with fresh (untrained) weights and the published parameter names."""
    import torch

    table = layer_table(widths)
    trunk = [name for name, *_ in table[:12]]
    branches = {(stage, branch): [name for name, *_ in table
                                  if name.endswith(f"_{branch}") and (
                                      name.startswith("conv5_") if stage == 1
                                      else f"_stage{stage}_" in name)]
                for stage in range(1, STAGES + 1) for branch in ("L1", "L2")}

    class BodyPoseNet(conv_stack(table)):  # type: ignore[misc]
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """(part affinity fields, heatmaps) of the last stage, at 1/8 of the input size."""
            features = self.run(trunk, x)
            fields, heatmaps = (self.run(branches[1, b], features) for b in ("L1", "L2"))
            for stage in range(2, STAGES + 1):
                joined = torch.cat([fields, heatmaps, features], 1)
                fields, heatmaps = (self.run(branches[stage, b], joined) for b in ("L1", "L2"))
            return fields, heatmaps

    return BodyPoseNet()


def widths_of(state: dict[str, Any]) -> Widths | None:
    """The widths a state dict in the published layout was trained with; None if it is not one."""
    try:
        return Widths(
            vgg=(state["conv1_1.weight"].shape[0], state["conv2_1.weight"].shape[0],
                 state["conv3_1.weight"].shape[0], state["conv4_1.weight"].shape[0]),
            cpm=(state["conv4_3_CPM.weight"].shape[0], state["conv4_4_CPM.weight"].shape[0]),
            stage=state["conv5_1_CPM_L1.weight"].shape[0],
            wide=state["conv5_4_CPM_L1.weight"].shape[0])
    except (KeyError, AttributeError, IndexError):
        return None


def published_names(state: dict[str, Any]) -> dict[str, Any]:
    """Keys as the published file has them: a ``model0.`` / ``model2_1.`` prefix (how some
    conversions group the layers) is dropped."""
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        out[rest if head.startswith("model") and rest.count(".") == 1 else key] = value
    return out


FETCH_FIX = ("run `loraforge models fetch openpose-detector` (on a login node with internet), "
             "or set `models.detector = \"tiny\"` for the embedded test detector")


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A detector's tensors under their published names; ForgeError naming an unreadable file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return published_names(load_file(str(path)))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ForgeError(f"cannot be read as safetensors ({exc})", path=path,
                         fix=FETCH_FIX) from None


def fill(net: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str,
         ) -> torch.nn.Module:
    """``net`` with the weights of ``state``, in eval mode; ForgeError naming ``path`` when a
    weight is missing or shaped otherwise."""
    import torch

    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    wrong = sorted(k for k in expected if k in state and state[k].shape != expected[k].shape)
    if missing or wrong:
        problem = (f"{len(missing)} weights missing (first: {missing[0]})" if missing else
                   f"{len(wrong)} weights of the wrong shape (first: {wrong[0]})")
        raise ForgeError(f"is not {what} in the published layout: {problem}", path=path,
                         fix=FETCH_FIX)
    net.load_state_dict({k: state[k].to(torch.float32) for k in expected})
    return net.eval()


def load_detector(folder: Path) -> torch.nn.Module:
    """The body network from ``<folder>/body_pose_model.safetensors``, in eval mode.

    ForgeError naming the file when it is missing, or not a body network in the published layout.
    """
    path = Path(folder) / DETECTOR_FILE
    if not path.is_file():
        raise ForgeError("no pose detector here (body_pose_model.safetensors is missing)",
                         path=Path(folder), fix=FETCH_FIX)
    state = read_state(path)
    widths = widths_of(state)
    if widths is None:
        raise ForgeError("is not an OpenPose body network (no conv1_1 ... conv5_4_CPM_L1 "
                         "weights)", path=path, fix=FETCH_FIX)
    return fill(build_network(widths), state, path, "an OpenPose body network")
