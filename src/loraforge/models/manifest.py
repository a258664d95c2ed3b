"""`manifest.json`: what a model folder holds and where it came from, so it can be listed and
verified later. Written by `models fetch`, `models import` and the tiny-model build.

    {"format": 1, "kind": "base" | "controlnet" | "detector" | "tagger",
     "source": {"type": "hub", "repo": ..., "revision": ..., "commit": ..., "variant": ...}
             | {"type": "file", "file": ..., "sha256": ..., "short_hash": ..., "vae": {...}}
             | {"type": "embedded", "recipe": ...},
     "files": {"unet/diffusion_pytorch_model.safetensors": {"size": N, "sha256": "..."}, ...}}

The model hash A1111 shows (first 10 hex digits of a sha256) is the source file's for an imported
checkpoint, else the U-Net's (ControlNet, detector: their weights file's).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.errors import ForgeError
from loraforge.hashing import sha256_file
from loraforge.models.folders import read_marker

MANIFEST_NAME = "manifest.json"
FORMAT = 1
KINDS = ("base", "controlnet", "detector", "tagger")
DETECTOR_FILE = "body_pose_model.safetensors"
HAND_DETECTOR_FILE = "hand_pose_model.safetensors"
FACE_DETECTOR_FILE = "facenet.safetensors"
# Folders under the storage root that are never models.
#: The storage root's folder of extra runtimes (`models fetch tagger-gpu`).
RUNTIMES = "runtimes"
NOT_MODELS = frozenset({"Multi_Concept_Output", "Final_Images", "cache", "master_dataset",
                        RUNTIMES})
# The file whose sha256 identifies a model of each kind (A1111's model hash).
IDENTITY_FILES = {
    "base": ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin"),
    "controlnet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "detector": (DETECTOR_FILE,),
    "tagger": ("model.onnx",),
}


def describe_files(folder: Path, known: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} for every file in `folder` except the manifest.

    `known` maps relative paths to sha256 values already computed (e.g. while downloading)."""
    known = known or {}
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST_NAME:
            continue
        files[rel] = {"size": path.stat().st_size, "sha256": known.get(rel) or sha256_file(path)}
    return files


def write_manifest(folder: Path, data: dict[str, Any]) -> None:
    """Write `manifest.json` into a model folder that is still being assembled."""
    text = json.dumps({"format": FORMAT, **data}, indent=2, sort_keys=True) + "\n"
    (folder / MANIFEST_NAME).write_text(text, encoding="utf-8")


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a model folder, or None when it has none or an unusable one
    (`manifest_problem` says which)."""
    try:
        data = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return None
    return data


def manifest_problem(folder: Path) -> str | None:
    """Why the folder's manifest.json cannot be used; None when it is fine or absent."""
    path = folder / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        return f"{MANIFEST_NAME} cannot be read ({exc.strerror or exc})"
    except UnicodeDecodeError:
        return f"{MANIFEST_NAME} is malformed (not UTF-8 text)"
    except ValueError as exc:
        return f"{MANIFEST_NAME} is malformed (not valid JSON: {exc})"
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return f"{MANIFEST_NAME} is malformed (no \"files\" table)"
    return None


def model_kind(folder: Path, manifest: dict[str, Any] | None = None) -> str | None:
    """base, controlnet, detector or tagger; None when `folder` does not look like a model."""
    if manifest is not None and manifest.get("kind") in KINDS:
        return str(manifest["kind"])
    marker = read_marker(folder)
    if marker is not None and marker.get("component") in ("base", "controlnet"):
        return str(marker["component"])
    if (folder / "model_index.json").is_file():
        return "base"
    if (folder / DETECTOR_FILE).is_file():
        return "detector"
    if (folder / "model.onnx").is_file() and (folder / "selected_tags.csv").is_file():
        return "tagger"
    config = folder / "config.json"
    if config.is_file():
        try:
            name = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
        except (OSError, ValueError, AttributeError):
            return None
        if name == "ControlNetModel":
            return "controlnet"
    return None


def identity_file(folder: Path, kind: str | None) -> Path | None:
    """The weights file whose sha256 names the model (A1111's model hash)."""
    for rel in IDENTITY_FILES.get(kind or "", ()):
        if (folder / rel).is_file():
            return folder / rel
    return None


