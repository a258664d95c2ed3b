"""`loraforge models import FILE --as base|controlnet`: an SD 1.x single-file checkpoint (Civitai,
A1111) converted offline to the diffusers layout the trainer and renderer read.

Nothing is downloaded: the configs are the SD 1.5 ones shipped with the package (or, for a file
made from the embedded tiny model, the tiny ones), chosen by the widths read from the tensor shapes,
and the tokenizer is the built-in CLIP BPE one. `.safetensors` files are read as they are; pickled
files (`.ckpt`, `.pt`, `.pth`, `.bin`) only through `torch.load(weights_only=True)`, and refused,
with the reason, when that fails. SDXL, SD 2.x, v-prediction, inpainting and non-checkpoint files
(LoRAs, VAEs, diffusers components) are recognised from their keys and shapes and refused.
A checkpoint without a VAE ("noVAE") needs `--vae FILE`, which also replaces a baked-in one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.errors import ForgeError
from loraforge.fsutil import disk_full, full_disk_error
from loraforge.models import folders, taught, tiny, tiny_detector
from loraforge.models.manifest import NOT_MODELS, describe_files, write_manifest
from loraforge.models.tiny import strip_volatile
from loraforge.runtime import hide_torchvision_notice, quiet_loading

if TYPE_CHECKING:
    import torch

Say = Callable[[str], None]

SAFETENSORS = ".safetensors"
PICKLED = (".ckpt", ".pt", ".pth", ".bin")
UNET = "model.diffusion_model."
VAE = "first_stage_model."
TEXT = ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
KINDS = ("base", "controlnet")
IMPORT_FIX = ("import an SD 1.x (SD 1.4/1.5 family) checkpoint, e.g. the .safetensors file of an "
              "SD 1.5 fine-tune from Civitai")
#: Folders the embedded tiny models are built in: `models tiny` (or a `tiny` setting) would
#: replace a model imported under one of these names.
EMBEDDED_NAMES = frozenset({tiny.BASE_NAME, tiny.CONTROLNET_NAME, tiny_detector.NAME,
                            taught.TAUGHT_NAME})
VAE_FIX = ("add `--vae FILE` with an SD 1.x VAE, e.g. vae-ft-mse-840000-ema-pruned.safetensors "
           "(stabilityai/sd-vae-ft-mse-original), the usual one for checkpoints sold without")


@dataclass(frozen=True)
class Family:
    """An architecture import accepts: SD 1.x, or the embedded tiny model's widths (tests)."""

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    tiny: bool

    @property
    def unet_widths(self) -> tuple[int, ...]:
        return tuple(self.unet["block_out_channels"])

    @property
    def vae_widths(self) -> tuple[int, ...]:
        return tuple(self.vae["block_out_channels"])


def families() -> list[Family]:
    from loraforge.models.tiny import sd15_config, tiny_config

    return [Family("SD 1.x", sd15_config("unet"), sd15_config("vae"),
                   sd15_config("text_encoder"), False),
            Family("embedded tiny", tiny_config("unet"), tiny_config("vae"),
                   tiny_config("text_encoder"), True)]


@dataclass
class Checkpoint:
    """A single-file checkpoint: tensor names and shapes first, the tensors only when needed."""

    path: Path
    pickled: bool
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]
    dtype: str  # of the first U-Net (or ControlNet) tensor: float16, float32, ...
    loaded: dict[str, torch.Tensor] | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.loaded is None:
            from safetensors.torch import load_file

            self.loaded = load_file(str(self.path))
        return self.loaded


# --- entry point ------------------------------------------------------------------------------


