"""Whether a saved state (or a finished run) belongs to this config and dataset: what decides
the trained weights is recorded with every state, and a resume onto anything else is refused
with the list of differences."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.errors import ForgeError
from loraforge.hashing import short_hash
from loraforge.train.plan import lr_scale
from loraforge.train.state import config_differences, images_captions, images_content

if TYPE_CHECKING:
    from loraforge.config import Settings
    from loraforge.train.distributed import World

#: Keys that may change between an interruption and its resume without changing the result.
#: dataset.path among them: the images themselves are compared (`images`), so the same folder
#: named another way (`./master_dataset/`, an absolute path, a moved project) still resumes.
#: The models other than the base are not used by training. Previews render with their own
#: seeds under no_grad, and every draw of the training is seeded per step (the global stream
#: only draws the first LoRA weights, before any preview), so adding, changing or removing
#: them leaves the weights as they were. The disk latent cache holds what encoding gives.
RESUME_SAFE = {
    "train.run_name", "train.save_every_n_epochs", "train.keep_last_n", "train.save_precision",
    "train.state_every_n_steps", "train.keep_states", "train.log_every_seconds",
    "train.vae_batch_size", "dataset.path",
    "models.controlnet", "models.tagger", "models.detector",
    "train.sample_prompts", "train.sample_every_n_epochs", "train.sample_steps",
    "train.sample_sampler", "train.cache_latents_to_disk",
}
#: Sections of the config that decide the trained weights.
SEMANTIC_SECTIONS = ("models", "dataset", "train")
#: The learning rates train.scale_lr scales for the number of processes.
LEARNING_RATES = ("unet_lr", "text_encoder_lr")
#: The base model's hash (`base_sha256`) in the models section of a state's config.
BASE_SHA256 = "base_sha256"
#: The same in run.json, recorded at the start of each training of the run.
BASE_SHA256_RECORD = "base_model_sha256"
#: How a difference says that the base model's folder holds other weights.
OTHER_WEIGHTS = "holds other weights than the run was trained on"


def _relative(path: Path, folder: Path) -> str:
    return str(path.relative_to(folder)) if path.is_relative_to(folder) else str(path)


def images_fingerprint(examples: list[Any], folder: Path | None) -> str:
    """The list of images (paths inside `folder`; absolute when None), concepts and buckets."""
    return hashlib.sha256(json.dumps([
        (_relative(e.path, folder) if folder else str(e.path), e.concept, e.bucket)
        for e in examples]).encode()).hexdigest()[:16]


def upgraded(saved: dict[str, Any], settings: Settings, examples: list[Any]) -> dict[str, Any]:
    """A state's config as this version writes it. Versions before several processes saved
    the (single-process) batch_size and fingerprinted the images by absolute path."""
    train = saved.get("train", {})
    if "batch_size" not in train:
        return saved
    train = {k: v for k, v in train.items() if k != "batch_size"}
    train["global_batch_size"] = saved["train"]["batch_size"]
    images = dict(saved.get("images", {}))
    if images.get("dataset") == images_fingerprint(examples, None):
        images["dataset"] = images_fingerprint(examples, settings.dataset_dir)
    return {**saved, "train": train, "images": images}


def trained_images(settings: Settings, examples: list[Any]) -> dict[str, Any]:
    """The list of images (with their concepts and buckets), each image's content and its
    caption's tags. Paths inside the dataset folder: a project moved elsewhere still resumes."""
    return {"dataset": images_fingerprint(examples, settings.dataset_dir),
            "content": images_content(sorted({e.path for e in examples}), settings.dataset_dir),
            "captions": images_captions(examples, settings.dataset_dir)}


def base_sha256(settings: Settings) -> str:
    """The base model's weights, by the hash A1111 shows for them (`model_sha256`): read from
    its manifest, else its U-Net's file hashed once and remembered in the cache folder."""
    from loraforge.models.manifest import model_sha256
    from loraforge.models.store import resolve_base_model

    return model_sha256(resolve_base_model(settings), settings.cache_dir) or ""


def _weights_config(data: dict[str, Any], processes: int) -> dict[str, Any]:
    """The config's sections as they decide the weights, from `settings.to_dict()` as a run of
    `processes` training processes used it: the global batch and the learning rates the
    optimizer uses, not the number of processes nor the rule that scaled the rates for it."""
    found = {section: dict(data.get(section, {})) for section in SEMANTIC_SECTIONS}
    train = found["train"]
    scale = lr_scale(train.pop("scale_lr", "none"), processes)
    train["global_batch_size"] = _times(train.pop("batch_size", None), processes)
    for key in LEARNING_RATES:
        train[key] = _times(train.get(key), scale)
    train.pop("gpus", None)
    return found


def _times(value: Any, factor: float) -> Any:
    """`value` x `factor` when it is a number (a hand-edited run.json may hold anything)."""
    return value * factor if isinstance(value, int | float) and not isinstance(value, bool) \
        else value


