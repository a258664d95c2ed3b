"""A project folder: `loraforge init` writes it, `loraforge config show` describes it."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.console import Console

from loraforge.config import CONFIG_NAME, TINY, ForgeConfig, Settings, SlurmConfig
from loraforge.errors import ForgeError
from loraforge.fsutil import write_atomic
from loraforge.models.tagger import TINY_NAME as TAGGER_TINY_NAME
from loraforge.models.tiny import tiny_folders
from loraforge.models.tiny_detector import tiny_detector_folder

HEADER = """\
# LoRA Forge configuration. Every key below shows its value (the default unless `loraforge init`
# chose another, e.g. for --tiny or this machine's environment); delete a key to use the default.
# Relative paths resolve against this file's folder. LORAFORGE_STORAGE_ROOT overrides storage.root.
# Command-line flags override this file: loraforge train --set train.epochs=5
# See the resolved values with: loraforge config show
"""

DEFAULT_ACTIVATE: str = SlurmConfig.model_fields["env_activate"].default

# What `init --tiny` changes so a laptop or CI machine can train and render in seconds.
TINY_VALUES: dict[str, dict[str, Any]] = {
    "models": {"base": TINY, "controlnet": TINY, "tagger": TINY, "detector": TINY},
    "dataset": {"resolution": 64},
    "train": {"epochs": 4, "batch_size": 4, "optimizer": "AdamW", "unet_lr": 1e-3,
              "text_encoder_lr": 5e-4, "mixed_precision": "no"},
    "generate": {"width": 128, "height": 96, "steps": 8},
}

#: How to get what `init --tiny` chooses into a forge.toml that init keeps.
_TINY_MODELS = list(TINY_VALUES["models"])
TINY_FIX = (f"set {', '.join(_TINY_MODELS[:-1])} and {_TINY_MODELS[-1]} to \"{TINY}\" in its "
            "[models] section (and the small sizes of `loraforge init --tiny`, e.g. [dataset] "
            f"resolution = {TINY_VALUES['dataset']['resolution']}), or move it away and run "
            "`loraforge init --tiny` again")

DATASET_README = """\
# master_dataset

One folder per concept (character), named `<repeats>_<name>`:

    master_dataset/
      10_blake_character/
        001.png
        001.txt      optional caption: comma-separated tags, activation tag first
      10_mira_character/
        ...

- `<repeats>`: how often each image is seen per epoch. Aim for images x repeats between 200 and 400.
- Images: png, jpg, jpeg, webp, bmp. A folder without captions trains on its name.
- No captions yet? `loraforge dataset tag` writes them (name first, yours are kept);
  `loraforge dataset tags` shows and edits them, `loraforge dataset dedupe` finds near-duplicates.
- Check it before spending GPU time: `loraforge dataset check`
"""


#: A key TOML reads without quotes.
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_key(key: str) -> str:
    """`key` as TOML reads it back: bare where it may be, else quoted (a concept named
    `blake v2`; `mira.alt`, which bare would be a table `mira` holding `alt`)."""
    return key if _BARE_KEY.fullmatch(key) else toml_string(key)


def toml_string(text: str) -> str:
    """A TOML string: JSON's, without its escapes of a character beyond U+FFFF (an emoji as
    "\\ud83d\\udde1", which TOML refuses), and with DEL escaped (TOML asks that)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return toml_string(value)
    return json.dumps(value)


def render_config(values: dict[str, dict[str, Any]] | None = None) -> str:
    """The commented forge.toml: every section and key, its help text, its default or value.
    Per-concept overrides (`dataset.concepts`) become `[dataset.concepts.<name>]` tables."""
    values = values or {}
    lines = [HEADER]
    for section, field in ForgeConfig.model_fields.items():
        model: type[BaseModel] = field.annotation  # type: ignore[assignment]
        lines.append(f"[{section}]")
        tables: list[str] = []
        for key, spec in model.model_fields.items():
            if spec.description:
                lines.append(f"# {spec.description}")
            value = values.get(section, {}).get(key, spec.get_default(call_default_factory=True))
            if key == "concepts":
                for name, overrides in value.items():
                    tables += ["", f"[{section}.{key}.{toml_key(name)}]"]
                    tables += [f"{k} = {toml_value(v)}" for k, v in overrides.items()
                               if v is not None]
            elif value is None:
                lines.append(f"# {key} =")
            else:
                lines.append(f"{key} = {toml_value(value)}")
        lines += [*tables, ""]
    return "\n".join(lines)