def import_checkpoint(storage_root: Path, file: Path, kind: str, name: str | None,
                      vae_file: Path | None, say: Say, file_mode: int = folders.FILE_MODE,
                      ) -> Path:
    """Convert `file` into `<storage_root>/<name>`; returns the new model folder."""
    if kind not in KINDS:
        raise ForgeError(f"--as must be base or controlnet, not `{kind}`",
                         fix="e.g. `loraforge models import FILE --as base`")
    file = _existing_file(file, "checkpoint")
    if vae_file is not None:
        if kind != "base":
            raise ForgeError("--vae goes with --as base only (a ControlNet has no VAE)",
                             fix="drop --vae")
        vae_file = _existing_file(vae_file, "VAE")
    name = check_name(name) if name is not None else default_name(file)
    root = storage_root
    dest = root / name
    if dest.exists() or dest.is_symlink():
        raise ForgeError(f"a model named `{name}` already exists; it is left as it is",
                         path=dest, fix=f"choose another name: `--name {name}-2`, or delete the "
                                        "folder first if you mean to replace it")
    _offline(root)
    say(f"reading {file.name} ({_size(file)})")
    ckpt = open_checkpoint(file)
    vae_ckpt = open_checkpoint(vae_file) if vae_file is not None else None
    if kind == "base":
        family = classify_base(ckpt)
        has_vae = any(k.startswith(VAE) for k in ckpt.shapes)
        if vae_ckpt is not None:
            vae_shapes = vae_keys(vae_ckpt)
            _check_vae(vae_shapes, family, vae_ckpt.path)
            say(f"VAE from {vae_ckpt.path.name}"
                f"{' (replaces the one in the checkpoint)' if has_vae else ''}")
        elif not has_vae:
            raise ForgeError("has no VAE (no first_stage_model.* weights: a \"noVAE\" "
                             "checkpoint)", path=file, fix=VAE_FIX)
        else:
            _check_vae({k[len(VAE):]: v for k, v in ckpt.shapes.items() if k.startswith(VAE)},
                       family, file)
    else:
        family = classify_controlnet(ckpt)
    say(f"recognised: {family.name} {'ControlNet' if kind == 'controlnet' else 'checkpoint'}"
        f"{', ' + ckpt.dtype if ckpt.dtype else ''}")

    from loraforge.hashing import legacy_hash, sha256_file

    cache = root / "cache"
    source: dict[str, Any] = {"type": "file", "file": file.name, "path": str(file.resolve()),
                              "size": file.stat().st_size, "sha256": sha256_file(file, cache),
                              "legacy_hash": _legacy(file, legacy_hash),
                              "format": "pickle (weights_only)" if ckpt.pickled else "safetensors"}
    source["short_hash"] = source["sha256"][:10]
    if vae_ckpt is not None:
        digest = sha256_file(vae_ckpt.path, cache)
        source["vae"] = {"file": vae_ckpt.path.name, "path": str(vae_ckpt.path.resolve()),
                         "sha256": digest, "short_hash": digest[:10]}

    with folders.model_lock(root, name) as locked:
        if dest.exists():
            raise ForgeError(f"a model named `{name}` appeared meanwhile", path=dest,
                             fix="choose another --name")
        if locked:  # no other import of this name runs: what one left is of a killed one
            folders.remove_own_partials(root, name, folders.IMPORT_TAG)
        folders.remove_leftovers(root, name, older_than=folders.STALE_SECONDS)
        tmp = folders.make_partial(root, name, folders.IMPORT_TAG)
        try:
            say("converting to the diffusers layout (offline)")
            if kind == "base":
                convert_base(ckpt, vae_ckpt, family, tmp)
            else:
                convert_controlnet(ckpt, family, tmp)
            if family.tiny:  # lets the store accept its narrow widths, as for the built one
                (tmp / "loraforge.json").write_text(json.dumps(
                    {"kind": "tiny", "component": kind, "imported": True}, indent=2) + "\n",
                    encoding="utf-8")
            _check_result(tmp, kind)
            write_manifest(tmp, {"kind": kind, "family": family.name, "source": source,
                                 "files": describe_files(tmp),
                                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            folders.fix_modes(tmp, file_mode)
            folders.install(tmp, dest)
        except Exception as exc:
            if isinstance(exc, ForgeError) or not disk_full(exc):
                raise
            raise _full_disk(exc, dest, file, vae_file) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    setting = "models.base" if kind == "base" else "models.controlnet"
    say(f"imported {name} (hash {source['short_hash']}) -> {dest}")
    say(f"use it: set `{setting} = \"{name}\"` in forge.toml, or pass "
        f"`--set {setting}={name}`")
    return dest


def _full_disk(exc: BaseException, dest: Path, file: Path, vae_file: Path | None
               ) -> ForgeError:
    """A disk (or quota) too full for the converted model: safetensors and the tokenizer
    raise their own errors, which only quote the system's."""
    from loraforge.models.fetch import human_size

    size = sum(f.stat().st_size for f in (file, vae_file) if f is not None)
    return full_disk_error(exc, dest.parent, "its half-written copy was removed, and no other "
                           "model was touched",
                           what=f"could not write the model `{dest.name}` here (about "
                                f"{human_size(size)})")


def default_name(file: Path) -> str:
    """The file's stem, with anything but letters, digits and `._+-` made `_`."""
    stem = file.name[: -len(file.suffix)] if file.suffix else file.name
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", stem).strip("._-+") or "imported-model"
    return check_name(name)


def check_name(name: str) -> str:
    if not NAME_OK.match(name) or len(name) > 128:
        raise ForgeError(f"`{name}` is not a usable model name",
                         fix="use letters, digits and . _ + - (no spaces or slashes), starting "
                             "with a letter or digit")
    if name.lower() == "tiny" or name in NOT_MODELS:
        raise ForgeError(f"`{name}` is a reserved name under the storage root",
                         fix="choose another --name")
    if name.lower() in EMBEDDED_NAMES:
        raise ForgeError(f"`{name}` is the folder of an embedded tiny model (`loraforge models "
                         "tiny`, or a model set to `tiny` or `tiny-taught`, builds it there and "
                         "would replace the imported model)",
                         fix=f"choose another --name, e.g. `--name {name}-imported`")
    return name


def _existing_file(path: Path, what: str) -> Path:
    path = path.expanduser()
    if path.is_dir():
        raise ForgeError(f"is a folder; `models import` takes a single-file {what}", path=path,
                         fix="a diffusers model folder needs no import: copy it under the "
                             "storage root and name it in forge.toml")
    if not path.is_file():
        raise ForgeError(f"{what} file not found", path=path, fix="check the path")
    if path.suffix.lower() not in (SAFETENSORS, *PICKLED):
        raise ForgeError("is not a checkpoint file (expected .safetensors, or .ckpt/.pt/.pth/"
                         ".bin)", path=path, fix="pass the model's .safetensors file")
    return path


def _offline(root: Path) -> None:
    from loraforge.runtime import OFFLINE_SWITCHES

    for switch in OFFLINE_SWITCHES:
        os.environ[switch] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["HF_HOME"] = str(root / "cache" / "huggingface")


# --- reading ----------------------------------------------------------------------------------


def looks_pickled(head: bytes) -> bool:
    """Whether a file's first bytes are torch's zip or a pickle (protocol 2 to 5)."""
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80
                                               and head[1] in (2, 3, 4, 5))


def _not_safetensors(path: Path) -> ForgeError | None:
    """What a `.safetensors`-named file is instead, from its first bytes: a pickle (torch's zip
    or a bare pickle) or text. None when it may be one (safetensors then has its say)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError:
        return None
    if looks_pickled(head):
        return ForgeError("is a pickled checkpoint (torch.save / .ckpt format) named "
                          ".safetensors; LoRA Forge does not open pickles as safetensors",
                          path=path, fix="use the model's real .safetensors file, or rename "
                          "this one to .ckpt so that it is read with torch.load(weights_only="
                          "True), which never runs code from it")
    return _text_file(path, head, "a safetensors model")


def _text_file(path: Path, head: bytes, expected: str) -> ForgeError | None:
    """The error for a model file whose first bytes `head` are text (a saved error page, a
    note); None when they are not."""
    text = head.decode("utf-8", errors="ignore")  # a character cut at byte 512 is dropped
    if head and len(text.encode()) >= len(head) - 3 and all(
            c.isprintable() or c in "\r\n\t" for c in text):
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        shown = f" (it starts: {first!r})" if first else ""
        return ForgeError(f"is a text file, not {expected}{shown}", path=path,
                          fix="a download that failed often saves an error page: download the "
                              "model again and check the file is gigabytes, not bytes")
    return None


def open_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint's tensor names and shapes; pickles only with weights_only=True."""
    if path.suffix.lower() == SAFETENSORS:
        from safetensors import SafetensorError, safe_open

        wrong = _not_safetensors(path)
        if wrong is not None:
            raise wrong

        try:
            with safe_open(str(path), framework="pt") as fh:
                metadata = dict(fh.metadata() or {})
                shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
                first = _first_weight(list(shapes))
                dtype = _SAFETENSORS_DTYPES.get(fh.get_slice(first).get_dtype(), "") \
                    if first else ""
        except (SafetensorError, OSError, ValueError) as exc:
            raise ForgeError(f"is not a readable .safetensors file ({_first_line(exc)})",
                             path=path, fix="download it again; the file may be truncated"
                             ) from None
        return Checkpoint(path, False, shapes, metadata, dtype)
    return _open_pickled(path)


_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def _first_weight(keys: list[str]) -> str | None:
    for prefix in (UNET, "control_model.", "input_blocks.", ""):
        for key in keys:
            if key.startswith(prefix) and key.endswith(".weight"):
                return key
    return None


def _open_pickled(path: Path) -> Checkpoint:
    import pickle
    import struct

    import torch

    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError:
        head = b""  # torch.load names the problem below
    text = _text_file(path, head, "a checkpoint")
    if text is not None:
        raise text
    if head and not looks_pickled(head):
        raise ForgeError("is not a checkpoint: it starts with neither torch's zip nor a pickle",
                         path=path, fix="download it again; the file may be damaged or not a "
                         "model")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ForgeError(f"cannot be opened safely: {_unpickle_reason(exc)}. LoRA Forge reads "
                         "pickled checkpoints only with torch.load(weights_only=True) and never "
                         "runs code from a model file", path=path,
                         fix="use the model's .safetensors version (Civitai and the Hub offer "
                             "one for most models)") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError,
            IndexError, TypeError, struct.error) as exc:  # junk fails anywhere in the unpickler
        raise ForgeError(f"is not a readable checkpoint ({_first_line(exc)})", path=path,
                         fix="download it again; the file may be truncated or not a model"
                         ) from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ForgeError(f"holds a {type(data).__name__}, not a state dict of tensors",
                         path=path, fix=IMPORT_FIX)
    tensors = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise ForgeError("holds no tensors", path=path, fix=IMPORT_FIX)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    first = _first_weight(list(shapes))
    dtype = str(tensors[first].dtype).removeprefix("torch.") if first else ""
    return Checkpoint(path, True, shapes, {}, dtype, tensors)


