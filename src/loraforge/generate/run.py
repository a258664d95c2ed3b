"""`loraforge generate`: check every scene, load the models once, render, write the outputs.

Outputs under `<storage>/Final_Images/` (all written atomically):

- `<scene>-<seed>.png`: the image, with A1111's `parameters` text chunk (an earlier image of
  that name made otherwise, with other parameters, scene record or pose map, is kept: the new
  one is `<scene>-<seed>-v2.png`, ...);
- `<scene>-<seed>.pose.png`: the pose map the ControlNet saw;
- `<scene>-<seed>.json`: the same values as the chunk, plus full paths and hashes;
- `<scene>-<seed>.masks.png`: a cast scene's figure regions (figure 1, 2, ... in red, blue,
  green, ... on the black background);
- `final_command_scene.png`: a copy of the newest image (the seed project's name).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge import __version__
from loraforge.errors import ForgeError
from loraforge.fsutil import held_lock, write_atomic
from loraforge.generate import pnginfo
from loraforge.generate.loras import BaseWidths, LoraStack
from loraforge.generate.scenes import (
    FINAL_NAME,
    RANDOM,
    Job,
    LoraResolver,
    Options,
    PoseCache,
    plan_jobs,
)
from loraforge.runtime import SignalFlag
from loraforge.samplers import infotext_sampler

if TYPE_CHECKING:
    from PIL import Image

    from loraforge.config import Settings

log = logging.getLogger("loraforge.generate")

#: Prompts may be longer than training's 225 tokens; beyond this they are cut (with a warning).
MAX_CHUNKS = 8
TILE_ABOVE = 1024


@dataclass(frozen=True)
class ModelInfo:
    """A model folder as PNG info names it."""

    name: str
    path: Path
    sha256: str
    weights: str  # every weights file of the folder (a VAE swapped at import changes it)

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]


def model_info(folder: Path, cache_dir: Path) -> ModelInfo:
    """The model folder's name and the hash A1111 would show for it (an imported checkpoint's
    own file's, not its converted U-Net's: Civitai and A1111 match images by it)."""
    from loraforge.models.manifest import model_sha256, weights_identity

    return ModelInfo(folder.name, folder, model_sha256(folder, cache_dir) or "",
                     weights_identity(folder, cache_dir))


def parameters_fields(job: Job, seed: int, base: ModelInfo, controlnet: ModelInfo,
                      ) -> dict[str, object]:
    """The last line of PNG info, in A1111's order."""
    control = (f"Module: none, Model: {controlnet.name} [{controlnet.sha256[:8]}], "
               f"Weight: {job.control_scale!r}, Resize Mode: Resize and Fill, "
               "Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, "
               "Control Mode: Balanced")
    loras = pnginfo.format_lora_hashes([(u.lora.name, u.lora.short_hash) for u in job.all_loras])
    sampler, schedule = infotext_sampler(job.sampler)
    return {
        "Steps": job.steps,
        "Sampler": sampler,
        "Schedule type": schedule,
        "CFG scale": repr(job.cfg),
        "Seed": seed,
        "Size": f"{job.width}x{job.height}",
        "Model hash": base.short_hash or None,
        "Model": base.name,
        "Clip skip": job.clip_skip,
        "ControlNet 0": control,
        "Lora hashes": loras or None,
        **(_regional_fields(job) if job.cast else {}),
        "Version": f"loraforge {__version__}",
    }


def a1111_name_clashes(job: Job) -> list[str]:
    """LoRA files of other contents under one name, which A1111 knows a LoRA by (its file name
    alone): their tags and hashes in the PNG info cannot be told apart. One line per name."""
    files: dict[str, dict[str, Path]] = {}
    for use in job.all_loras:
        files.setdefault(use.lora.name, {}).setdefault(use.lora.sha256, use.lora.path)
    clashes = []
    for name, by_content in files.items():
        paths = [str(path) for path in by_content.values()]
        if len(paths) > 1:
            clashes.append(
                f"the LoRAs {', '.join(paths[:-1])} and {paths[-1]} share the name `{name}`, "
                f"the one A1111 knows a LoRA by: the image's PNG info cannot tell them apart (its "
                f"<lora:{name}:...> tags and `Lora hashes` entries name each alike, and A1111 "
                "applies one file for all of them); rename one of the files to tell them apart")
    return clashes


