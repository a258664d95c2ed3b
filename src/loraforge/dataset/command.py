"""`loraforge dataset tag|tags|dedupe`: the dataset maker. Thin: parse, then call into
loraforge.dataset. Only typer, rich and pathlib at the top; the work is imported inside each
command (onnxruntime and numpy only where a model runs or pictures are hashed)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from loraforge.errors import ForgeError
from loraforge.options import ConfigOpt, SetOpt, probability

if TYPE_CHECKING:
    from loraforge.config import Settings
    from loraforge.dataset.dedupe import Step

out = Console(soft_wrap=True, highlight=False)
ConceptsArg = Annotated[list[str] | None, typer.Argument(
    help="Concepts (name or folder name; default: every concept).", show_default=False)]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show the diff of every caption "
                                         "that would change; write nothing.")]


class TagDevice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def _say(line: str) -> None:
    out.print(Text(line), soft_wrap=True)


def _warn(warnings: list[str]) -> None:
    from loraforge.dataset.check import print_warnings

    print_warnings(warnings)


def _settings(config: Path | None, overrides: list[str] | None) -> Settings:
    from loraforge.config import load_settings

    return load_settings(config, overrides or [])


def tag_command(
    concepts: ConceptsArg = None,
    threshold: Annotated[float, typer.Option("--threshold", callback=probability, help="Lowest "
                         "probability for a general tag (0 to 1).")] = 0.35,
    character_threshold: Annotated[float, typer.Option(
        "--character-threshold", callback=probability, help="Lowest probability for a "
        "character tag (0 to 1).")] = 0.85,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing captions "
                         "(the old ones are backed up first).")] = False,
    append: Annotated[bool, typer.Option("--append", help="Add the tags existing captions "
                      "lack, at their end.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=256, help="Images per "
                          "model call.")] = 8,
    device: Annotated[TagDevice, typer.Option(
        "--device", help="auto: the GPU when one is visible and `models fetch tagger-gpu` "
        "installed the GPU build of onnxruntime, else the CPU (with a note); cuda: the GPU or "
        "an error; cpu.")
        ] = TagDevice.auto,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Caption images with the WD14 tagger (models.tagger), trigger first.

    By default only images without a caption are tagged: hand-written captions are kept.
    """
    from loraforge.dataset.tagger import report_lines, tag_dataset
    from loraforge.submitted import load_job_settings

    if overwrite and append:
        raise ForgeError("--overwrite and --append exclude each other",
                         fix="--append adds tags to existing captions; --overwrite replaces "
                             "them (with a backup): choose one")
    mode = "overwrite" if overwrite else "append" if append else "missing"
    settings, edited = load_job_settings(config, overrides or [])
    if edited:  # in a job: forge.toml was edited since its submission
        Console(stderr=True, soft_wrap=True, highlight=False).print(Text(edited))
    result = tag_dataset(settings, concepts, threshold, character_threshold, mode, batch_size,
                         _say, device=device.value)
    _warn(result.warnings)
    for line in report_lines(result, mode):
        _say(line)
    skipped = sum(r.skipped for r in result.reports.values())
    if skipped and not result.images:
        raise ForgeError(f"none of the {skipped} picture(s) to tag could be read: no caption "
                         "was written", fix="replace or remove the files the warnings above "
                                            "name, then run `loraforge dataset tag` again")


def tags_command(
    concepts: ConceptsArg = None,
    remove: Annotated[list[str] | None, typer.Option("--remove", help="Tags to remove, "
                      'comma-separated: "solo,simple background" (repeatable).')] = None,
    replace: Annotated[list[str] | None, typer.Option("--replace", help="Tags to replace, "
                       'OLD=NEW, comma-separated: "1girl=1woman" (repeatable).')] = None,
    add_trigger: Annotated[bool, typer.Option("--add-trigger", help="Put the trigger (the "
                           "concept name) first in every caption that lacks it there.")
                           ] = False,
    dry_run: DryRunOpt = False,
    top: Annotated[int, typer.Option("--top", min=0, help="Tags shown per concept (0: all)."
                                     )] = 50,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON: the tag frequencies; "
                       "with an edit (instead of its diff), the counts, the backup folder, the "
                       "notes and each caption changed (with --dry-run: that would change) "
                       "with its old and new text.")] = False,
) -> None:
    """Tag frequencies per concept; or bulk edits of the captions (--remove, --replace,
    --add-trigger), with --dry-run to see the diff first and a backup of each changed caption.
    """
    from loraforge.dataset import tag_list

    settings = _settings(config, overrides)
    edits = tag_list.parse_edits(remove, replace, add_trigger)
    chosen, captions, warnings = tag_list.load(settings.dataset_dir, concepts,
                                               settings.config.dataset.caption_extension)
    _warn(warnings)
    notes: list[str] = []

    def note(line: str) -> None:  # with --json: in the JSON, and on stderr (stdout is JSON)
        if as_json:
            notes.append(line)
            Console(stderr=True, soft_wrap=True, highlight=False).print(Text(line))
        else:
            _say(line)

    for trigger in tag_list.trigger_edits(edits, chosen):
        note(f"note: {trigger!r} is a concept's trigger, which its captions keep: not removed "
             "or replaced (rename the concept folder to change a trigger)")
    if not edits:
        table = tag_list.frequencies(chosen, captions)
        if as_json:
            out.out(json.dumps(table, indent=2), highlight=False)
        else:
            _print_frequencies(table, top)
        return
    result = tag_list.edit_captions(settings.dataset_dir, captions, edits, dry_run,
                                    settings.file_mode, concepts, note)
    if as_json:
        out.out(json.dumps(result.to_dict(dry_run, notes), indent=2), highlight=False)
        return
    for line in result.diff:
        style = "green" if line.startswith("+") else "red" if line.startswith("-") else None
        out.print(Text(line, style=style or ""), soft_wrap=True)
    _warn([f"{_shown(path)}: edited while this edit ran; left as it is (run the edit again "
           "to edit it too)" for path in result.changed_meanwhile])
    files = f"{len(result.changed)} caption(s)"
    if dry_run:
        _say(f"dry run: {files} would change; nothing was written")
    elif result.backup_dir is not None:
        before = f" (and {result.already_done} before it stopped)" if result.resumed else ""
        _say(f"changed {files}{before}; the old ones are in {_shown(result.backup_dir)}/ "
             "(copy them back to undo)")
    elif result.changed or result.resumed:
        _say(f"changed {files}")
    else:
        _say("no caption changes")