def _unpickle_reason(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:  # the line naming what the file wanted to import, e.g. posix.system
        if "unsupported" in line.lower() or "GLOBAL" in line:
            return line.removeprefix("WeightsUnpickler error:").strip().rstrip(".")
    return lines[0].rstrip(".") if lines else type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- recognising ------------------------------------------------------------------------------


def classify_base(ckpt: Checkpoint) -> Family:
    """The family of an SD base checkpoint, or a ForgeError saying what the file is instead."""
    shapes, path = ckpt.shapes, ckpt.path
    _refuse_non_checkpoints(shapes, path, want="base")
    if any(k.startswith(("control_model.", "input_hint_block.")) for k in shapes):
        raise ForgeError("is a ControlNet, not a base model", path=path,
                         fix=f"import it with `loraforge models import {path} --as controlnet`")
    if f"{UNET}input_blocks.0.0.weight" not in shapes:
        raise ForgeError("is not a Stable Diffusion checkpoint (no model.diffusion_model.* "
                         "U-Net weights)", path=path, fix=IMPORT_FIX)
    layout = unet_layout(shapes, UNET)
    open_clip = any(k.startswith("cond_stage_model.model.") for k in shapes)
    if layout["cross"] == 1024 or open_clip:
        raise ForgeError("is an SD 2.x checkpoint (1024-wide cross attention, OpenCLIP text "
                         "encoder); LoRA Forge trains SD 1.x only", path=path, fix=IMPORT_FIX)
    _refuse_special_unet(layout, path)
    reason = v_prediction(ckpt)
    if reason:
        raise ForgeError(f"is a v-prediction checkpoint ({reason}); LoRA Forge trains "
                         "epsilon-prediction SD 1.x models only", path=path, fix=IMPORT_FIX)
    family = _family_of(layout, path)
    text = strip_prefixes(shapes, TEXT)
    token = text.get("embeddings.token_embedding.weight")
    if token is None:
        raise ForgeError("has no CLIP text encoder (cond_stage_model.transformer.*)", path=path,
                         fix=IMPORT_FIX)
    layers = {k.split(".")[2] for k in text if k.startswith("encoder.layers.")}
    expected = family.text_encoder
    if (token[1] != expected["hidden_size"] or len(layers) != expected["num_hidden_layers"]
            or token[0] != expected["vocab_size"]):
        raise ForgeError(f"has an unexpected text encoder ({len(layers)} layers, width {token[1]},"
                         f" {token[0]} tokens; {family.name} has {expected['num_hidden_layers']},"
                         f" {expected['hidden_size']}, {expected['vocab_size']})", path=path,
                         fix=IMPORT_FIX)
    _check_text_encoder(text, family, path)
    return family


def _check_text_encoder(text: dict[str, tuple[int, ...]], family: Family, path: Path) -> None:
    """Every text encoder tensor of the checkpoint has the shape the family's CLIP text model
    loads (an extended one, e.g. Long-CLIP's 248 token positions, cannot be converted)."""
    import torch
    from transformers import CLIPTextModel

    from loraforge.models.tiny import clip_text_config

    with torch.device("meta"):  # shapes only: no memory, no time
        model = CLIPTextModel(clip_text_config(family.text_encoder))
    for key, tensor in model.state_dict().items():
        name = key.removeprefix("text_model.")
        shape = text.get(name)
        if shape is None or tuple(shape) == tuple(tensor.shape):
            continue
        if name == "embeddings.position_embedding.weight":
            raise ForgeError(f"its text encoder has {shape[0]} token positions; an "
                             f"{family.name} base has {tensor.shape[0]} (an extended text "
                             "encoder such as Long-CLIP, which SD 1.x tools cannot load)",
                             path=path, fix="import the model's version with the standard "
                                            f"{tensor.shape[0]}-token text encoder, or another "
                                            "SD 1.x checkpoint")
        raise ForgeError(f"has a text encoder of another shape ({name} is {list(shape)}; "
                         f"{family.name} has {list(tensor.shape)})", path=path, fix=IMPORT_FIX)


def classify_controlnet(ckpt: Checkpoint) -> Family:
    shapes, path = ckpt.shapes, ckpt.path
    _refuse_non_checkpoints(shapes, path, want="controlnet")
    prefix = controlnet_prefix(shapes)
    if f"{prefix}input_hint_block.0.weight" not in shapes or \
            f"{prefix}zero_convs.0.0.weight" not in shapes:
        if f"{UNET}input_blocks.0.0.weight" in shapes:
            raise ForgeError("is a base model checkpoint, not a ControlNet", path=path,
                             fix=f"import it with `loraforge models import {path} --as base`")
        raise ForgeError("is not a ControlNet (no input_hint_block / zero_convs weights)",
                         path=path, fix="pass an SD 1.x ControlNet file, e.g. "
                                        "control_v11p_sd15_openpose.safetensors")
    layout = unet_layout(shapes, prefix)
    if layout["cross"] == 1024:
        raise ForgeError("is an SD 2.x ControlNet (1024-wide cross attention); LoRA Forge "
                         "uses SD 1.x only", path=path, fix="pass an SD 1.5 ControlNet")
    _refuse_special_unet(layout, path)
    return _family_of(layout, path)


def _refuse_non_checkpoints(shapes: dict[str, tuple[int, ...]], path: Path, want: str) -> None:
    keys = list(shapes)
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) or ".lora_down." in k
           or ".lora_A." in k for k in keys):
        raise ForgeError("is a LoRA, not a model", path=path,
                         fix="LoRAs are applied at render time: `loraforge generate --lora FILE`")
    if any(k.startswith("conditioner.embedders.") or ".label_emb." in k or
           k.startswith("label_emb.") for k in keys):
        raise ForgeError("is an SDXL model (conditioner.embedders / add_embedding weights); LoRA "
                         "Forge trains SD 1.x only", path=path,
                         fix=IMPORT_FIX if want == "base" else "pass an SD 1.5 ControlNet")
    if any(".joint_blocks." in k or ".double_blocks." in k or
           k.startswith(("joint_blocks.", "double_blocks.")) for k in keys):
        raise ForgeError("is an SD 3 / Flux model, not SD 1.x", path=path, fix=IMPORT_FIX)
    if not any(k.startswith((UNET, "control_model.", "input_blocks.", "input_hint_block."))
               for k in keys):
        if any(_vae_name(k) for k in keys) and not any(
                k.startswith(("down_blocks.", "time_embedding.")) for k in keys):
            raise ForgeError("is a VAE, not a model", path=path,
                             fix="pass it as `--vae` when importing a checkpoint: `loraforge "
                                 f"models import MODEL.safetensors --as base --vae {path}`")
        if any(k.startswith(("down_blocks.", "time_embedding.", "text_model.", "encoder.layers."))
               for k in keys):
            raise ForgeError("is one component of a diffusers model, not a single-file "
                             "checkpoint", path=path,
                             fix="copy the whole diffusers folder (model_index.json, unet/, ...) "
                                 "under the storage root and name it in forge.toml")


