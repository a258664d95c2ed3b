"""Resumable training state: LoRA weights (fp32), optimizer, schedule, loss scaler and position.

A state is a folder `state/step-NNNNNNNN/` that appears by an atomic rename of a fully written
temporary folder, so every `step-*` folder is complete. The newest `keep` are kept. Random draws
derive from (seed, step) and (seed, epoch), so no RNG state needs saving.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.errors import ForgeError
from loraforge.runs import POSITION, STATE_DIR, saved_states
from loraforge.runs import STATE_PREFIX as PREFIX

if TYPE_CHECKING:
    import torch

    from loraforge.train.plan import Plan

WEIGHTS = "lora.safetensors"
OPTIMIZER = "optimizer.pt"
#: Which file each image of the run is (sha256 of its bytes), in the config a state is saved with.
CONTENT_KEY = "images.content"
#: What each image trains on (its caption's tags, or the concept name), by the same names.
CAPTIONS_KEY = "images.captions"
_PER_IMAGE = {CONTENT_KEY: " is another image now", CAPTIONS_KEY: "'s caption changed"}
#: Image content changes shown one by one; the rest are counted.
SHOWN_IMAGES = 5
#: The fingerprint of the list of images (with their concepts and buckets).
DATASET_KEY = "images.dataset"
#: Images added or removed shown one by one; the rest are counted.
SHOWN_LISTED = 10


@dataclass
class Position:
    """Where training stands: optimizer steps done, and the next batch to read."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    loss_ema: float = 0.0  # exponential moving average from 0; see `smoothed_loss`

    def smoothed_loss(self, beta: float) -> float:
        """The moving average with its start-up bias removed (as Adam corrects its moments):
        without it the curve would start near 0 and seem to climb."""
        return self.loss_ema / (1 - beta ** self.step) if self.step else 0.0


def state_root(run_dir: Path) -> Path:
    return run_dir / STATE_DIR


def save_state(run_dir: Path, position: Position, weights: dict[str, torch.Tensor],
               trainer_state: dict[str, Any], config: dict[str, Any], keep: int,
               mode: int) -> Path:
    """Write a new state folder atomically and prune old ones. Raises OSError on a full disk,
    leaving every earlier state in place."""
    import torch
    from safetensors.torch import save

    root = state_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{PREFIX}{position.step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        # Serialised in memory, written with plain writes: a full disk is then an OSError
        # (safetensors and torch.save report it as their own errors, or not at all).
        (tmp / WEIGHTS).write_bytes(save({k: v.detach().to("cpu").contiguous()
                                          for k, v in weights.items()}))
        buffer = io.BytesIO()
        torch.save(trainer_state, buffer)
        (tmp / OPTIMIZER).write_bytes(buffer.getvalue())
        (tmp / POSITION).write_text(json.dumps({"position": position.__dict__,
                                                "config": config}, indent=1))
        for item in tmp.iterdir():
            os.chmod(item, mode)
            with open(item, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, mode | 0o111)
        aside = None
        if final.exists():  # the same step saved twice: keep the old one until the swap
            aside = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
            os.replace(final, aside / final.name)
        os.replace(tmp, final)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in saved_states(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class LoadedState:
    path: Path
    position: Position
    config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    trainer_state: dict[str, Any]


_DAMAGED_FIX = "delete this state folder to resume from the one before it, or pass --restart"


def load_state(path: Path) -> LoadedState:
    import torch
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / POSITION).read_text())
        position = Position(**meta["position"])
        counts = (position.step, position.epoch, position.batch_in_epoch)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts) \
                or not isinstance(position.loss_ema, int | float) \
                or not math.isfinite(position.loss_ema) \
                or not isinstance(meta["config"], dict):
            raise ValueError(f"{POSITION} holds values of the wrong kind")
        if f"{PREFIX}{position.step:08d}" != path.name:
            raise ValueError(f"{POSITION} says step {position.step}, its folder another")
        weights = load_file(str(path / WEIGHTS))
        trainer_state = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
    except Exception as exc:  # any damage (truncation, a foreign file) means the same to a user
        raise ForgeError(f"training state cannot be read ({type(exc).__name__}: {exc})",
                         path=path, fix=_DAMAGED_FIX) from None
    return LoadedState(path, position, meta["config"], weights, trainer_state)


def check_position(state: LoadedState, plan: Plan) -> None:
    """A state's position inside the run it resumes (same config, so the same plan): a
    hand-edited one beyond it finished the run at once, and called a few steps final."""
    p = state.position
    if not (p.step <= plan.total_steps and p.epoch <= plan.epochs
            and p.batch_in_epoch <= plan.batches_per_epoch
            and p.epoch * plan.steps_per_epoch <= p.step <= (p.epoch + 1) * plan.steps_per_epoch):
        raise ForgeError(f"training state cannot be read ({POSITION}: step {p.step}, epoch "
                         f"{p.epoch}, batch {p.batch_in_epoch} is no place in this run of "
                         f"{plan.total_steps} steps, {plan.epochs} epochs of "
                         f"{plan.steps_per_epoch})", path=state.path, fix=_DAMAGED_FIX)


