"""The config a job was submitted with, not the file as edited since.

A job `loraforge slurm` queues may wait hours, and forge.toml may be edited meanwhile (the next
experiment tuned). The submission keeps a copy of forge.toml as it validated it, under the storage
root's jobs/configs/, and the job script exports where (SUBMITTED_ENV) and which config file it
copies (SUBMITTED_FROM_ENV). `loraforge train`, `generate` and `dataset tag` given that file
(`--config`) then read the copy instead, resolving paths against the project folder as
before, and say what was edited since. Without the variables (a command run by hand) nothing
changes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from loraforge.config import Settings, load_settings, parse_toml, settings_from
from loraforge.errors import ForgeError

#: The copy of the config the job was submitted with (absolute).
SUBMITTED_ENV = "LORAFORGE_SUBMITTED_CONFIG"
#: The config file it is a copy of (absolute): the `--config` the job's commands are given.
SUBMITTED_FROM_ENV = "LORAFORGE_SUBMITTED_FROM"
#: Changed keys listed in the note, at most.
SHOWN = 12


def load_job_settings(path: Path | None, overrides: list[str] | None,
                      ) -> tuple[Settings, str | None]:
    """`load_settings(path, overrides)`, but in a job submitted with a copy of `path`: the
    settings of the copy, with `source` and the folder paths resolve against still the real
    file's. Also a note for the job's log when the file now says something else (None when not,
    and without the copy)."""
    submitted = _submitted(path)
    if submitted is None:
        return load_settings(path, overrides), None
    copy, source = submitted
    try:
        raw = copy.read_bytes()
    except OSError as exc:
        raise ForgeError(f"cannot be read ({exc.strerror}): this job runs with this copy "
                         f"of {source} as it was submitted, not with the file as edited since",
                         path=copy,
                         fix="submit the job again (the same `loraforge slurm` command), which "
                             "keeps a new copy; leave the storage root's jobs/configs/ in place "
                             "while jobs wait in the queue") from None
    return settings_from(raw, source, overrides, read_from=copy), edited_note(source, raw, copy)


def _submitted(path: Path | None) -> tuple[Path, Path] | None:
    """(the copy, the config file it copies) when the job exported them and `path`, its
    `--config`, is that file (the job's commands are given it)."""
    copy = os.environ.get(SUBMITTED_ENV, "")
    source = os.environ.get(SUBMITTED_FROM_ENV, "")
    if not copy or not source or path is None:
        return None
    if path.resolve() != Path(source).resolve():  # another config: not what was submitted
        return None
    return Path(copy), Path(source).resolve()


def edited_note(source: Path, raw: bytes, copy: Path) -> str | None:
    """What the job's log should say when `source` no longer holds what was submitted (`raw`,
    kept in `copy`); None when it holds the same settings (a comment edited is no change)."""
    uses = (f"this job uses the config as it was submitted (kept in {copy}); the edits apply to "
            "the next submission")
    try:
        now = source.read_bytes()
    except FileNotFoundError:
        return f"note: {source} no longer exists; {uses}"
    except OSError as exc:
        return f"note: {source} cannot be read now ({exc.strerror}); {uses}"
    if now == raw:
        return None
    try:
        edited = parse_toml(now, source)
    except ForgeError as exc:
        return f"note: {source} was edited after this job was submitted ({exc.message}); {uses}"
    changes = _changes(_flat(parse_toml(raw, copy)), _flat(edited))
    if not changes:
        return None
    shown = [f"  {line}" for line in changes[:SHOWN]]
    if len(changes) > SHOWN:
        shown.append(f"  ... and {len(changes) - SHOWN} more")
    return "\n".join([f"note: {source} was edited after this job was submitted; {uses}. "
                      "Changed since (as submitted -> now):", *shown])


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"epochs": 3}} -> {"train.epochs": 3}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """One line per key set differently, added or removed: `train.epochs: 3 -> 5`."""
    keys = [*before, *(key for key in after if key not in before)]
    return [f"{key}: {_shown(before, key)} -> {_shown(after, key)}" for key in keys
            if _text(before, key) != _text(after, key)]  # 1 and 1.0, 1 and true differ


def _text(values: dict[str, Any], key: str) -> str | None:
    return json.dumps(values[key], ensure_ascii=False, default=str) if key in values else None


def _shown(values: dict[str, Any], key: str, width: int = 60) -> str:
    text = _text(values, key)
    if text is None:
        return "(not set)"
    return text if len(text) <= width else text[:width - 3] + "..."