def unet_layout(shapes: dict[str, tuple[int, ...]], prefix: str) -> dict[str, Any]:
    """Widths read from an original-layout U-Net (or ControlNet): block widths, text width,
    input channels, and whether the attention projections are linear (SD 2.x) or 1x1 convs."""
    def out(key: str) -> int | None:
        shape = shapes.get(prefix + key)
        return shape[0] if shape else None

    conv_in = shapes.get(f"{prefix}input_blocks.0.0.weight", (0, 0))
    to_k = shapes.get(f"{prefix}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    proj_in = shapes.get(f"{prefix}input_blocks.1.1.proj_in.weight")
    return {
        "widths": tuple(out(f"input_blocks.{3 * i + 1}.0.out_layers.3.weight") for i in range(4)),
        "cross": to_k[1] if to_k else None,
        "in_channels": conv_in[1] if len(conv_in) > 1 else None,
        "linear_proj": proj_in is not None and len(proj_in) == 2,
        "levels": len({k[len(prefix):].split(".")[1] for k in shapes
                       if k.startswith(f"{prefix}input_blocks.")}),
    }


def _refuse_special_unet(layout: dict[str, Any], path: Path) -> None:
    if layout["in_channels"] not in (None, 4):
        raise ForgeError(f"is an inpainting or other special model (its U-Net takes "
                         f"{layout['in_channels']} input channels, a text-to-image one 4)",
                         path=path, fix=IMPORT_FIX)


def _family_of(layout: dict[str, Any], path: Path) -> Family:
    for family in families():
        if (layout["widths"] == family.unet_widths
                and layout["cross"] == family.unet["cross_attention_dim"]
                and not layout["linear_proj"] and layout["levels"] == 12):
            return family
    raise ForgeError(f"has an unrecognised U-Net (block widths {list(layout['widths'])}, text "
                     f"width {layout['cross']}): not an SD 1.x model", path=path, fix=IMPORT_FIX)


def controlnet_prefix(shapes: dict[str, tuple[int, ...]]) -> str:
    return "control_model." if any(k.startswith("control_model.") for k in shapes) else ""


def v_prediction(ckpt: Checkpoint) -> str | None:
    """Why the checkpoint predicts v rather than noise, or None when nothing says so.

    Weights alone cannot tell; the conventions that mark it: a `v_pred` key (ComfyUI),
    safetensors metadata (modelspec / kohya), and the A1111 `<stem>.yaml` beside the file."""
    if "v_pred" in ckpt.shapes:
        return "it holds a `v_pred` key"
    meta = {k.lower(): str(v).strip().lower() for k, v in ckpt.metadata.items()}
    for key in ("modelspec.prediction_type", "prediction_type"):
        if meta.get(key) in ("v", "v_prediction", "v-prediction", "vpred"):
            return f"its metadata says {key} = {meta[key]}"
    if meta.get("ss_v_parameterization") == "true":
        return "its metadata says ss_v_parameterization = True"
    yaml = ckpt.path.with_suffix(".yaml")
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if re.search(r"^\s*parameterization:\s*[\"']?v[\"']?\s*(#.*)?$",
                     yaml.read_text(encoding="utf-8"), re.MULTILINE):
            return f"{yaml.name} beside it sets parameterization: v"
    return None


def vae_keys(vae: Checkpoint) -> dict[str, tuple[int, ...]]:
    """The VAE tensors of a VAE file, named without prefix (encoder.*, decoder.*, ...)."""
    if any(k.startswith((UNET, "lora_")) for k in vae.shapes):
        what = "a LoRA" if any(k.startswith("lora_") for k in vae.shapes) else "a checkpoint"
        raise ForgeError(f"is {what}, not a VAE", path=vae.path,
                         fix="pass a VAE file to --vae (e.g. vae-ft-mse-840000-ema-pruned"
                             ".safetensors)")
    found = {name: shape for key, shape in vae.shapes.items()
             if (name := _vae_name(key)) is not None}
    if "encoder.conv_in.weight" not in found or "decoder.conv_out.weight" not in found:
        raise ForgeError("is not a VAE (no encoder/decoder weights)", path=vae.path,
                         fix="pass a VAE file to --vae")
    return found


def _vae_name(key: str) -> str | None:
    """`encoder.conv_in.weight` for `first_stage_model.encoder.conv_in.weight`, `vae.encoder...`
    or `encoder...`; None for anything else (e.g. the model_ema.* copies some VAE files hold)."""
    for prefix in (VAE, "vae.", ""):
        if key.startswith(prefix) and key[len(prefix):].startswith(VAE_PARTS):
            return key[len(prefix):]
    return None


def strip_prefixes(names: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
    """The entries whose key starts with one of `prefixes` (tried in order), without it."""
    found: dict[str, Any] = {}
    for key, value in names.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                found.setdefault(key[len(prefix):], value)
                break
    return found


def _check_vae(shapes: dict[str, tuple[int, ...]], family: Family, path: Path) -> None:
    if any(key.startswith("encoder.down_blocks.") for key in shapes):
        raise ForgeError("is a VAE in the diffusers layout (the diffusion_pytorch_model file of "
                         "a vae/ folder); --vae takes a VAE checkpoint in the original layout",
                         path=path, fix="use the same VAE's single-file release, e.g. "
                                        "vae-ft-mse-840000-ema-pruned.safetensors "
                                        "(stabilityai/sd-vae-ft-mse-original) for sd-vae-ft-mse")
    widths = tuple(shapes.get(f"encoder.down.{i}.block.0.conv2.weight", (0,))[0]
                   for i in range(4))
    latent = shapes.get("quant_conv.weight", (0,))[0] // 2
    if widths != family.vae_widths or latent != family.vae["latent_channels"]:
        raise ForgeError(f"holds a VAE of another shape (widths {list(widths)}, {latent} latent "
                         f"channels; {family.name} has {list(family.vae_widths)}, "
                         f"{family.vae['latent_channels']})", path=path, fix=VAE_FIX)


def _size(path: Path) -> str:
    from loraforge.models.fetch import human_size

    return human_size(path.stat().st_size)


def _legacy(path: Path, legacy_hash: Callable[[Path], str]) -> str | None:
    try:
        return legacy_hash(path) if path.stat().st_size > 0x110000 else None
    except OSError:
        return None


# --- converting -------------------------------------------------------------------------------


def convert_base(ckpt: Checkpoint, vae: Checkpoint | None, family: Family, out: Path) -> None:
    """Write the diffusers pipeline for `ckpt` into the empty folder `out`."""
    hide_torchvision_notice()
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    from loraforge.models.tiny import sd15_config
    from loraforge.models.tokenizer import new_clip_tokenizer, write_vocab_files

    tensors = dict(ckpt.tensors())
    if vae is not None:
        for key in [k for k in tensors if k.startswith(VAE)]:
            del tensors[key]
        for key, value in vae.tensors().items():
            short = _vae_name(key)
            if short is not None:
                tensors[VAE + short] = value
    with _config_dir({"unet": family.unet, "vae": family.vae}) as config, quiet_loading():
        unet = _single_file(UNet2DConditionModel, tensors, config, "unet", UNET, ckpt.path)
        vae_model = _single_file(AutoencoderKL, tensors, config, "vae", VAE,
                                 vae.path if vae is not None else ckpt.path)
        text_encoder = convert_text_encoder(tensors, family, ckpt.path)
        pipe = StableDiffusionPipeline(
            vae=vae_model, text_encoder=text_encoder, tokenizer=new_clip_tokenizer(),
            unet=unet, scheduler=PNDMScheduler.from_config(sd15_config("scheduler")),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(out, safe_serialization=True)
    write_vocab_files(out / "tokenizer")
    strip_volatile(out)


def convert_controlnet(ckpt: Checkpoint, family: Family, out: Path) -> None:
    from diffusers import ControlNetModel

    tensors = ckpt.tensors()
    config = controlnet_config(family, ckpt.shapes)
    with _config_dir({"controlnet": config}) as config_dir, quiet_loading():
        model = _single_file(ControlNetModel, tensors, config_dir, "controlnet",
                             controlnet_prefix(ckpt.shapes), ckpt.path)
        model.save_pretrained(out, safe_serialization=True)
    strip_volatile(out)


def controlnet_config(family: Family, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """A ControlNetModel config: the family's U-Net config plus the conditioning encoder's
    widths, read from the input_hint_block convolutions."""
    import inspect

    from diffusers import ControlNetModel

    prefix = controlnet_prefix(shapes)
    hint = sorted((int(k[len(prefix):].split(".")[1]), shape) for k, shape in shapes.items()
                  if k.startswith(f"{prefix}input_hint_block.") and k.endswith(".weight"))
    outs = [shape[0] for _, shape in hint]
    widths = [outs[0], *outs[2:-1:2]]
    accepted = set(inspect.signature(ControlNetModel.__init__).parameters) - {"self"}
    config = {k: v for k, v in family.unet.items() if k in accepted}
    config.update({"_class_name": "ControlNetModel",
                   "conditioning_embedding_out_channels": widths,
                   "conditioning_channels": hint[0][1][1] if hint else 3})
    return config


def convert_text_encoder(tensors: dict[str, torch.Tensor], family: Family, path: Path) -> Any:
    """CLIPTextModel from the checkpoint's `cond_stage_model.transformer.*` weights (strict)."""
    from transformers import CLIPTextModel

    from loraforge.models.tiny import clip_text_config

    found: dict[str, torch.Tensor] = strip_prefixes(tensors, TEXT)
    model = CLIPTextModel(clip_text_config(family.text_encoder))
    expected = list(model.state_dict())
    if expected and expected[0].startswith("text_model."):  # transformers < 5 naming
        found = {f"text_model.{k}": v for k, v in found.items()}
    missing = [k for k in expected if k not in found]
    if missing:
        raise ForgeError(f"has an incomplete text encoder ({len(missing)} tensors missing, e.g. "
                         f"{missing[0]})", path=path, fix=IMPORT_FIX)
    model.to(found[expected[0]].dtype)
    model.load_state_dict({k: found[k] for k in expected}, strict=True)
    model.eval()
    return model


def _single_file(cls: Any, tensors: dict[str, torch.Tensor], config: Path, subfolder: str,
                 prefix: str, path: Path) -> Any:
    """One component through diffusers' converter, in the checkpoint's own dtype; complete."""
    dtype = next((v.dtype for k, v in tensors.items() if k.startswith(prefix)
                  and v.is_floating_point()), None)
    try:
        model = cls.from_single_file(tensors, config=str(config), subfolder=subfolder,
                                     local_files_only=True, torch_dtype=dtype)
    except (KeyError, ValueError, RuntimeError, NotImplementedError, TypeError) as exc:
        raise ForgeError(f"could not be converted: its {subfolder} weights do not fit "
                         f"{cls.__name__} ({_first_line(exc)})", path=path,
                         fix=IMPORT_FIX) from None
    if any(p.is_meta for p in model.parameters()):
        raise ForgeError(f"has an incomplete {subfolder} (weights missing)", path=path,
                         fix=IMPORT_FIX)
    model.eval()
    return model


@contextlib.contextmanager
def _config_dir(configs: dict[str, dict[str, Any]]) -> Iterator[Path]:
    """A local diffusers-layout config folder (from_single_file's `config=`: no download)."""
    with tempfile.TemporaryDirectory(prefix="loraforge-config-") as name:
        root = Path(name)
        for sub, config in configs.items():
            (root / sub).mkdir()
            (root / sub / "config.json").write_text(json.dumps(config, indent=2),
                                                    encoding="utf-8")
        yield root


def _check_result(folder: Path, kind: str) -> None:
    from loraforge.models.store import check_base_model, check_controlnet

    if kind == "base":
        check_base_model(folder, require_sd1=False)
    else:
        check_controlnet(folder, require_sd1=False)
