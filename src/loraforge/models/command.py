"""`loraforge models ...`: fetch, import, list, verify, tiny. Thin: parse, then call into
loraforge.models. Only typer, rich and pathlib at the top; the work is imported inside each command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from loraforge.fsutil import storage_umask
from loraforge.options import ConfigOpt, JsonOpt, SetOpt

if TYPE_CHECKING:
    from loraforge.config import Settings

models_app = typer.Typer(help="Models under the storage root: fetch (online), import a "
                         "single-file checkpoint (offline), list, verify.", no_args_is_help=True)


out = Console(soft_wrap=True, highlight=False)


def _say(line: str) -> None:
    out.print(line, markup=False)


def _warn(line: str) -> None:
    typer.echo(f"warning: {line}", err=True)


def _settings(config: Path | None, overrides: list[str] | None) -> Settings:
    from loraforge.config import load_settings

    return load_settings(config, overrides or [])


@models_app.command("fetch")
def fetch_command(
    which: Annotated[str, typer.Argument(
        help="anylora (base model -> AnyLoRA/), controlnet-openpose (-> controlnet-model/), "
             "openpose-detector (-> controlnet-detector/), all (these three), tagger "
             "(-> wd-tagger/, for `dataset tag`), or tagger-gpu (the GPU build of onnxruntime "
             "-> runtimes/onnxruntime-gpu/, so that `dataset tag` runs on a GPU).")] = "all",
    revision: Annotated[str | None, typer.Option(
        "--revision", help="Branch, tag or commit of the model's Hub repository (default: "
        "main); the commit it resolves to is recorded in manifest.json.")] = None,
    full_precision: Annotated[bool, typer.Option(
        "--full-precision", help="Download the fp32 weights instead of the fp16 variant "
        "(twice the size; training and rendering cast to their own precision anyway).")] = False,
    cuda: Annotated[str | None, typer.Option(
        "--cuda", metavar="12|13", help="tagger-gpu only: the CUDA major version of the GPU "
        "nodes (default: that of this environment's torch, else 13).")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Download models from the Hugging Face Hub into the storage root (login node, online).

    Resumable: rerun the same command after an interruption. A token is read from HF_TOKEN or
    the file `hf auth login` writes; it is never printed or stored.
    """
    from loraforge.models.fetch import fetch_models

    settings = _settings(config, overrides)
    with storage_umask(settings.file_mode):  # the download cache is shared like the models
        fetch_models(settings.storage_root, which, revision, full_precision, _say,
                     settings.file_mode, cuda)