def _regional_fields(job: Job) -> dict[str, object]:
    """Regional Prompter's names for a cast scene (its prompt: base BREAK figure 1 BREAK ...)."""
    assert job.cast is not None
    return {"RP Active": True, "RP Divide mode": "Mask", "RP Calc Mode": "Attention",
            "RP Use Base": True, "RP Base Ratios": repr(job.cast.background_weight)}


def shown_prompt(job: Job) -> str:
    """The prompt PNG info shows, with a `<lora:NAME:WEIGHT>` tag for each LoRA (what A1111
    needs to apply them): a cast scene's as Regional Prompter writes it, the scene's prompt
    then each figure's (trigger included, and its own LoRA's tag), separated by BREAK."""
    scene_loras = [(u.lora.name, u.weight) for u in job.loras]
    if job.cast is None:
        return pnginfo.prompt_with_loras(job.text, scene_loras)
    figures = [pnginfo.prompt_with_loras(f.text, [(f.lora.lora.name, f.lora.weight)]
                                         if f.lora else []) for f in job.cast.figures]
    return pnginfo.prompt_with_loras(" BREAK ".join([job.text, *figures]), scene_loras)


def cast_record(job: Job) -> dict[str, Any] | None:
    """A cast scene's figures as the sidecar and the `loraforge` PNG chunk keep them."""
    if job.cast is None:
        return None
    return {"background_weight": job.cast.background_weight, "pad": job.cast.pad,
            "soften": job.cast.soften,
            "figures": [{"character": f.character, "prompt": f.prompt, "text": f.text,
                         "lora": None if f.lora is None else
                         {"name": f.lora.lora.name, "path": str(f.lora.lora.path),
                          "weight": f.lora.weight, "sha256": f.lora.lora.sha256}}
                        for f in job.cast.figures]}


def _loras_changed_since(image: Path, job: Job) -> list[str]:
    """What `--from image` says of its LoRA files that are no longer the files its record names
    (retrained or replaced under the same path): the image made now differs from it, and is
    written beside it."""
    record = _sidecar(image.parent, image.stem)
    figures = (record.get("cast") or {}).get("figures") or []
    entries = [*(record.get("loras") or []), *(f.get("lora") for f in figures
                                               if isinstance(f, dict))]
    made = {entry.get("path"): entry.get("sha256") for entry in entries
            if isinstance(entry, dict)}
    used = [u.lora for u in job.loras]
    if job.cast is not None:
        used += [f.lora.lora for f in job.cast.figures if f.lora is not None]
    return [f"{lora.path} is not the file {image.name} was made with (retrained or replaced "
            "since: its sha256 differs), so the image made now differs from it and is written "
            "beside it" for lora in used if made.get(str(lora.path)) not in (None, lora.sha256)]