def model_sha256(folder: Path, cache_dir: Path | None = None) -> str | None:
    """The sha256 A1111 would show for this model folder (its first 10 digits are the short hash).

    An imported checkpoint keeps its source file's hash, so images made here and in A1111 from
    the same file name the same model. Otherwise the U-Net's (ControlNet's, detector's) weights.
    Read from the manifest when there is one; else hashed (and remembered in `cache_dir`).
    """
    manifest = read_manifest(folder)
    kind = model_kind(folder, manifest)
    if manifest is not None:
        source = manifest.get("source") or {}
        if source.get("type") == "file" and source.get("sha256"):
            return str(source["sha256"])
        for rel in IDENTITY_FILES.get(kind or "", ()):
            entry = manifest["files"].get(rel)
            if isinstance(entry, dict) and entry.get("sha256"):
                return str(entry["sha256"])
    path = identity_file(folder, kind)
    return sha256_file(path, cache_dir) if path is not None else None


def weights_identity(folder: Path, cache_dir: Path | None = None) -> str:
    """One digest of every weights file of the model folder as its manifest lists them (a VAE
    swapped at import changes it, where `model_sha256`, the checkpoint's, stays); without a
    manifest, `model_sha256`'s file alone ("": none)."""
    import hashlib

    manifest = read_manifest(folder)
    listed = {rel: entry.get("sha256") for rel, entry in (manifest or {}).get("files", {}).items()
              if isinstance(entry, dict) and entry.get("sha256")}
    if listed:
        return hashlib.sha256(json.dumps(listed, sort_keys=True).encode()).hexdigest()
    return model_sha256(folder, cache_dir) or ""


def model_legacy_hash(folder: Path) -> str:
    """A1111's old short hash of the model (kohya's ss_sd_model_hash), from the same file as
    `model_sha256`: an imported checkpoint's own, else its U-Net's weights ("": none)."""
    from loraforge.hashing import legacy_hash

    manifest = read_manifest(folder)
    source = (manifest or {}).get("source") or {}
    if source.get("type") == "file":
        return str(source.get("legacy_hash") or "")
    path = identity_file(folder, model_kind(folder, manifest))
    return legacy_hash(path) if path is not None else ""


def describe_source(manifest: dict[str, Any] | None) -> str:
    """One line: where a model folder came from."""
    if manifest is None:
        return "no manifest (copied in by hand)"
    source = manifest.get("source") or {}
    kind = source.get("type")
    if kind == "hub":
        text = f"{source.get('repo')}@{str(source.get('commit', '?'))[:10]}"
        variant = source.get("variant")
        return f"{text} ({variant})" if variant else text
    if kind == "file":
        text = f"import of {source.get('file')}"
        vae = source.get("vae")
        return f"{text} + VAE {vae.get('file')}" if isinstance(vae, dict) else text
    if kind == "embedded":
        return "embedded tiny model"
    return "unknown"


@dataclass
class ModelEntry:
    """One model folder under the storage root, as `models list` shows it."""

    name: str
    path: Path
    kind: str
    size: int
    sha256: str | None
    source: str
    warning: str | None = None

    @property
    def short_hash(self) -> str:
        return self.sha256[:10] if self.sha256 else ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "kind": self.kind, "size": self.size,
                "sha256": self.sha256, "hash": self.short_hash, "source": self.source,
                "warning": self.warning}


def model_folders(root: Path, warn: Callable[[str], None]) -> list[Path]:
    """Folders under the storage root that hold a model (sorted by name). One that cannot be
    read (another user's private folder on shared storage) is skipped, said through `warn`."""
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir(), key=lambda p: p.name.lower()):
        if not path.is_dir() or path.name.startswith(".") or path.name in NOT_MODELS:
            continue
        try:
            kind = model_kind(path, read_manifest(path))
        except OSError as exc:
            problem = unreadable(path, exc)
            warn(f"{path}: {problem.message}; skipped ({problem.fix})")
            continue
        if kind is not None:
            found.append(path)
    return found