def init_project(directory: Path, *, tiny: bool = False, scripts: bool = False) -> list[str]:
    """Write forge.toml, master_dataset/README.md and the two SLURM job scripts into `directory`
    (plus logs/ for their output); never overwrite a file. `scripts`: write again the job
    scripts that no longer ask what forge.toml [slurm] asks (the old ones kept as .bak)."""
    from loraforge.slurm.script import LOG_DIR

    if directory.exists() and not directory.is_dir():
        raise ForgeError("exists and is not a folder", path=directory,
                         fix="choose another project folder")
    if directory.is_symlink() and not directory.exists():
        raise ForgeError(f"is a broken symbolic link (to {os.readlink(directory)}, which does "
                         "not exist)", path=directory,
                         fix="create the folder it points to, or remove the link and run "
                             "`loraforge init` again")
    config = directory / CONFIG_NAME
    if config.is_symlink() and not config.exists():  # the user's config, not to be replaced
        raise ForgeError(f"is a broken symbolic link (to {os.readlink(config)}, which does not "
                         "exist)", path=config,
                         fix="restore the file it points to, or remove the link and run "
                             "`loraforge init` again")
    for name in ("master_dataset", LOG_DIR):  # checked before anything is written
        if (directory / name).exists() and not (directory / name).is_dir():
            raise ForgeError(f"is a file where the project's {name}/ folder goes",
                             path=directory / name,
                             fix="move that file away, then run `loraforge init` again")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ForgeError(f"cannot create the project folder ({exc.strerror or exc})",
                         path=directory,
                         fix="choose a folder you can write to, whose parents are folders"
                         ) from None
    said = []
    if config.exists():
        said.append(f"kept      {config} (already exists; not overwritten)")
        if tiny and not _uses_tiny(config):
            said.append(f"          --tiny was not applied to it: {TINY_FIX}")
    else:
        values = {section: dict(keys) for section, keys in TINY_VALUES.items()} if tiny else {}
        activate = _environment_activate(directory)
        if activate is not None:
            values.setdefault("slurm", {})["env_activate"] = activate
        write_atomic(config, render_config(values))
        said.append(f"wrote     {config}")
        if activate is not None:
            said.append(f"          slurm.env_activate = {activate} (the environment that "
                        "ran init; the job scripts activate it)")
    readme = directory / "master_dataset" / "README.md"
    if _present(readme):
        said.append(f"kept      {readme}")
    else:
        write_atomic(readme, DATASET_README)
        said.append(f"wrote     {readme}")
    said += _write_job_scripts(directory, config, scripts)
    said.append("next: put images in master_dataset/<repeats>_<name>/, then `loraforge dataset "
                "check`")
    return said



def _uses_tiny(config: Path) -> bool:
    """Whether a kept forge.toml already names the tiny models (a rerun of `init --tiny`, or of
    the demo); one that cannot be read gets the note (its commands will say what is wrong)."""
    from loraforge.config import load_settings

    try:
        models = load_settings(config).config.models
    except ForgeError:
        return False
    return all(getattr(models, key) == TINY for key in _TINY_MODELS)


def _present(path: Path) -> bool:
    """Whether `path` is taken, by a file or a symbolic link (one to nothing too): init
    writes no file there."""
    return path.exists() or path.is_symlink()


def _environment_activate(directory: Path) -> str | None:
    """The environment a new project's jobs must activate, when the default (`lora_env/` in
    the project folder) is not there: the virtual environment running `init`, by its absolute
    path. None keeps the default."""
    if (directory / DEFAULT_ACTIVATE).is_file() or sys.prefix == sys.base_prefix:
        return None
    script = Path(sys.prefix) / "bin" / "activate"
    return str(script) if script.is_file() else None


def _write_job_scripts(directory: Path, config: Path, rewrite: bool = False) -> list[str]:
    """submit_training.ssub and submit_inference.ssub from the project's [slurm] section, and the
    logs/ folder their output goes to. An existing script is kept as it is; one that no longer
    asks what [slurm] asks is said so, and with `rewrite` written again, the old one kept as
    NAME.bak (NAME.bak.2, ... when that is taken)."""
    from loraforge.config import load_settings
    from loraforge.slurm.script import LOG_DIR, project_scripts, script_drift

    settings = load_settings(config)
    drift = script_drift(settings)
    said = []
    for name, text in project_scripts(settings).items():
        path = directory / name
        if _present(path) and name in drift and rewrite:
            backup = _free_name(path.with_name(f"{name}.bak"))
            path.rename(backup)
            write_atomic(path, text, 0o755)
            said.append(f"rewrote   {path} from [slurm] (the old one: {backup.name})")
        elif _present(path) and name in drift:
            more = " ..." if len(drift[name]) > 3 else ""
            said.append(f"kept      {path} (it no longer asks what [slurm] asks: "
                        f"{', '.join(drift[name][:3])}{more}; `loraforge init --scripts` "
                        "writes it again)")
        elif _present(path):
            said.append(f"kept      {path}")
        else:
            write_atomic(path, text, 0o755)
            said.append(f"wrote     {path}")
    (directory / LOG_DIR).mkdir(exist_ok=True)
    return said


def _free_name(path: Path) -> Path:
    """`path`, or `path.2`, `path.3`, ... : the first that does not exist."""
    candidate, number = path, 1
    while candidate.exists() or candidate.is_symlink():
        number += 1
        candidate = path.with_name(f"{path.name}.{number}")
    return candidate


def _model_path(settings: Settings, name: str, which: int) -> Path:
    """Where a configured model lives (`tiny`: folder `which` of `tiny_folders`)."""
    return tiny_folders(settings.storage_root)[which] if name == TINY \
        else settings.model_dir(name)


def resolved_paths(settings: Settings) -> dict[str, str]:
    return {
        "config": str(settings.source) if settings.source else "(none: built-in defaults)",
        "storage_root": str(settings.storage_root),
        "dataset": str(settings.dataset_dir),
        "runs": str(settings.runs_dir),
        "images": str(settings.images_dir),
        "cache": str(settings.cache_dir),
        "base_model": str(_model_path(settings, settings.config.models.base, 0)),
        "controlnet": str(_model_path(settings, settings.config.models.controlnet, 1)),
        "tagger": str(settings.storage_root / TAGGER_TINY_NAME
                      if settings.config.models.tagger == TINY
                      else settings.model_dir(settings.config.models.tagger)),
        "detector": str(tiny_detector_folder(settings.storage_root)
                        if settings.config.models.detector == TINY
                        else settings.model_dir(settings.config.models.detector)),
    }


def show_config(settings: Settings, as_json: bool, console: Console) -> None:
    paths = resolved_paths(settings)
    if as_json:
        console.print_json(json.dumps({"paths": paths, "config": settings.to_dict()}))
        return
    for name, value in paths.items():
        console.print(f"# {name}: {value}", highlight=False, markup=False)
    values = settings.to_dict()
    body = render_config(values).removeprefix(HEADER)
    console.print(body, highlight=False, markup=False)