def scene_table(job: Job, batch: list[int]) -> dict[str, Any]:
    """The `[[scene]]` table that renders this image again (`loraforge generate --from`): with
    the seeds of the batch it was denoised in, rendered together again, so that its bits are
    the same (a batch of other seeds may round differently). Its prompts hold no `<lora:...>`
    tags: `loras` names every LoRA the scene applies, the tags' too, by the file it resolved to,
    so the record renders the same files from any folder (a tag `<lora:style:0.7>` named a file
    relative to where the command ran, or a run of the project it ran in)."""
    table: dict[str, Any] = {
        "name": job.name, "prompt": job.text, "negative": job.negative_text, "seeds": batch,
        "size": f"{job.width}x{job.height}", "steps": job.steps, "cfg": job.cfg,
        "sampler": job.sampler, "control_scale": job.control_scale, "clip_skip": job.clip_skip,
        "loras": [{"path": str(u.lora.path), "weight": u.weight} for u in job.loras] or ["none"],
        "pose": job.pose.record()}
    if table["pose"] == RANDOM:  # a pose file's figures are its own: a count would be refused
        table["figures"] = job.pose.figures
    if job.cast is not None:
        table["background_weight"] = job.cast.background_weight
        table["region_pad"] = job.cast.pad
        table["region_soften"] = job.cast.soften
        table["figure"] = [
            {key: value for key, value in (
                ("character", f.character), ("prompt", f.prompt),
                ("lora", f"{f.lora.lora.path}:{f.lora.weight!r}" if f.lora else None))
             if value is not None} for f in job.cast.figures]
    return {"scene": table}


def made_with(base: ModelInfo, controlnet: ModelInfo, device: str, precision: str,
              vae_tiling: bool) -> dict[str, Any]:
    """What an image depends on beyond its PNG info: the models' weights files (the VAE too),
    the device, the precision and VAE tiling. An image made alike but with any of these
    otherwise is kept, and made again beside it (`output_stem`)."""
    return {"model_weights": base.weights, "controlnet_weights": controlnet.weights,
            "device": device, "precision": precision, "vae_tiling": vae_tiling}


def sidecar(job: Job, seed: int, base: ModelInfo, controlnet: ModelInfo, parameters: str,
            image: Path, pose: Path, seconds: float, device: str, precision: str,
            batch: int, made: dict[str, Any]) -> dict[str, Any]:
    return {
        "image": str(image),
        "pose_map": str(pose),
        "pose_source": job.pose.describe(),
        "scene": job.name,
        "prompt": job.prompt,
        "negative_prompt": job.negative,
        "steps": job.steps,
        "sampler": job.sampler,
        "cfg_scale": job.cfg,
        "seed": seed,
        "width": job.width,
        "height": job.height,
        "clip_skip": job.clip_skip,
        "model": {"name": base.name, "path": str(base.path), "hash": base.short_hash,
                  "sha256": base.sha256},
        "controlnet": {"name": controlnet.name, "path": str(controlnet.path),
                       "hash": controlnet.sha256[:8], "sha256": controlnet.sha256,
                       "scale": job.control_scale},
        "loras": [{"name": u.lora.name, "path": str(u.lora.path), "weight": u.weight,
                   "hash": u.lora.short_hash, "sha256": u.lora.sha256} for u in job.loras],
        "cast": cast_record(job),
        "warnings": a1111_name_clashes(job),
        "version": f"loraforge {__version__}",
        "parameters": parameters,
        "device": device,
        "precision": precision,
        "seconds": round(seconds, 3),  # the batch's time over its images
        "batch_size": batch,  # images denoised together (rounding may differ by the batch)
        "made_with": made,
    }


#: The files one image writes: the image, its pose map, its regions, its record.
OUTPUT_SUFFIXES = (".png", ".pose.png", ".masks.png", ".json")


def output_stem(folder: Path, stem: str, parameters: str, scene: dict[str, Any],
                pose: Image.Image, made: dict[str, Any]) -> str:
    """`stem` (`<scene>-<seed>`), unless an image of that name made otherwise is there (other
    parameters, another scene record, or another pose map: a region's padding, an edited pose
    file; or other weights, device, precision or tiling, `made`: a GPU's image is not replaced
    by a CPU's rendering of it), or a file of the user's under one of its names: it is kept,
    and the new one takes the first free `<stem>-v2`, `-v3`, ... An image made alike is kept
    as it is, so a rerun adds nothing."""
    candidate, number = stem, 1
    while any((folder / f"{candidate}{suffix}").exists() for suffix in OUTPUT_SUFFIXES):
        if (folder / f"{candidate}.png").exists():
            if _made_alike(folder, candidate, parameters, scene, pose) \
                    and _sidecar(folder, candidate).get("made_with") == made:
                break
        elif _our_record(folder, candidate):
            break  # the image was deleted and its files of ours left: made again in place
        number += 1  # files of the user's under that name (`x.json`) are not replaced
        candidate = f"{stem}-v{number}"
    return candidate