def images_captions(examples: list[Any], folder: Path) -> dict[str, str]:
    """{image path inside `folder`: the first 16 hex digits of the sha256 of its tags}: a
    caption edited between an interruption and its resume would mix two trainings."""
    return dict(sorted((_image_name(example.path, folder),
                        hashlib.sha256("\n".join(example.tags).encode()).hexdigest()[:16])
                       for example in examples))


def _image_name(path: Path, folder: Path) -> str:
    """How the records name an image: its path inside `folder`, else its whole path."""
    return path.relative_to(folder).as_posix() if path.is_relative_to(folder) else str(path)


def images_content(paths: list[Path], folder: Path) -> dict[str, str]:
    """{image path inside `folder`: the first 16 hex digits of its bytes' sha256}: an image
    replaced by another of the same name changes it (the list of names does not). Hashes are
    remembered per file as the latent cache's are, so a run hashes each image once."""
    from loraforge.train.latent_cache import file_sha256

    return dict(sorted((_image_name(path, folder), file_sha256(path)[:16]) for path in paths))


def _per_image_differences(key: str, old: dict[str, str], new: dict[str, str]) -> list[str]:
    """One line per image whose content (or caption) changed (the images added or removed:
    `_listed_differences`)."""
    changed = sorted(name for name in set(old) & set(new) if old[name] != new[name])
    what = _PER_IMAGE[key]
    lines = [f"{key}: {name}{what} (sha256 {old[name]}... -> {new[name]}...)"
             for name in changed[:SHOWN_IMAGES]]
    if len(changed) > SHOWN_IMAGES:
        lines.append(f"{key}: and {len(changed) - SHOWN_IMAGES} more changed")
    return lines


def _folders(content: dict[str, str]) -> dict[str, dict[str, str]]:
    """{folder: {file name: content}} of images named by their paths."""
    found: dict[str, dict[str, str]] = {}
    for name, digest in content.items():
        folder, _, file = name.rpartition("/")
        found.setdefault(folder, {})[file] = digest
    return found


def _renamed_folders(old: dict[str, str], new: dict[str, str]) -> dict[str, str]:
    """{old folder: new folder} for a concept folder renamed with the same images in it."""
    before, after = _folders(old), _folders(new)
    return {gone: came for gone, images in before.items() if gone not in after
            for came, moved in after.items() if came not in before and moved == images}


def _listed_differences(old: Any, new: Any) -> list[str]:
    """The images added and removed, by name, and the concept folders renamed, from the
    images' content recorded on both sides (none when either lacks it)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return []
    renamed = _renamed_folders(old, new)
    moved = set(renamed) | set(renamed.values())
    changes = sorted([(name, "removed") for name in set(old) - set(new)]
                     + [(name, "added") for name in set(new) - set(old)])
    changes = [(name, what) for name, what in changes if name.rpartition("/")[0] not in moved]
    lines = [f"images: concept folder {gone} -> {came}" for gone, came in sorted(renamed.items())]
    lines += [f"images: {name} {what}" for name, what in changes[:SHOWN_LISTED]]
    if len(changes) > SHOWN_LISTED:
        lines.append(f"images: and {len(changes) - SHOWN_LISTED} more added or removed")
    return lines


def config_differences(saved: dict[str, Any], current: dict[str, Any],
                       ignored: set[str]) -> list[str]:
    """`section.key: saved -> current` for every value that differs, except `ignored` keys.
    `images.content` and `images.captions` are compared image by image, and only when the
    saved side has them (states written before them resume as they did); images added or
    removed are then named, not the list's fingerprint."""
    lines = []
    for section in sorted(set(saved) | set(current)):
        before, after = saved.get(section, {}), current.get(section, {})
        listed = (_listed_differences(before.get("content"), after.get("content"))
                  if section == "images" else [])
        lines += listed
        for key in sorted(set(before) | set(after)):
            name = f"{section}.{key}"
            old, new = before.get(key), after.get(key)
            if name in _PER_IMAGE:
                if isinstance(old, dict) and isinstance(new, dict):
                    lines += _per_image_differences(name, old, new)
                continue
            if name in ignored or old == new or (name == DATASET_KEY and listed) or (
                    isinstance(old, float) and isinstance(new, float)
                    and math.isclose(old, new, rel_tol=1e-9)):  # 1e-4 x 3 against 3e-4
                continue
            lines.append(f"{name}: {before.get(key)!r} -> {after.get(key)!r}")
    return lines
