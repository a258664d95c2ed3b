"""Where the models named in the config live, and whether they are what we can use.

`models.base` / `models.controlnet` name a folder under the storage root, an absolute path, or
`tiny` (the embedded test model, built on first use). Only JSON files are read here: checking a
model costs milliseconds and never loads weights.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.config import TAUGHT, TINY
from loraforge.errors import ForgeError
from loraforge.models.folders import read_marker
from loraforge.models.manifest import DETECTOR_FILE

if TYPE_CHECKING:
    from loraforge.config import Settings

SD1_CROSS_ATTENTION_DIM = 768
BASE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
COMPONENT_CONFIGS = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
}
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")
#: The weights files diffusers (and transformers, for the text encoder) read when no variant is
#: asked for, as LoRA Forge loads: a `*.fp16.safetensors` alone is not read.
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own bound on a header's length
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

FETCH_BASE = "`loraforge models fetch anylora` (on a login node with internet)"
IMPORT_BASE = "`loraforge models import FILE.safetensors --as base` (offline, from a checkpoint)"
FETCH_CONTROLNET = "`loraforge models fetch controlnet-openpose` (on a login node with internet)"
BASE_FIX = (f"run {FETCH_BASE}, or {IMPORT_BASE}; or set `models.base` in forge.toml to another "
            "SD 1.x model folder (`tiny` for the embedded test model)")
CONTROLNET_FIX = (f"run {FETCH_CONTROLNET}; or set `models.controlnet` in forge.toml to another "
                  "SD 1.x OpenPose ControlNet folder (`tiny` for the embedded test model)")
DETECTOR_FIX = ("run `loraforge models fetch openpose-detector` (on a login node with internet); "
                "or set `models.detector` in forge.toml to another folder holding "
                "body_pose_model.safetensors (`tiny` for the embedded test detector)")


def _resolve(settings: Settings, name: str, which: int, check: Callable[[Path], None]) -> Path:
    if name == TAUGHT and which == 0:
        from loraforge.models.taught import ensure_taught_model

        return ensure_taught_model(settings.storage_root)[0]
    if name == TINY:
        from loraforge.models.tiny import ensure_tiny_models

        return ensure_tiny_models(settings.storage_root)[which]
    path = settings.model_dir(name)
    check(path)
    return path


def resolve_base_model(settings: Settings) -> Path:
    """The folder of the configured base model, checked to be a diffusers SD 1.x pipeline."""
    return _resolve(settings, settings.config.models.base, 0, check_base_model)


def resolve_controlnet(settings: Settings) -> Path:
    """The folder of the configured ControlNet, checked to be a diffusers SD 1.x ControlNet."""
    return _resolve(settings, settings.config.models.controlnet, 1, check_controlnet)


def resolve_detector(settings: Settings) -> Path:
    """The folder of the configured pose detector (`tiny`: the embedded one, built on first use).

    Its weights are checked when they load (`bodypose.load_detector`)."""
    name = settings.config.models.detector
    if name == TINY:
        from loraforge.models.tiny_detector import ensure_tiny_detector

        return ensure_tiny_detector(settings.storage_root)
    path = settings.model_dir(name)
    if not path.is_dir():
        raise ForgeError("is not a folder; the pose detector is a folder holding "
                         "body_pose_model.safetensors" if path.exists() else
                         "pose detector not found", path=path, fix=DETECTOR_FIX)
    return path


def is_tiny(path: Path) -> bool:
    """Whether `path` is a folder built by `loraforge.models.tiny`."""
    data = read_marker(path)
    return data is not None and data.get("kind") == "tiny"


def check_base_model(path: Path, *, require_sd1: bool = True) -> None:
    """Raise ForgeError unless `path` is a complete diffusers SD 1.x text-to-image model.

    `require_sd1=False` checks the structure only (every component present), not the family.
    """
    _require_folder(path, "base model", BASE_FIX)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ForgeError("is not a diffusers model folder (no model_index.json)", path=path,
                         fix=BASE_FIX)
    index = _read_json(index_file, BASE_FIX)
    missing = [name for name in BASE_COMPONENTS if not (path / name).is_dir()]
    if missing:
        listed = ", ".join(f"{name}/" for name in missing)
        raise ForgeError(f"is an incomplete diffusers model: missing {listed}", path=path,
                         fix=f"fetch or import it again: {BASE_FIX}")
    for component, config_name in COMPONENT_CONFIGS.items():
        if not (path / component / config_name).is_file():
            raise ForgeError(f"is an incomplete diffusers model: no {component}/{config_name}",
                             path=path, fix=f"fetch or import it again: {BASE_FIX}")
    tokenizer = path / "tokenizer"
    if not ((tokenizer / "tokenizer.json").is_file()
            or ((tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file())):
        raise ForgeError("is an incomplete diffusers model: tokenizer/ has neither tokenizer.json "
                         "nor vocab.json + merges.txt", path=path,
                         fix=f"fetch or import it again: {BASE_FIX}")
    for component in WEIGHT_COMPONENTS:
        names = TRANSFORMERS_WEIGHTS if component == "text_encoder" else DIFFUSERS_WEIGHTS
        _require_weights(path / component, names, f"fetch or import it again: {BASE_FIX}")
        cut = _cut_weights(path / component)
        if cut is not None:
            raise ForgeError("is an incomplete or damaged weights file", path=cut,
                             fix="`loraforge models verify` checks the whole model; fetch or "
                                 f"import it again: {BASE_FIX}")
    unet = _read_json(path / "unet" / "config.json", BASE_FIX)
    if require_sd1:
        _require_sd1(path, unet, index.get("_class_name"), "base model", BASE_FIX)
    if unet.get("in_channels", 4) != 4:
        raise ForgeError(f"is an inpainting or other special U-Net (in_channels "
                         f"{unet.get('in_channels')}, a text-to-image SD 1.x U-Net has 4)",
                         path=path, fix=BASE_FIX)


def check_controlnet(path: Path, *, require_sd1: bool = True) -> None:
    """Raise ForgeError unless `path` is a diffusers SD 1.x ControlNet folder (`require_sd1=False`:
    any ControlNet folder)."""
    _require_folder(path, "ControlNet", CONTROLNET_FIX)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ForgeError("is not a diffusers ControlNet folder (no config.json)", path=path,
                         fix=CONTROLNET_FIX)
    config = _read_json(config_file, CONTROLNET_FIX)
    class_name = config.get("_class_name")
    if class_name is not None and class_name != "ControlNetModel":
        raise ForgeError(f"holds a {class_name}, not a ControlNetModel", path=path,
                         fix=CONTROLNET_FIX)
    _require_weights(path, DIFFUSERS_WEIGHTS, f"fetch it again: {CONTROLNET_FIX}")
    cut = _cut_weights(path)
    if cut is not None:
        raise ForgeError("is an incomplete or damaged weights file", path=cut,
                         fix=f"fetch it again: {CONTROLNET_FIX}")
    if require_sd1:
        _require_sd1(path, config, class_name, "ControlNet", CONTROLNET_FIX)


def check_detector(path: Path) -> None:
    """Raise ForgeError unless `path` holds the body detector's weights, with none of its
    weights files cut short (from their headers alone)."""
    if not (path / DETECTOR_FILE).is_file():
        raise ForgeError(f"is not a pose detector folder (no {DETECTOR_FILE})", path=path,
                         fix=DETECTOR_FIX)
    cut = _cut_weights(path)
    if cut is not None:
        raise ForgeError("is an incomplete or damaged weights file", path=cut,
                         fix=f"fetch it again: {DETECTOR_FIX}")


def check_pair(base: Path, controlnet: Path) -> None:
    """Raise ForgeError when the ControlNet was made for a different base architecture."""
    base_dim = _read_json(base / "unet" / "config.json", BASE_FIX).get("cross_attention_dim")
    cn_dim = _read_json(controlnet / "config.json", CONTROLNET_FIX).get("cross_attention_dim")
    if base_dim != cn_dim:
        raise ForgeError(f"does not fit the base model {base} (text width {cn_dim} vs "
                         f"{base_dim}); the embedded `tiny` base needs the `tiny` ControlNet and "
                         "a real SD 1.x base needs a real SD 1.x ControlNet", path=controlnet,
                         fix="set `models.base` and `models.controlnet` both to `tiny`, or both "
                             "to real SD 1.x models")


def _require_folder(path: Path, what: str, fix: str) -> None:
    if path.is_dir():
        return
    if path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        if what == "base model":
            fix = f"convert it once with `loraforge models import {path} --as base`"
        raise ForgeError(f"is a single-file checkpoint; the {what} must be a diffusers folder",
                         path=path, fix=fix)
    if path.exists():
        raise ForgeError(f"is not a folder; the {what} must be a diffusers folder", path=path,
                         fix=fix)
    raise ForgeError(f"{what} not found", path=path, fix=fix)


def _require_sd1(path: Path, unet: dict[str, Any], class_name: object, what: str,
                 fix: str) -> None:
    """SDXL, SD 2.x and others have a different text width or extra embeddings: refuse them."""
    name = str(class_name or "")
    if "XL" in name or unet.get("addition_embed_type") == "text_time":
        raise ForgeError(f"is an SDXL {what}; LoRA Forge trains and renders SD 1.x models only",
                         path=path, fix=fix)
    dim = unet.get("cross_attention_dim")
    if dim != SD1_CROSS_ATTENTION_DIM and not is_tiny(path):
        family = {1024: " (SD 2.x)", 2048: " (SDXL)"}.get(dim, "") if isinstance(dim, int) else ""
        raise ForgeError(f"is not an SD 1.x {what}: its U-Net's cross_attention_dim is {dim}"
                         f"{family}, SD 1.x has {SD1_CROSS_ATTENTION_DIM}", path=path, fix=fix)


def _cut_weights(folder: Path) -> Path | None:
    """The first .safetensors file of `folder` that is shorter than its header says, or has no
    readable header (a download or copy that stopped): found from the header alone, before
    minutes of loading, and before a restart removes anything."""
    for file in sorted(folder.glob("*.safetensors")):
        try:
            size = file.stat().st_size
            with open(file, "rb") as fh:
                head = fh.read(8)
                length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
                header = json.loads(fh.read(length)) if 2 <= length <= MAX_HEADER else None
            end = payload_end(header)
        except (OSError, ValueError, AttributeError):
            return file
        if 8 + length + end > size:
            return file
    return None


def payload_end(header: dict[str, Any]) -> int:
    """Where a safetensors header says its tensors' bytes end (after the header): a file
    shorter than 8 + header + this is cut. ValueError naming the tensor of a damaged entry."""
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise ValueError(key) from None
    return end


def _require_weights(folder: Path, names: tuple[str, ...], fix: str) -> None:
    """ForgeError naming `folder` unless it holds one of the weights files `names` (or a
    sharded one's index): the only ones its loader reads."""
    if any((folder / name).is_file() or (folder / f"{name}.index.json").is_file()
           for name in names):
        return
    stem, suffix = names[0].split(".", 1)
    variants = sorted(p.name for p in folder.glob(f"{stem}.*.{suffix}"))
    if variants:
        raise ForgeError(f"holds only {variants[0]}, a variant file that is not loaded: "
                         f"rename it to {names[0]}", path=folder, fix=fix)
    raise ForgeError(f"holds no weights file ({' or '.join(names)})", path=folder, fix=fix)


def _read_json(path: Path, fix: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ForgeError(f"cannot be read ({exc.strerror})", path=path, fix=fix) from None
    except ValueError as exc:
        raise ForgeError(f"is not valid JSON ({exc})", path=path,
                         fix=f"the model is damaged; {fix}") from None
    if not isinstance(data, dict):
        raise ForgeError("is not a JSON object", path=path, fix=f"the model is damaged; {fix}")
    return data