def unreadable(folder: Path, exc: OSError) -> ForgeError:
    """A model folder this user may not read (another user's private folder)."""
    return ForgeError(f"cannot be read ({exc.strerror or exc})", path=folder,
                      fix=f"if it is a model for you too, its owner can share it: "
                          f"`chmod -R a+rX {folder}`")


def scan_models(root: Path, warn: Callable[[str], None], cache_dir: Path | None = None,
                ) -> list[ModelEntry]:
    """Every model folder under `root` with its kind, size, hash and source (`warn`: the
    folders skipped)."""
    entries = []
    for folder in model_folders(root, warn):
        manifest = read_manifest(folder)
        kind = model_kind(folder, manifest) or "unknown"
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        problem = manifest_problem(folder)
        source = "malformed manifest.json" if problem else describe_source(manifest)
        warning = (f"{folder / MANIFEST_NAME}: {problem.removeprefix(MANIFEST_NAME + ' ')}; "
                   f"`loraforge models verify {folder.name}` cannot check its files"
                   if problem else None)
        entries.append(ModelEntry(folder.name, folder, kind, size,
                                  model_sha256(folder, cache_dir), source, warning))
    return entries


@dataclass
class Verification:
    """What `models verify` found in one folder."""

    name: str
    path: Path
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    note: str | None = None

    @property
    def ok(self) -> bool:
        return not (self.missing or self.changed or self.problems)


#: Files that hold a model's weights: never "extra" to its manifest.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx", ".ckpt", ".pt", ".pth")


def verify_folder(folder: Path) -> Verification:
    """Re-hash every file against the manifest (no hash cache); check the folder's structure."""
    result = Verification(folder.name, folder)
    manifest = read_manifest(folder)
    kind = model_kind(folder, manifest)
    problem = manifest_problem(folder)
    if problem is not None:
        result.problems.append(f"{problem}: file contents cannot be checked; fetch or import "
                               "the model again to write a new one")
    elif manifest is None:
        result.note = ("no manifest.json (not installed by `models fetch` or `models import`): "
                       "structure checked, file contents cannot be")
    else:
        listed = manifest["files"]
        for rel, entry in sorted(listed.items()):
            path = folder / rel
            result.checked += 1
            if not path.is_file():
                result.missing.append(rel)
                continue
            size = path.stat().st_size
            if isinstance(entry, dict) and entry.get("size") not in (None, size):
                result.changed.append(f"{rel} (size {size}, manifest {entry['size']})")
            elif isinstance(entry, dict) and sha256_file(path) != entry.get("sha256"):
                result.changed.append(f"{rel} (sha256 differs)")
        present = describe_names(folder)
        result.extra = sorted(present - set(listed))
        unlisted = [name for name in result.extra if name.endswith(_WEIGHT_SUFFIXES)]
        if unlisted:  # a manifest that lists no weights would call any of them "ok"
            result.problems.append(f"manifest.json does not list {', '.join(unlisted[:3])}"
                                   f"{' ...' if len(unlisted) > 3 else ''}: their contents "
                                   "cannot be checked; fetch or import the model again to "
                                   "write a new one")
    try:
        if kind == "base":
            from loraforge.models.store import check_base_model

            check_base_model(folder, require_sd1=False)
        elif kind == "controlnet":
            from loraforge.models.store import check_controlnet

            check_controlnet(folder, require_sd1=False)
        elif kind == "detector":
            from loraforge.models.store import check_detector

            check_detector(folder)
        elif kind == "tagger":
            from loraforge.models.tagger import check_tagger

            check_tagger(folder)
        elif kind is None:
            result.problems.append("does not look like a model folder")
    except ForgeError as exc:
        result.problems.append(_problem(exc, folder))
    return result


def _problem(exc: ForgeError, folder: Path) -> str:
    """`exc`'s message after the file or folder it names, from `folder` (`unet: holds ...`)."""
    path = exc.path
    if path is None or path == folder or not path.is_relative_to(folder):
        return exc.message
    return f"{path.relative_to(folder).as_posix()}: {exc.message}"


def describe_names(folder: Path) -> set[str]:
    """Relative paths of every file in `folder` except the manifest."""
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    return names - {MANIFEST_NAME}
