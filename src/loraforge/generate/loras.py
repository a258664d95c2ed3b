"""LoRA files for generation: find them, check them without trusting them, stack them.

- A LoRA is named by a `.safetensors` path, a training run's name (its final LoRA), or nothing:
  then this project's newest *finished* run's final LoRA is used (never a running, failed or
  interrupted run, never a file that is incomplete, and never another project's run on a shared
  storage root: `runs.newest_finished`).
- Every file is checked from its header before any model is loaded: it must be a complete
  safetensors file (pickled `.ckpt`/`.pt`/`.bin` files are refused, never unpickled), and an SD 1.x
  LoRA whose widths fit the base model (SDXL, SD 2.x and other families are refused by name).
- `LoraStack` loads each file once per process as a named diffusers adapter and merges the set
  each scene asks for, with its weights, into the model's weights (`fuse_lora`), as A1111 and
  ComfyUI apply LoRAs: the denoising steps then run no adapter arithmetic (BENCHMARKS.md).
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge import runs
from loraforge.dataset.scan import activation_tag
from loraforge.errors import ForgeError
from loraforge.hashing import digest_file
from loraforge.kohya_names import TEXT_PATH_PREFIX, TEXT_PREFIX, kohya_name
from loraforge.models.importer import looks_pickled
from loraforge.models.store import MAX_HEADER, payload_end
from loraforge.runtime import quiet_loading

log = logging.getLogger("loraforge.generate")

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
NO_LORA = "none"
SAFE_FIX = ("use the .safetensors version of this LoRA (Civitai and Hugging Face offer one), or "
            "convert it once with a tool you trust")
_WEIGHT_RE = re.compile(r"^(?P<ref>.+?):(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)$")
_SDXL_PREFIXES = ("lora_te1_", "lora_te2_", "text_encoder_2.", "te1.", "te2.")
_OTHER_FAMILIES = ("lora_transformer_", "lora_unet_double_blocks", "lora_unet_single_blocks",
                   "lora_unet_joint_blocks", "transformer.")
_SD1_PREFIXES = ("lora_unet_", "lora_te_", "unet.", "text_encoder.")


@dataclass(frozen=True)
class BaseWidths:
    """What a LoRA must fit: the base U-Net's cross-attention width and the text width."""

    cross_attention_dim: int
    text_hidden_size: int

    @classmethod
    def of(cls, base: Path) -> BaseWidths:
        unet = json.loads((base / "unet" / "config.json").read_text(encoding="utf-8"))
        text = json.loads((base / "text_encoder" / "config.json").read_text(encoding="utf-8"))
        return cls(int(unet["cross_attention_dim"]), int(text["hidden_size"]))


@dataclass(frozen=True)
class LoraFile:
    """A checked LoRA file: its header facts and hashes (no tensors loaded)."""

    path: Path
    metadata: dict[str, str] = field(repr=False)
    sha256: str  # of the tensor payload (A1111's additional-networks / Civitai AutoV3 hash)
    has_text_encoder: bool
    modules: frozenset[str] = field(repr=False)  # its LoRA modules, as the file names them

    @property
    def name(self) -> str:
        """The name A1111 shows (the file name without extension), safe inside PNG info."""
        return re.sub(r"[:,\"\n]", "_", self.path.stem)

    @property
    def short_hash(self) -> str:
        """The 12 hex digits A1111 writes in `Lora hashes`."""
        return self.sha256[:12]

    @property
    def concepts(self) -> dict[str, str]:
        """The concepts it was trained on (kohya's `ss_tag_frequency`: `{"20_blake": {tag:
        count}}`), each with its trigger, by the rule its training took it by
        (`activation_tag`; a concept whose captions lack its name: the tag of it that the
        `modelspec.trigger_phrase` a LoRA Forge training writes names)."""
        try:
            frequency = json.loads(self.metadata.get("ss_tag_frequency", "{}"))
        except ValueError:
            return {}
        phrase = {t.strip() for t in self.metadata.get("modelspec.trigger_phrase", "").split(",")}
        found: dict[str, str] = {}
        for folder, tags in frequency.items() if isinstance(frequency, dict) else ():
            repeats, _, name = str(folder).partition("_")
            name = name if repeats.isdigit() and name else str(folder)
            counts = {str(t): c for t, c in tags.items() if isinstance(c, int)} \
                if isinstance(tags, dict) else {}
            found[name] = activation_tag(name, counts,
                                         {t: c for t, c in counts.items() if t in phrase})
        return found

    @property
    def clip_skip(self) -> int | None:
        """The clip skip it was trained with, when its metadata says."""
        for key in ("ss_clip_skip", "modelspec.encoder_layer"):
            value = str(self.metadata.get(key, "")).strip()
            if value.isdigit() and 1 <= int(value) <= 12:
                return int(value)
        return None