def _sidecar(folder: Path, stem: str) -> dict[str, Any]:
    """`<stem>.json` as read ({}: none, unreadable, or not a JSON object)."""
    try:
        record = json.loads((folder / f"{stem}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _our_record(folder: Path, stem: str) -> bool:
    """Whether `<stem>.json` is the record this tool wrote for `<stem>.png` (the files beside
    an image are written together, so they are ours too)."""
    image = _sidecar(folder, stem).get("image")
    return isinstance(image, str) and Path(image).name == f"{stem}.png"


def _made_alike(folder: Path, stem: str, parameters: str, scene: dict[str, Any],
                pose: Image.Image) -> bool:
    """Whether `<stem>.png` was made with these parameters, this scene record (its batch of
    seeds aside) and this pose map."""
    import numpy as np
    from PIL import Image

    def without_batch(record: dict[str, Any] | None) -> Any:
        table = dict(json.loads(json.dumps((record or {}).get("scene") or {})))
        table.pop("seeds", None)
        if table.get("pose") != RANDOM:  # recorded beside a pose file before it was left out
            table.pop("figures", None)
        return pnginfo.without_lora_tags(table)

    try:
        if pnginfo.read_parameters(folder / f"{stem}.png") != parameters:
            return False
        if without_batch(pnginfo.read_scene(folder / f"{stem}.png")) != without_batch(scene):
            return False
        with Image.open(folder / f"{stem}.pose.png") as old_pose:
            return bool(np.array_equal(np.asarray(old_pose.convert("RGB")),
                                       np.asarray(pose.convert("RGB"))))
    except OSError:  # unreadable, not a PNG, or no pose map beside it: someone's file, kept
        return False


class Stopped(Exception):
    """Generation stopped between batches, or before the first while the models loaded, on
    SLURM's time-limit warning (SIGUSR1): the images written so far are kept, and a rerun of
    the same command skips them."""

    def __init__(self, written: int, total: int, jobs: list[Job]) -> None:
        done = f"{written} of {total} images written"
        super().__init__(done if written else f"nothing rendered yet, {done}")
        self.written, self.total = written, total
        #: Each scene whose seeds were drawn at random (-1), with the seed (or seeds) to give
        #: in their place: a rerun of the same command draws others.
        self.drawn = [(job.name, job.drawn_seeds) for job in jobs if job.drawn_seeds]


def time_limit_warning() -> SignalFlag:
    """SIGUSR1 (SLURM's warning that the time limit is near, slurm.grace_seconds ahead) as a
    flag checked before the models load and between batches: the batch in hand is finished and
    written, then the command stops (`Stopped`) and its job is requeued. Left at its default,
    the signal ended the process, and the requeued job made every image again from the first."""
    return SignalFlag(("SIGUSR1",), log, "stopping after the images in hand (before the "
                                         "first, while the models load)")


@dataclass(frozen=True)
class PlannedOutput:
    """One image to make: its seed, pose map, PNG info and file stem; `made`: an image with
    this stem is there, made alike (these parameters, scene and pose) and with the same
    weights, device, precision and tiling: it is kept."""

    seed: int
    pose: Image.Image
    parameters: str
    stem: str
    made: bool


def _plan_output(folder: Path, job: Job, seed: int, batch: list[int], base: ModelInfo,
                 controlnet: ModelInfo, made: dict[str, Any]) -> PlannedOutput:
    pose = job.pose.image_for(seed, job.width, job.height)
    parameters = pnginfo.format_parameters(shown_prompt(job), job.negative_text,
                                           parameters_fields(job, seed, base, controlnet))
    scene = scene_table(job, batch)
    stem = output_stem(folder, f"{job.stem}-{seed}", parameters, scene, pose, made)
    # output_stem stops at an existing image only when it was made alike: it is kept
    return PlannedOutput(seed, pose, parameters, stem, (folder / f"{stem}.png").exists())


def _newest_is(folder: Path, image: Path, mode: int) -> None:
    """`final_command_scene.png` becomes a copy of `image`: a kept image (made before with the
    same settings, see `PlannedOutput`) that is the newest of this command."""
    import shutil

    from loraforge.fsutil import save_atomic

    try:
        save_atomic(folder / f"{FINAL_NAME}.png", lambda tmp: shutil.copyfile(image, tmp), mode)
    except OSError as exc:
        raise ForgeError(f"could not copy {image.name} to {FINAL_NAME}.png: "
                         f"{exc.strerror or exc} (disk or quota full?)", path=folder,
                         fix="free space and rerun; images already written are kept") from None


def _write_outputs(folder: Path, stem: str, image: Image.Image, pose: Image.Image,
                   parameters: str, record: dict[str, Any], mode: int,
                   masks: Image.Image | None, scene: dict[str, Any]) -> Path:
    from loraforge.fsutil import save_atomic

    image_path = folder / f"{stem}.png"
    try:
        # The record first: files of an image stopped before the image itself was written are
        # then known as ours (`_our_record`), and its rerun makes it in their place, not as -v2
        write_atomic(folder / f"{stem}.json", json.dumps(record, indent=2, ensure_ascii=False)
                     + "\n", mode)
        save_atomic(folder / f"{stem}.pose.png", lambda tmp: pose.save(tmp, format="PNG"), mode)
        if masks is not None:
            save_atomic(folder / f"{stem}.masks.png", lambda tmp: masks.save(tmp, format="PNG"),
                        mode)
        else:  # an uncast image made in the place of a cast one: its masks are not this one's
            (folder / f"{stem}.masks.png").unlink(missing_ok=True)
        pnginfo.save_png_with_scene(image, image_path, parameters, scene, mode)
        pnginfo.save_png_with_scene(image, folder / f"{FINAL_NAME}.png", parameters, scene, mode)
    except OSError as exc:
        raise ForgeError(f"could not write {stem}.png: {exc.strerror or exc} (disk or quota "
                         "full?)", path=folder,
                         fix="free space and rerun; images already written are kept") from None
    return image_path


def _cast_prompts(pipe: Any, stack: LoraStack, job: Job) -> tuple[list[Any], Any]:
    """A cast scene's figure LoRA layers in the U-Net, and its prompts, encoded per slot."""
    from loraforge.generate.casting import encode_cast, figure_deltas

    assert job.cast is not None
    unet, text = [], []
    for figure in job.cast.figures:
        layers = stack.layers(figure.lora.lora) if figure.lora else {}
        weight = figure.lora.weight if figure.lora else 0.0
        unet.append(figure_deltas(layers, weight, "unet"))
        text.append(figure_deltas(layers, weight, "text_encoder"))
    prompts = encode_cast(pipe, job.text, job.negative_text, [f.text for f in job.cast.figures],
                          text, job.clip_skip, MAX_CHUNKS)
    return unet, prompts


def _casting(pipe: Any, job: Job, regions: list[Any], unet_deltas: list[Any],
             ) -> contextlib.AbstractContextManager[Any]:
    if job.cast is None:
        return contextlib.nullcontext()
    from loraforge.generate.casting import regional

    return regional(pipe, regions, job.cast.background_weight, job.width, job.height,
                    unet_deltas)


def _prepare_output(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ForgeError(f"cannot create the output folder ({exc.strerror or exc})", path=folder,
                         fix="check storage.root in forge.toml and its permissions") from None
    if not folder.is_dir():
        raise ForgeError("is not a folder", path=folder, fix="move the file out of the way")
    newest = folder / f"{FINAL_NAME}.png"
    if newest.exists() and not newest.is_file():  # each image is copied there: say so now
        raise ForgeError("is a folder (or other non-file) where the copy of the newest image "
                         "goes", path=newest, fix="move it away or rename it, then rerun")


def generate(settings: Settings, options: Options, echo: Callable[[str], None],
             precision: str = "auto") -> list[Path]:
    """Check everything, then render every scene and seed; returns the images written. A
    time-limit warning from the start on stops it (`Stopped`), before the first image when it
    comes while the scenes are checked and the models load."""
    with time_limit_warning() as warning:
        return _generate(settings, options, echo, precision, warning)


def _generate(settings: Settings, options: Options, echo: Callable[[str], None],
              precision: str, warning: SignalFlag) -> list[Path]:
    from loraforge.models import store
    from loraforge.runtime import go_offline, pick_device

    go_offline(settings)
    base_dir = store.resolve_base_model(settings)
    controlnet_dir = store.resolve_controlnet(settings)
    store.check_pair(base_dir, controlnet_dir)
    resolver = LoraResolver(settings, BaseWidths.of(base_dir))
    from loraforge.generate.extract import photo_poses

    jobs = plan_jobs(settings, options, resolver,
                     PoseCache(lambda m: log.warning("%s", m), photo_poses(settings)))
    folder = settings.images_dir
    _prepare_output(folder)
    if options.source is not None:
        for note in _loras_changed_since(Path(options.source), jobs[0]):
            echo(f"note: {note}")
    default = resolver.default_used(jobs)
    if default is not None:
        echo(f"note: no LoRA named: using {default}")
    for job in jobs:
        for note in job.notes:
            echo(f"note: {job.name}: {note}")
        for clash in a1111_name_clashes(job):
            log.warning("%s: %s", job.name, clash)
        for use in job.loras:
            echo(f"{job.name}: LoRA {use.lora.path} (weight {use.weight:g})")
        for number, figure in enumerate(job.cast.figures if job.cast else [], 1):
            own = f", LoRA {figure.lora.lora.path} (weight {figure.lora.weight:g}) in its " \
                  "region" if figure.lora else ""
            echo(f"{job.name}: figure {number}: \"{figure.text}\"{own}")
        if not job.all_loras:
            echo(f"{job.name}: no LoRA (base model alone)")

    from loraforge.generate.pipeline import quiet_libraries

    quiet_libraries()
    import torch

    from loraforge.generate.pipeline import (
        compile_denoisers,
        load_pipeline,
        make_scheduler,
        pick_dtype,
        render_batch,
        set_vae_tiling,
    )
    from loraforge.generate.prompts import encode_prompts

    gen = settings.config.generate
    device = pick_device()
    chosen = pick_dtype(precision, device)
    if chosen.note:
        echo(f"note: {chosen.note}")
    offload = gen.offload and device.type == "cuda"
    if gen.offload and not offload:
        echo("note: generate.offload only applies on a GPU; ignored on the CPU")
    total = sum(len(job.seeds) for job in jobs)
    if warning.given:
        raise Stopped(0, total, jobs)
    started = time.monotonic()
    base = model_info(base_dir, settings.cache_dir)
    controlnet = model_info(controlnet_dir, settings.cache_dir)
    pipe = load_pipeline(base_dir, controlnet_dir, device, chosen.dtype, offload)
    echo(f"models: {base_dir.name} + {controlnet_dir.name} on {device.type} ({chosen.name}), "
         f"loaded in {time.monotonic() - started:.1f} s")
    compile_denoisers(pipe, gen.compile)
    compiled: set[tuple[int, int, int]] = set()  # the batch shapes compiled so far
    stack = LoraStack(pipe)
    scheduler_config = dict(pipe.scheduler.config)
    written: list[Path] = []
    newest_kept: Path | None = None

    def copy_newest_kept() -> None:  # also when stopped: the newest image is where it says
        if newest_kept is not None:
            _newest_is(folder, newest_kept, settings.file_mode)

    with contextlib.ExitStack() as at_the_end:
        at_the_end.callback(copy_newest_kept)
        for job in jobs:
            stack.activate(job.loras, [f.lora.lora for f in job.cast.figures if f.lora]
                           if job.cast else None)
            pipe.scheduler = make_scheduler(job.sampler, scheduler_config)
            tiling = gen.vae_tiling if gen.vae_tiling is not None else \
                max(job.width, job.height) > TILE_ABOVE
            set_vae_tiling(pipe, tiling)
            if job.cast is None:
                embeds, negative_embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder,
                                                         [job.text, job.negative_text],
                                                         job.clip_skip, MAX_CHUNKS)
            else:
                unet_deltas, cast_prompts = _cast_prompts(pipe, stack, job)
                embeds, negative_embeds = cast_prompts.embeds, cast_prompts.negative
            batch = len(job.seeds) if options.source is not None else gen.batch_size
            made = made_with(base, controlnet, str(device), chosen.name, tiling)
            for first in range(0, len(job.seeds), batch):
                if warning.given:
                    raise Stopped(len(written), total, jobs)
                planned = [_plan_output(folder, job, seed, job.seeds[first:first + batch],
                                        base, controlnet, made)
                           for seed in job.seeds[first:first + batch]]
                for kept in (out for out in planned if out.made):
                    written.append(folder / f"{kept.stem}.png")
                    newest_kept = written[-1]  # copied to final_command_scene.png at the end
                    echo(f"[{len(written)}/{total}] {written[-1]} (made before with the same "
                         "settings: kept)")
                todo = [out for out in planned if not out.made]
                if not todo:
                    continue
                newest_kept = None  # the images written next are copied there as they are
                seeds = [out.seed for out in todo]
                t0 = time.monotonic()
                regions = [job.cast.regions(job.pose, seed, job.width, job.height)
                           for seed in seeds] if job.cast else []
                with _casting(pipe, job, regions, unet_deltas if job.cast else []):
                    images = render_batch(pipe, embeds, negative_embeds, job.width, job.height,
                                          job.steps, job.cfg, seeds, [o.pose for o in todo],
                                          job.control_scale)
                seconds = (time.monotonic() - t0) / len(seeds)
                shape = (job.width, job.height, len(seeds))
                compiling = " (including torch.compile)" \
                    if gen.compile and shape not in compiled else ""
                compiled.add(shape)
                together = scene_table(job, seeds)  # the seeds denoised together (--from)
                for index, (out, image) in enumerate(zip(todo, images, strict=True)):
                    # Another generate on this folder (a second job) may have written under
                    # the planned name while this one rendered: choose it again, under a lock
                    # of the folder that each writer holds from that choice to its last file.
                    with held_lock(folder):
                        stem = _plan_output(folder, job, out.seed,
                                            job.seeds[first:first + batch], base, controlnet,
                                            made).stem
                        record = sidecar(job, out.seed, base, controlnet, out.parameters,
                                         folder / f"{stem}.png", folder / f"{stem}.pose.png",
                                         seconds, str(device), chosen.name, len(seeds), made)
                        path = _write_outputs(folder, stem, image, out.pose, out.parameters,
                                              record, settings.file_mode,
                                              regions[index].image() if regions else None,
                                              together)
                    written.append(path)
                    loras = ", ".join(f"{u.lora.name}:{u.weight:g}" for u in job.all_loras) \
                        or "none"
                    echo(f"[{len(written)}/{total}] {path} ({job.width}x{job.height}, "
                         f"{job.steps} steps, {job.sampler}, seed {out.seed}, LoRA {loras}, "
                         f"{seconds:.1f} s){compiling}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    echo(f"newest image also at {folder / (FINAL_NAME + '.png')}")
    return written
