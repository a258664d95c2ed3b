"""The embedded test detector: the OpenPose body, hand and face networks' module trees, a few
channels wide, with random weights from a fixed seed (what `models.detector = "tiny"` loads; no
download).

It finds no real people: its skeletons come from its random weights. It exists so that the whole
path (picture -> network -> peaks -> limbs -> people -> pose map) runs in tests and the demo
exactly as with the real weights. Built atomically into `<storage>/tiny-detector/` like the tiny
SD model: a hidden folder, renamed into place when complete, with a marker and manifest.json.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from loraforge.models import cpm, folders
from loraforge.models.bodypose import Widths, build_network
from loraforge.models.manifest import (
    DETECTOR_FILE,
    FACE_DETECTOR_FILE,
    HAND_DETECTOR_FILE,
    describe_files,
    write_manifest,
)

NAME = "tiny-detector"
SEED = 20240617
VERSION = 3  # 2: with the hand network, 3: and the face network
WIDTHS = Widths(vgg=(4, 8, 8, 16), cpm=(8, 8), stage=8, wide=16)
PART_WIDTHS = cpm.Widths(vgg=(4, 8, 8, 16), features=8, stage=8, wide=16)  # hand and face
# Weights drawn from N(0, GAIN² / fan_in) carry the picture's detail through the 92 layers to
# heatmaps of about the trained model's range (the default init flattens them to the biases);
# biases are zero, so a flat picture gives flat maps: nobody.
GAIN = 1.5


def recipe() -> dict[str, object]:
    return {"kind": "tiny", "component": "detector", "seed": SEED, "version": VERSION,
            "widths": asdict(WIDTHS), "part_widths": asdict(PART_WIDTHS), "gain": GAIN}


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(recipe(), sort_keys=True).encode()).hexdigest()[:16]


def tiny_detector_folder(storage_root: Path) -> Path:
    return Path(storage_root) / NAME


def is_complete(folder: Path) -> bool:
    try:
        return json.loads((folder / folders.MARKER).read_text(encoding="utf-8")) == recipe()
    except (OSError, ValueError):
        return False


def build_tiny_detector(folder: Path) -> None:
    """Write the tiny detector's weights, marker and manifest into the empty folder `folder`."""
    import torch
    from safetensors.torch import save_file

    state = torch.random.get_rng_state()
    try:
        for seed, net, name in (
                (SEED, build_network(WIDTHS), DETECTOR_FILE),
                (SEED + 1, cpm.build_network(cpm.HAND_CHANNELS, PART_WIDTHS), HAND_DETECTOR_FILE),
                (SEED + 2, cpm.build_network(cpm.FACE_CHANNELS, PART_WIDTHS),
                 FACE_DETECTOR_FILE)):
            torch.manual_seed(seed)
            with torch.no_grad():
                for conv in net.children():
                    fan_in = conv.weight[0].numel()
                    conv.weight.normal_(0.0, GAIN / fan_in ** 0.5)
                    conv.bias.zero_()
            tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
            save_file(tensors, str(folder / name), metadata={"format": "pt"})
    finally:
        torch.random.set_rng_state(state)
    (folder / folders.MARKER).write_text(json.dumps(recipe(), indent=2) + "\n", encoding="utf-8")
    write_manifest(folder, {"kind": "detector", "files": describe_files(folder),
                            "source": {"type": "embedded", "recipe": recipe_hash()}})
    folders.fix_modes(folder)


def ensure_tiny_detector(storage_root: Path) -> Path:
    """The tiny detector's folder under `storage_root`, built first when missing or outdated."""
    root = Path(storage_root)
    dest = tiny_detector_folder(root)
    if is_complete(dest):
        return dest
    return folders.build_model(root, NAME, build_tiny_detector, is_complete,
                               "the embedded tiny detector")