@models_app.command("import")
def import_command(
    file: Annotated[Path, typer.Argument(help="SD 1.x single-file checkpoint: .safetensors "
                                         "(or .ckpt, opened with weights_only=True only).")],
    kind: Annotated[str, typer.Option("--as", help="base (a model to train on) or controlnet.")],
    name: Annotated[str | None, typer.Option(
        "--name", help="Folder name under the storage root (default: the file's stem).")] = None,
    vae: Annotated[Path | None, typer.Option(
        "--vae", metavar="FILE",
        help="Single-file VAE for a checkpoint without one (\"noVAE\"), or to replace "
        "its own, e.g. vae-ft-mse-840000-ema-pruned.safetensors.")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Convert a Civitai / A1111 checkpoint to a diffusers model folder, offline."""
    from loraforge.models.importer import import_checkpoint

    settings = _settings(config, overrides)
    with storage_umask(settings.file_mode):  # its lock files too
        import_checkpoint(settings.storage_root, file, kind.lower(), name, vae, _say,
                          settings.file_mode)


@models_app.command("list")
def list_command(config: ConfigOpt = None, overrides: SetOpt = None,
                 as_json: JsonOpt = False) -> None:
    """The model folders under the storage root: name, kind, size, A1111 hash, source."""
    from loraforge.config import outside_project_note
    from loraforge.models import gpu_runtime
    from loraforge.models.fetch import human_size
    from loraforge.models.manifest import scan_models

    settings = _settings(config, overrides)
    entries = scan_models(settings.listed_storage_root("models"), _warn, settings.cache_dir)
    for entry in entries:
        if entry.warning:
            _warn(entry.warning)
    if as_json:
        out.print_json(json.dumps([e.to_dict() for e in entries]))
        return
    runtime = gpu_runtime.describe(settings.storage_root)
    if runtime:
        _say(runtime)
    if not entries:
        _say(f"no models under {settings.storage_root}; get one with `loraforge models fetch` "
             "(online) or `loraforge models import FILE --as base` (offline)")
        if settings.source is None:
            typer.echo(outside_project_note(), err=True)
        return
    rows = [("NAME", "KIND", "SIZE", "HASH", "SOURCE")]
    rows += [(e.name, e.kind, human_size(e.size), e.short_hash or "-", e.source) for e in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        _say("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[4]]))


@models_app.command("verify")
def verify_command(
    name: Annotated[str | None, typer.Argument(help="Model folder name or path (default: "
                                               "every model under the storage root).")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Re-hash model files against their manifest.json; exit 1 if any is missing or changed."""
    from loraforge.errors import ForgeError
    from loraforge.models.manifest import (
        model_folders,
        model_kind,
        read_manifest,
        unreadable,
        verify_folder,
    )
    from loraforge.models.tiny import tiny_folders
    from loraforge.models.tiny_detector import tiny_detector_folder

    settings = _settings(config, overrides)
    if name is not None:
        folder = settings.model_dir(name)
        typed = Path(name).expanduser()  # a checkpoint file's path, as typed
        if folder.is_file() or (not folder.exists() and typed.is_file()):
            file = folder if folder.is_file() else typed
            raise ForgeError("is a file, not a model folder: verify checks a model installed "
                             "under the storage root against its manifest", path=file,
                             fix=f"import it first (`loraforge models import {file} --as "
                                 "base` or `--as controlnet`), then verify the folder it makes")
        if not folder.is_dir():
            raise ForgeError("model not found", path=folder,
                             fix="`loraforge models list` shows the models there are")
        try:
            kind = model_kind(folder, None)
        except OSError as exc:
            raise unreadable(folder, exc) from None
        if read_manifest(folder) is None and kind is None:
            raise ForgeError("is not a model folder (no diffusers model, ControlNet, pose "
                             "detector or tagger in it, and no manifest.json)", path=folder,
                             fix="name a model folder; `loraforge models list` shows the models "
                                 "there are")
        targets = [folder]
    else:
        targets = model_folders(settings.listed_storage_root("models"), _warn)
        if not targets:
            _say(f"no models under {settings.storage_root}")
            return
    failed = 0
    tiny_damaged = []
    for folder in targets:
        result = verify_folder(folder)
        status = "ok" if result.ok else "DAMAGED"
        counted = f" ({result.checked} files re-hashed)" if result.checked else ""
        _say(f"{result.name}: {status}{counted}")
        for rel in result.missing:
            _say(f"  missing: {rel}")
        for rel in result.changed:
            _say(f"  changed: {rel}")
        for problem in result.problems:
            _say(f"  problem: {problem}")
        for rel in result.extra:
            _say(f"  not in the manifest (ignored): {rel}")
        if result.note:
            _say(f"  note: {result.note}")
        failed += not result.ok
        if not result.ok and folder in (*tiny_folders(settings.storage_root),
                                        tiny_detector_folder(settings.storage_root)):
            tiny_damaged.append(folder)
    if tiny_damaged:
        _say(f"the embedded tiny model is damaged: delete {' and '.join(map(str, tiny_damaged))}"
             " and run `loraforge models tiny` to build it again")
    if failed > len(tiny_damaged):
        _say(f"{failed - len(tiny_damaged)} model(s) damaged: move each aside and fetch or "
             "import it again (`loraforge models fetch ...` / `loraforge models import ...`)")
    if failed:
        raise typer.Exit(1)


@models_app.command("tiny")
def tiny_command(config: ConfigOpt = None, overrides: SetOpt = None) -> None:
    """Build the embedded tiny SD1.5-shaped model, its ControlNet and the tiny pose detector
    (random weights) under the storage root."""
    from loraforge.models.tiny import ensure_tiny_models
    from loraforge.models.tiny_detector import ensure_tiny_detector

    root = _settings(config, overrides).storage_root
    base, controlnet = ensure_tiny_models(root)
    detector = ensure_tiny_detector(root)
    _say(f"tiny base model: {base}\ntiny ControlNet: {controlnet}\ntiny pose detector: "
         f"{detector}")