@dataclass(frozen=True)
class LoraUse:
    """A LoRA applied with a weight."""

    lora: LoraFile
    weight: float


# --- reading a file safely ------------------------------------------------------------------

def _refuse_non_finite(path: Path, keys: list[str]) -> None:
    """A LoRA holding NaN or infinite weights renders black images: refuse it by name."""
    import torch
    from safetensors import SafetensorError, safe_open

    bad = []
    try:
        with safe_open(str(path), framework="pt") as fh:
            for key in keys:
                tensor = fh.get_tensor(key)
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    bad.append(key)
    except (SafetensorError, OSError) as exc:
        raise ForgeError(f"cannot be read ({exc})", path=path,
                         fix="copy or download the file again") from None
    if bad:
        raise ForgeError(f"holds NaN or infinite weights ({len(bad)} of {len(keys)} tensors, "
                         f"e.g. {bad[0]}): every image would come out black", path=path,
                         fix="use an earlier epoch's file of that run, or train it again with "
                             "lower learning rates (a diverged training writes such weights)")


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(the safetensors header, the payload offset). ForgeError for anything that is not a
    complete safetensors file; a pickle is recognised and refused without being opened as one."""
    if not path.exists():
        raise ForgeError("LoRA file not found", path=path,
                         fix="check the path (a relative one starts at the folder of the "
                             "scenes file or forge.toml that names it, or at the current "
                             "folder for --lora)")
    if path.is_dir():
        raise ForgeError("is a folder, not a LoRA file", path=path,
                         fix="give the .safetensors file inside it")
    suffix_pickled = path.suffix.lower() in PICKLE_SUFFIXES
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            pickled = looks_pickled(head)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            plausible = 2 <= length <= MAX_HEADER and not pickled
            raw = fh.read(length) if plausible else b""
    except OSError as exc:
        raise ForgeError(f"cannot be read ({exc.strerror or exc})", path=path) from None
    header: Any = None
    if raw and len(raw) == length:
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            header = None
    if pickled or (suffix_pickled and not isinstance(header, dict)):
        raise ForgeError("is a pickled checkpoint (.ckpt/.pt/.bin): LoRA Forge never opens "
                         "pickles, they can run code when loaded", path=path, fix=SAFE_FIX)
    if raw.startswith(b"{") and len(raw) < length:
        raise ForgeError(f"is incomplete: {size} bytes, its header alone needs {8 + length} "
                         "(a copy or a save that did not finish)", path=path,
                         fix="copy it again, or wait for the run that writes it to finish")
    if not isinstance(header, dict):
        raise ForgeError("is not a safetensors file (no valid safetensors header)", path=path,
                         fix="give a LoRA in .safetensors format")
    try:
        end = payload_end(header)
    except ValueError as exc:
        raise ForgeError(f"is a damaged safetensors file (tensor {exc.args[0]!r})", path=path,
                         fix="copy or download it again") from None
    if 8 + length + end > size:
        raise ForgeError(f"is incomplete: {size} bytes, its header needs {8 + length + end} "
                         "(a copy or a save that did not finish)", path=path,
                         fix="copy it again, or wait for the run that writes it to finish")
    return header, 8 + length


def _shape(info: Any) -> list[int]:
    shape = info.get("shape") if isinstance(info, dict) else None
    return [int(x) for x in shape] if isinstance(shape, list) else []


def _architecture_problem(keys: list[str], header: dict[str, Any], metadata: dict[str, str],
                          widths: BaseWidths) -> str | None:
    version = str(metadata.get("ss_base_model_version", "")).lower()
    arch = str(metadata.get("modelspec.architecture", "")).lower()
    if "sdxl" in version or "-xl-" in arch or any(k.startswith(_SDXL_PREFIXES) for k in keys):
        return "is an SDXL LoRA; LoRA Forge renders SD 1.x models only"
    if any(k.startswith(_OTHER_FAMILIES) for k in keys) or any(
            name in arch for name in ("flux", "stable-diffusion-3", "sd3")):
        return "is a LoRA for another model family (Flux/SD3/...), not SD 1.x"
    if str(metadata.get("ss_v2", "")).lower() == "true" or version.startswith("sd_v2"):
        return "is an SD 2.x LoRA; LoRA Forge renders SD 1.x models only"
    if not any(k.startswith(_SD1_PREFIXES) for k in keys):
        return ("holds no SD 1.x LoRA weights (no lora_unet_/lora_te_ keys): not a LoRA, or "
                "a format LoRA Forge does not read")
    for key in keys:
        shape = _shape(header[key])
        if len(shape) < 2 or not re.search(r"(lora_down|lora_A|lora\.down)\.weight$", key):
            continue
        if re.search(r"attn2[._]to_[kv][._]", key) and shape[1] != widths.cross_attention_dim:
            family = {768: " (SD 1.x)", 1024: " (SD 2.x)", 2048: " (SDXL)"}.get(shape[1], "")
            return (f"was made for a model with text width {shape[1]}{family}; the base model "
                    f"has {widths.cross_attention_dim}")
        if re.search(r"(lora_te_|text_encoder\.).*q_proj", key) \
                and shape[1] != widths.text_hidden_size:
            return (f"was made for a text encoder of width {shape[1]}; the base model's has "
                    f"{widths.text_hidden_size}")
    return None


#: LyCORIS formats by a mark in their keys: other products than LoRA's, which are not read.
_LYCORIS = ((".hada_", "LoHa"), (".lokr_", "LoKr"), (".oft_", "OFT"), (".diff", "full-weight"))
#: kohya's keys with the original (LDM) U-Net layer names, not diffusers' (down_blocks, ...).
_LDM_UNET = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")


def _unread_format(keys: list[str]) -> str | None:
    """A LyCORIS file or one with layer names the loader does not map: named before minutes
    of loading, not as an internal error of the loader."""
    for mark, name in _LYCORIS:
        key = next((k for k in keys if mark in k), None)
        if key is not None:
            return (f"is a {name} (LyCORIS) file, not a LoRA (e.g. {key}): LoRA Forge reads "
                    "LoRA and LoCon weights only")
    key = next((k for k in keys if k.startswith(_LDM_UNET)), None)
    if key is not None:
        return (f"names the U-Net's layers the original (LDM) way (e.g. {key}), which LoRA "
                "Forge does not read: it reads kohya's and diffusers' names (down_blocks_...)")
    return None


#: The two halves of a LoRA module's product, in each key format read (kohya, peft, diffusers).
_HALVES = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"),
           (".lora.down.weight", ".lora.up.weight"))


def _missing_half(keys: list[str]) -> str | None:
    """A module holding one half of its product without the other (a cut or edited file)."""
    present = set(keys)
    missing = []
    for down, up in _HALVES:
        for key in keys:
            for have, lack in ((down, up), (up, down)):
                if key.endswith(have) and key[:-len(have)] + lack not in present:
                    missing.append((key[:-len(have)], have, lack))
    if not missing:
        return None
    module, have, lack = sorted(missing)[0]
    more = f" (and {len(missing) - 1} more module(s))" if len(missing) > 1 else ""
    return (f"is incomplete: module {module} has its {have.strip('.')} but no "
            f"{lack.strip('.')}{more}")


def _module_names(component: str, path: str) -> tuple[str, ...]:
    """The names a LoRA file may give the module at `path` of `component` ("unet",
    "text_encoder"): kohya's (with or without CLIP's `text_model.`), diffusers' and peft's."""
    if component == "unet":
        return kohya_name(component, path), f"unet.{path}"
    bare = path.removeprefix(TEXT_PATH_PREFIX)
    return (kohya_name(component, path), TEXT_PREFIX + bare.replace(".", "_"),
            f"text_encoder.{path}", f"text_encoder.{TEXT_PATH_PREFIX}{bare}",
            f"text_encoder.{bare}")


def inspect_lora(path: Path, widths: BaseWidths) -> LoraFile:
    """Check a LoRA file from its header (ForgeError naming it when it cannot be used)."""
    path = Path(path)
    header, offset = read_header(path)
    raw_meta = header.get("__metadata__") or {}
    metadata = {str(k): str(v) for k, v in raw_meta.items()} if isinstance(raw_meta, dict) else {}
    keys = [k for k in header if k != "__metadata__"]
    if not keys:
        raise ForgeError("holds no tensors", path=path, fix="give a trained LoRA file")
    problem = _architecture_problem(keys, header, metadata, widths)
    if problem:
        raise ForgeError(problem, path=path,
                         fix="use a LoRA trained for SD 1.x (the base model's family), e.g. "
                             "one made by `loraforge train`")
    unread = _unread_format(keys)
    if unread:
        raise ForgeError(unread, path=path,
                         fix="use a LoRA in kohya's or diffusers' LoRA format (lora_down/lora_up "
                             "weights, as `loraforge train` writes), e.g. the LoRA version of "
                             "this character if its author offers one")
    incomplete = _missing_half(keys)
    if incomplete:
        raise ForgeError(incomplete, path=path,
                         fix="the file was cut short or edited: use it as its trainer saved it "
                             "(a run of ours keeps it in its run folder)")
    _refuse_non_finite(path, keys)
    has_text = any(k.startswith(("lora_te_", "text_encoder.")) for k in keys)
    try:
        sha = digest_file(path, offset)
    except OSError as exc:
        raise ForgeError(f"cannot be read ({exc.strerror or exc})", path=path) from None
    modules = frozenset(key[:-len(down)] for key in keys for down, _ in _HALVES
                        if key.endswith(down))
    return LoraFile(path.resolve(), metadata, sha, has_text, modules)


# --- naming a LoRA --------------------------------------------------------------------------

def split_weight(text: str) -> tuple[str, float | None]:
    """`path/to/x.safetensors:0.8` -> (`path/to/x.safetensors`, 0.8); no weight -> None."""
    text = text.strip()
    match = _WEIGHT_RE.match(text)
    if match is None:
        return text, None
    return match.group("ref"), float(match.group("weight"))


#: The LoRA weights accepted (generate.lora_weight's range): far beyond, images are noise.
MAX_WEIGHT = 5.0


def check_weight(weight: float, what: str) -> float:
    if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
        raise ForgeError(f"{what}: the LoRA weight must be a number from -{MAX_WEIGHT:g} to "
                         f"{MAX_WEIGHT:g}, got {weight}", fix="use a weight such as 0.8")
    return float(weight)


def resolve_lora(ref: str, runs_dir: Path, relative_to: Path) -> Path:
    """A LoRA file from a path (relative to `relative_to`), a run folder, or a run's name."""
    raw = ref.strip()
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = relative_to / path
    if path.is_file():
        return path
    if path.is_dir():
        final = runs.final_lora(path)
        if final.is_file():
            return final
        raise ForgeError("is a folder without a final LoRA", path=path,
                         fix="give the .safetensors file, or a run whose training finished")
    if runs.NAME_PATTERN.match(raw) and (runs_dir / raw).is_dir():
        run_dir = runs_dir / raw
        final = runs.final_lora(run_dir)
        if final.is_file():
            return final
        status = runs.status(runs.read_record(run_dir))
        raise ForgeError(f"training run `{raw}` has no final LoRA yet (status: {status})",
                         path=run_dir,
                         fix="let the run finish (rerun `loraforge train --run "
                             f"{raw}` to resume it), or pick another LoRA")
    if path.suffix == "" and path.with_suffix(".safetensors").is_file():
        return path.with_suffix(".safetensors")
    known = [r.get("name") or Path(r["dir"]).name for r in runs.list_runs(runs_dir)]
    names = f" (runs: {', '.join(known)})" if known else ""
    raise ForgeError("LoRA file not found", path=path,
                     fix=f"check the path; give a .safetensors file or a run name under "
                         f"{runs_dir}{names}")


