"""The models `loraforge models fetch` knows: where each lives on the Hugging Face Hub, and the
folder under the storage root it is installed as (the seed's names, which forge.toml defaults to).
"""

from __future__ import annotations

from dataclasses import dataclass

from loraforge.models.manifest import DETECTOR_FILE, FACE_DETECTOR_FILE, HAND_DETECTOR_FILE


@dataclass(frozen=True)
class HubModel:
    key: str  # what `models fetch KEY` takes
    repo: str
    folder: str  # installed as <storage>/<folder>
    kind: str  # base | controlnet | detector | tagger
    what: str
    in_all: bool = True  # fetched by `models fetch all` (train and generate need it)


HUB_MODELS: tuple[HubModel, ...] = (
    HubModel("anylora", "Lykon/AnyLoRA", "AnyLoRA", "base",
             "AnyLoRA base model (diffusers layout)"),
    HubModel("controlnet-openpose", "lllyasviel/control_v11p_sd15_openpose", "controlnet-model",
             "controlnet", "OpenPose ControlNet v1.1 for SD 1.5"),
    HubModel("openpose-detector", "lllyasviel/Annotators", "controlnet-detector", "detector",
             "OpenPose body, hand and face detectors (poses from photos), as safetensors"),
    HubModel("tagger", "SmilingWolf/wd-vit-tagger-v3", "wd-tagger", "tagger",
             "WD14 image tagger v3 (ViT, ONNX) for `loraforge dataset tag`", in_all=False),
)
ALL = "all"
DETECTOR_SOURCE = "body_pose_model.pth"
TAGGER_FILES = ("model.onnx", "selected_tags.csv")
# Each detector pickle and the safetensors file it is converted to; the hand and face networks
# are fetched where the repository has them.
DETECTOR_FILES = {DETECTOR_SOURCE: DETECTOR_FILE, "hand_pose_model.pth": HAND_DETECTOR_FILE,
                  "facenet.pth": FACE_DETECTOR_FILE}


def keys() -> list[str]:
    return [model.key for model in HUB_MODELS]


def by_key(key: str) -> HubModel | None:
    for model in HUB_MODELS:
        if model.key == key.lower():
            return model
    return None