def semantic_config(settings: Settings, examples: list[Any], world: World) -> dict[str, Any]:
    """What decides the trained weights: the config's sections, the base model's weights and
    the images themselves. The number of processes does not, as long as the global batch and
    the learning rates the optimizer uses stay the same: a run saved on 4 GPUs resumes on 2
    with twice the batch."""
    found = _weights_config(settings.to_dict(), world.size)
    found["models"][BASE_SHA256] = base_sha256(settings)
    return {**found, "images": trained_images(settings, examples)}


def finished_config(record: dict[str, Any]) -> dict[str, Any]:
    """What a finished run's weights were trained with, from its run.json, as `semantic_config`
    gives it. A record written before the base model's weights or the images were recorded
    lacks them: they are then not compared."""
    processes = record.get("processes")
    found = _weights_config(record.get("config") or {},
                            processes if isinstance(processes, int) and processes > 0 else 1)
    if isinstance(sha := record.get(BASE_SHA256_RECORD), str):
        found["models"][BASE_SHA256] = sha
    if isinstance(images := record.get("images"), dict):
        found["images"] = images
    return found


def _base_change(saved: dict[str, Any], current: dict[str, Any], settings: Settings,
                 ) -> list[str]:
    """The line saying that the base model of the same name holds other weights than the run
    was trained on (none when either side does not know its hash, as a state or run.json
    written before it was recorded)."""
    before, after = saved.get("models", {}), current["models"]
    old, new = before.get(BASE_SHA256), after.get(BASE_SHA256)
    if not old or not new or old == new or before.get("base") != after.get("base"):
        return []
    from loraforge.models.store import resolve_base_model

    return [f"models.base: {resolve_base_model(settings)} {OTHER_WEIGHTS} (model hash "
            f"{short_hash(old)} -> {short_hash(new)})"]


def weights_differences(saved: dict[str, Any], current: dict[str, Any], settings: Settings,
                        world: World) -> list[str]:
    """What differs between what `saved` (a state's config, or `finished_config`) was trained
    with and what this config and dataset train with (`semantic_config`): one line each,
    except keys that do not change the weights. What `saved` does not record is not compared."""
    if "images" not in saved:
        current = {section: values for section, values in current.items() if section != "images"}
    diffs = _base_change(saved, current, settings) + config_differences(
        saved, current, RESUME_SAFE | {f"models.{BASE_SHA256}"})
    if any(d.startswith("train.global_batch_size") for d in diffs):
        diffs.append(f"(the global batch is train.batch_size x the number of training "
                     f"processes, now {settings.config.train.batch_size} x {world.size}: with "
                     "fewer processes raise train.batch_size to keep it)")
    return diffs


def _list_note(diffs: list[str]) -> str:
    """What `images.dataset` means, when it is among the differences (a hash says nothing)."""
    return (" (images.dataset: the list of images)"
            if any(d.startswith("images.dataset") for d in diffs) else "")


def _old_weights_back(diffs: list[str]) -> str:
    """Where the base model's weights changed: that putting them back undoes it."""
    return ("put the base model's old weights back in its folder"
            if any(OTHER_WEIGHTS in d for d in diffs) else "")


def check_resumable(saved: dict[str, Any], path: Path, settings: Settings, examples: list[Any],
                    world: World, run_dir: Path, current: dict[str, Any] | None = None) -> None:
    """Refuse (ForgeError) to resume `run_dir` from the state at `path`, saved with the
    semantic config `saved`, when this config or dataset (`current`, when already taken:
    `semantic_config`) differs from it."""
    if current is None:
        current = semantic_config(settings, examples, world)
    diffs = weights_differences(upgraded(saved, settings, examples), current, settings, world)
    if not diffs:
        return
    shown = "\n  ".join(diffs)
    back = _old_weights_back(diffs)
    raise ForgeError(f"cannot resume run `{run_dir.name}`: its saved state was written with a "
                     f"different config or dataset{_list_note(diffs)}:\n  {shown}", path=path,
                     fix=f"undo those changes{f' ({back})' if back else ''} to resume, pass "
                         f"--restart to start `{run_dir.name}` over, or train under a new --run "
                         "name")


def check_finished_with(record: dict[str, Any], settings: Settings, run_dir: Path,
                        examples: list[Any], world: World) -> None:
    """A finished run is only handed back when a resume of it would be allowed: for what
    decides its weights (`weights_differences`), so not for other settings, images or base
    model weights, which ask for another training that must not be answered with the old
    file."""
    diffs = weights_differences(finished_config(record),
                                semantic_config(settings, examples, world), settings, world)
    if diffs:
        shown = "\n  ".join(diffs)
        back = _old_weights_back(diffs)
        raise ForgeError(f"run `{run_dir.name}` already finished, with other settings or "
                         f"images{_list_note(diffs)}:\n  {shown}", path=run_dir,
                         fix=f"pass --restart to train `{run_dir.name}` again with these "
                             "settings (its files are replaced), or train under a new --run "
                             f"name{f'; or {back} to have its LoRA handed back' if back else ''}")