#: How the user takes a run by name, for `runs.newest_finished`'s refusal of another
#: project's run.
NAME_IT = "`--lora {name}` (or `--lora none` for the base model alone)"


def newest_finished_lora(runs_dir: Path, project: Path) -> runs.Chosen:
    """The newest finished run of the project in the folder `project` (`runs.newest_finished`:
    another project's on a shared storage root is refused, named), with its final LoRA.

    Runs that are running, failed or interrupted are ignored, and so is a finished run whose
    final file is missing or incomplete (with a warning). ForgeError listing every run and its
    status when no finished run has a usable file.
    """
    skipped: list[str] = []

    def problem(final: Path) -> str | None:
        try:
            read_header(final)
        except ForgeError as exc:
            log.warning("skipping run %s: %s", final.parent.name, exc.message)
            skipped.append(f"{final.parent.name} (finished, but {exc.message})")
            return exc.message
        return None

    try:
        chosen = runs.newest_finished(runs_dir, project, NAME_IT, problem)
    except runs.OtherProjectsOnly as exc:  # say what was asked of it
        raise runs.OtherProjectsOnly(f"no LoRA given, and {exc.message}", fix=exc.fix) from None
    if chosen is not None:
        return chosen
    records = runs.list_runs(runs_dir)
    if not records:
        raise ForgeError(f"no LoRA given and no training run found under {runs_dir}",
                         fix="train one first (`loraforge train`), or pass --lora FILE "
                             "(--lora none renders the base model alone)")
    listed = [f"{Path(r['dir']).name} ({r.get('status', 'unknown')})" for r in records
              if r.get("status") != "finished"] + skipped
    damaged = [runs.final_lora(Path(r["dir"])) for r in records
               if r.get("status") == "damaged"]
    kept = [f"--lora {final}" for final in damaged if final.is_file()]
    raise ForgeError(f"no LoRA given and no finished training run with a usable LoRA under "
                     f"{runs_dir}: " + ", ".join(listed),
                     fix=(f"a damaged run's LoRA is still usable: pass {' or '.join(kept)}; "
                          if kept else "") + "finish a run (rerun `loraforge train` to resume "
                         "an interrupted one), or pass --lora FILE (--lora none renders the "
                         "base model alone)")