def _shown(path: Path | None) -> str:
    from loraforge.dataset.scan import display_path

    return str(display_path(path)) if path is not None else "-"


def _print_frequencies(table: list[dict[str, object]], top: int) -> None:
    for concept in table:
        tags = list(concept["tags"])  # type: ignore[call-overload]
        captioned = int(concept["captioned"])  # type: ignore[call-overload]
        grid = Table(title=f"{concept['concept']} ({concept['folder']}): {captioned} of "
                     f"{concept['images']} images captioned", title_justify="left")
        grid.add_column("tag", overflow="fold")
        grid.add_column("images", justify="right")
        grid.add_column("share", justify="right")
        for entry in tags[:top or None]:
            grid.add_row(entry["tag"], str(entry["count"]),
                         f"{100 * entry['count'] / max(captioned, 1):.0f}%")
        out.print(grid)
        if top and len(tags) > top:
            _say(f"({len(tags) - top} more tags: --top 0 shows all)")


def dedupe_command(
    concepts: ConceptsArg = None,
    distance: Annotated[int, typer.Option("--distance", min=0, max=32, help="Most differing "
                        "bits (of 64) between the perceptual hashes of a group's kept picture "
                        "and each of its near-duplicates.")] = 6,
    move: Annotated[bool, typer.Option("--move", help="Move all but the kept picture of each "
                    "group (with captions) into <dataset>/.duplicates/; nothing is "
                    "deleted.")] = False,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Find near-duplicate pictures by perceptual hash and colours, shown as groups: each the
    picture it keeps (the largest) and those near it."""
    from loraforge.dataset.dedupe import (
        COPIED_CAPTIONS,
        DUPLICATES_DIR,
        caption_donor,
        hash_distance,
        hash_pictures,
        left_behind,
        move_extras,
        near_duplicate_groups,
    )
    from loraforge.dataset.folders import concept_folders
    from loraforge.dataset.scan import display_path

    settings = _settings(config, overrides)
    extension = settings.config.dataset.caption_extension
    warnings: list[str] = []
    chosen = concept_folders(settings.dataset_dir, concepts, warnings)
    pictures = hash_pictures(chosen, extension, warnings)
    _warn(warnings)
    groups = near_duplicate_groups(pictures, distance)
    for n, group in enumerate(groups, 1):
        keep = group[0]
        _say(f"group {n}: keep {display_path(keep.path)} ({keep.width}x{keep.height})")
        for other in group[1:]:
            _say(f"  near-duplicate: {display_path(other.path)} ({other.width}x{other.height}, "
                 f"{hash_distance(keep.hash, other.hash)} bits apart)")
        donor = caption_donor(group)
        if donor is not None:
            caption = donor.concept.caption_path(donor.path, extension).name
            _say(f"  {keep.path.name} has no caption: {'it gets' if move else '--move gives it'}"
                 f" a copy of {caption}, {donor.path.name}'s (which goes with its picture; the "
                 f"copy is listed in {DUPLICATES_DIR}/{COPIED_CAPTIONS} for an undo)")
    extras = sum(len(g) - 1 for g in groups)
    _say(f"{len(pictures)} pictures compared: {extras} near-duplicate(s) in {len(groups)} "
         f"group(s) (distance <= {distance})")
    if not move:
        if extras:
            _say(f"to move the extras into {display_path(settings.dataset_dir / DUPLICATES_DIR)}"
                 "/: loraforge dataset dedupe --move")
        return
    for step in left_behind(settings.dataset_dir, chosen, extension):
        _say(_dedupe_step(step, " (its picture was moved by a move that stopped before the "
                                "caption)"))
    for step in move_extras(settings.dataset_dir, groups, extension):
        _say(_dedupe_step(step))


def _dedupe_step(step: Step, why: str = "") -> str:
    """The line `dataset dedupe --move` prints for one file it moved, copied or found gone."""
    from loraforge.dataset.scan import display_path

    if step.done == "gone":
        return (f"skipped {display_path(step.source)}: no longer there (another `dataset dedupe "
                "--move` running at the same time moved it)")
    return f"{step.done} {display_path(step.source)} -> {display_path(step.dest)}{why}"