# --- loading into a pipeline ----------------------------------------------------------------

class LoraStack:
    """LoRA files loaded into one pipeline (each once, as its own adapter); per scene the active
    ones are merged into the U-Net's and text encoder's weights. The weights they change are
    kept unmerged on the CPU and copied back before another set is merged, so a scene renders
    the same bits whatever scenes came before it (subtracting a merged LoRA again would not,
    in fp16).

    Between scene changes peft's adapter wrappers are taken out of the models and their
    (merged) base layers put in their place: the denoising steps run plain layers, and a
    compiled model (generate.compile) sees the same modules in every scene, so changing LoRAs
    never recompiles it."""

    COMPONENTS = ("unet", "text_encoder")

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.adapters: dict[Path, str] = {}
        self.active: tuple[tuple[str, float], ...] | None = None  # merged: (path, weight)s
        self.unmerged: dict[tuple[str, str], Any] = {}
        self.wrappers: dict[tuple[str, str], Any] = {}  # taken out of the models

    def load(self, lora: LoraFile) -> str:
        if lora.path in self.adapters:
            return self.adapters[lora.path]
        name = f"lora{len(self.adapters)}"
        started = time.monotonic()
        try:
            # No "Loading weights" bar, no "LOAD REPORT" table, no log of the error below. The
            # file, not its tensors: a diffusers/peft LoRA keeps its alpha in the file's
            # metadata, which a state dict leaves behind (its strength would be alpha = rank).
            # Only safetensors: nothing is unpickled, whatever the file is.
            with quiet_loading(errors=False):
                self.pipe.load_lora_weights(str(lora.path), adapter_name=name,
                                            use_safetensors=True)
        except Exception as exc:  # a file diffusers cannot map onto this model, whatever way
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            # "Error(s) in loading state_dict for X:" says little; the first mismatch says it
            first = " ".join(lines[:2]) if lines and lines[0].endswith(":") else \
                (lines[0] if lines else type(exc).__name__)
            raise ForgeError(f"could not be applied to the base model: {first[:300]}",
                             path=lora.path,
                             fix="use a LoRA trained for this base model's family (SD 1.x)"
                             ) from None
        log.info("loaded LoRA %s as %s (%.1f s)", lora.path.name, name,
                 time.monotonic() - started)
        self._warn_left_out(lora, name)
        self.adapters[lora.path] = name
        return name

    def _warn_left_out(self, lora: LoraFile, name: str) -> None:
        """Modules of the file that match no layer of the base model are left out by the loader
        without a word (it logs them only at a level we silence): a LoRA applied in part looks
        like one applied in full. Said once, naming some of them."""
        modules = lora.modules
        applied = [key for key, wrapper in self._adapted_layers() if name in wrapper.lora_A]
        if len(applied) >= len(modules):
            return
        known = {spelling for component, path in applied
                 for spelling in _module_names(component, path)}
        unknown = sorted(modules - known)
        named = f" (e.g. {', '.join(unknown[:3])})" if unknown else ""
        log.warning("%s: %d of its %d modules match no layer of the base model and are left "
                    "out%s: it was made for another model, or edited", lora.path.name,
                    len(modules) - len(applied), len(modules), named)

    def activate(self, uses: list[LoraUse], unmerged: list[LoraFile] | None = None) -> None:
        """Exactly these LoRAs with these weights are active from now on (none: LoRA off).
        `unmerged` LoRAs are loaded too but not merged: casting applies them per region
        (`layers`)."""
        wanted = tuple((str(use.lora.path), use.weight) for use in uses)
        extra = [lora for lora in unmerged or [] if lora.path not in self.adapters]
        if wanted == self.active and not extra:
            return
        self._put_wrappers_back()
        self._unmerge()
        self.active = None  # until the new set is in place (a load may fail)
        for lora in extra:
            self.load(lora)
        names = [self.load(use.lora) for use in uses]
        if uses:
            self.pipe.enable_lora()
            self.pipe.set_adapters(names, [use.weight for use in uses])
            self._keep_unmerged()
            self.pipe.fuse_lora(components=list(self.COMPONENTS), adapter_names=names)
        self._take_wrappers_out()
        self.active = wanted

    def layers(self, lora: LoraFile) -> dict[tuple[str, str], tuple[Any, Any, Any, float]]:
        """A loaded LoRA's adapted layers, unmerged: (component, module path) -> (the model's
        module, lora_A, lora_B, alpha / rank). Valid until the next `activate`."""
        name = self.adapters[lora.path]
        return {key: (wrapper.get_base_layer(), wrapper.lora_A[name], wrapper.lora_B[name],
                      wrapper.lora_alpha[name] / wrapper.r[name])
                for key, wrapper in self.wrappers.items() if name in wrapper.lora_A}

    def _adapted_layers(self) -> Iterator[tuple[tuple[str, str], Any]]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for component in self.COMPONENTS:
            for path, module in getattr(self.pipe, component).named_modules():
                if isinstance(module, BaseTunerLayer):
                    yield (component, path), module

    def _keep_unmerged(self) -> None:
        """A CPU copy of each adapted layer's weight not kept yet (they are all unmerged now)."""
        for key, wrapper in self._adapted_layers():
            if key not in self.unmerged:
                weight = wrapper.get_base_layer().weight
                self.unmerged[key] = weight.detach().to("cpu", copy=True)

    def _unmerge(self) -> None:
        import torch

        if not self.active:
            return
        self.pipe.unfuse_lora(components=list(self.COMPONENTS))
        with torch.no_grad():
            for key, wrapper in self._adapted_layers():
                wrapper.get_base_layer().weight.copy_(self.unmerged[key])

    def _set(self, key: tuple[str, str], module: Any) -> None:
        component, path = key
        parent, _, name = path.rpartition(".")
        setattr(getattr(self.pipe, component).get_submodule(parent), name, module)

    def _take_wrappers_out(self) -> None:
        for key, wrapper in list(self._adapted_layers()):
            self._set(key, wrapper.get_base_layer())
            self.wrappers[key] = wrapper

    def _put_wrappers_back(self) -> None:
        for key, wrapper in self.wrappers.items():
            self._set(key, wrapper)
        self.wrappers.clear()
