"""`loraforge dataset check`: scan, explain every problem, then print what training will see.

Fast on purpose: no torch here, only Pillow. Warnings go to stderr as `warning: ...`; the summary
(a table, or JSON with `--json`) goes to stdout.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from loraforge.dataset.curation import curate
from loraforge.dataset.examples import (
    Example,
    batches_per_epoch,
    build_examples,
    repeated_indices,
)
from loraforge.dataset.scan import (
    Concept,
    Dataset,
    DatasetError,
    display_path,
    move_command,
    scan_dataset,
)
from loraforge.errors import ForgeError

if TYPE_CHECKING:
    from loraforge.config import Settings

#: "images x repeats between 200 and 400" per concept: the community rule of thumb.
IMAGES_X_REPEATS_RANGE = (200, 400)
#: More total steps than this is almost always a typo in repeats or epochs.
MAX_SENSIBLE_STEPS = 10_000
TOP_TAGS = 10


def _repeats_advice(concept: Concept, is_reg: bool) -> str | None:
    if is_reg:  # regularisation images are balanced against the trained ones, not this rule
        return None
    low, high = IMAGES_X_REPEATS_RANGE
    n, total = concept.num_images, concept.images_x_repeats
    if n == 0 or low <= total <= high:
        return None
    side = "below" if total < low else "above"
    head = (f"{concept.name}: {n} images x {concept.repeats} repeats = {total}, {side} the "
            f"{low}-{high} the community aims for")
    if n > high:
        return f"{head}; even 1 repeat gives {n}: fine for a large concept, or train fewer epochs"
    first, last = math.ceil(low / n), high // n
    best = min(max(round((low + high) / 2 / n), first), last)
    renamed = concept.folder.with_name(f"{best}_{concept.name}")
    span = f"only {first} lands" if first == last else f"any of {first} to {last} lands"
    return (f"{head}; {best} repeats would give {best * n} ({span} in range): "
            f"{move_command(concept.folder, renamed)}")


def _split_repeats_advice(folders: list[Concept]) -> str | None:
    """The rule of thumb for a concept trained from several folders (`5_blake` beside
    `10_blake`): it counts their images x repeats together. No rename is offered: renaming
    each folder to one name would move the second into the first."""
    low, high = IMAGES_X_REPEATS_RANGE
    total = sum(c.images_x_repeats for c in folders)
    if low <= total <= high:
        return None
    side = "below" if total < low else "above"
    parts = " + ".join(f"{c.folder_name} {c.num_images} x {c.repeats}" for c in folders)
    return (f"{folders[0].name}: {len(folders)} folders together give {parts} = {total} "
            f"images x repeats, {side} the {low}-{high} the community aims for; change their "
            "repeats (the number before `_` in each name) until the sum lands in range, or "
            "merge them into one folder")


def _caption_advice(concept: Concept) -> str | None:
    missing = concept.num_images - concept.captioned
    if concept.captioned == 0 or missing == 0:
        return None
    return (f"{concept.name}: {missing} of {concept.num_images} images have no caption and train "
            f"on '{concept.name}' alone; caption them all or none")


def summarize(dataset: Dataset, batch_size: int, epochs: int, max_steps: int | None = None,
              examples: list[Example] | None = None, processes: int = 1) -> dict[str, Any]:
    """Everything the check prints, as JSON-able data. `batch_size` is the global batch (that
    of all `processes` together). With `examples` (their aspect buckets), each concept lists
    its bucket counts and steps count single-bucket batches, as training does."""
    concepts = []
    advice: list[str] = []
    for concept in dataset.concepts:
        own = [e for e in examples or []
               if e.path.parent == concept.folder]  # two folders may share a name
        buckets = Counter(f"{e.bucket[0]}x{e.bucket[1]}" for e in own)
        is_reg = any(e.is_reg for e in own)
        concepts.append({
            "buckets": dict(sorted(buckets.items())),
            "is_reg": is_reg,
            "name": concept.name,
            "folder": concept.folder_name,
            "images": concept.num_images,
            "captioned": concept.captioned,
            "repeats": concept.repeats,
            "images_x_repeats": concept.images_x_repeats,
            "top_tags": [{"tag": tag, "count": count}
                         for tag, count in concept.top_tags(TOP_TAGS)],
        })
        folders = [c for c in dataset.concepts if c.name == concept.name]
        repeats = None
        if len(folders) == 1:
            repeats = _repeats_advice(concept, is_reg)
        elif concept is folders[0] and not is_reg:  # said once, for all its folders
            repeats = _split_repeats_advice(folders)
        advice.extend(a for a in (repeats, _caption_advice(concept)) if a)
    total = dataset.images_x_repeats
    steps_per_epoch = (math.ceil(total / batch_size) if examples is None else
                       batches_per_epoch(examples, repeated_indices(dataset), batch_size))
    total_steps = max_steps if max_steps is not None else epochs * steps_per_epoch
    if total_steps > MAX_SENSIBLE_STEPS:
        advice.append(f"{total_steps} total steps is probably a mistake (the community pre-flight "
                      f"refuses more than {MAX_SENSIBLE_STEPS:,}): lower the repeats or "
                      "train.epochs, or set train.max_steps")
    return {
        "dataset": str(dataset.root),
        "concepts": concepts,
        "totals": {
            "concepts": len({c["name"] for c in concepts}),  # two folders may share one
            "images": dataset.num_images,
            "captioned": sum(c["captioned"] for c in concepts),
            "images_x_repeats": total,
            "batch_size": batch_size,
            "processes": processes,
            "epochs": epochs,
            "max_steps": max_steps,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
        },
        "advice": advice,
        "warnings": list(dataset.warnings),
    }


def print_warnings(warnings: list[str], console: Console | None = None) -> None:
    err = console or Console(stderr=True)
    for warning in warnings:
        err.print(Text.assemble(("warning: ", "yellow"), warning), soft_wrap=True)


def print_summary(summary: dict[str, Any], console: Console) -> None:
    title = f"dataset {display_path(Path(summary['dataset']))}"
    table = Table(title=title, title_justify="left")
    table.add_column("concept", overflow="fold")
    table.add_column("folder", overflow="fold")
    for name in ("images", "captioned", "repeats", "images x repeats"):
        table.add_column(name, justify="right")
    for c in summary["concepts"]:
        table.add_row(c["name"] + (" (reg)" if c["is_reg"] else ""), c["folder"],
                      str(c["images"]), str(c["captioned"]),
                      str(c["repeats"]), str(c["images_x_repeats"]))
    console.print(table)
    for c in summary["concepts"]:
        if c["is_reg"]:
            console.print(Text(f"{c['name']} is a regularisation concept (is_reg): trained "
                               "with loss weight train.prior_loss_weight, no repeats advice"),
                          soft_wrap=True)
        tags = ", ".join(f"{t['tag']} ({t['count']})" for t in c["top_tags"])
        console.print(Text(f"top tags of {c['name']}: {tags}"), soft_wrap=True)
        if c["buckets"]:
            buckets = ", ".join(f"{size} ({n})" for size, n in c["buckets"].items())
            console.print(Text(f"buckets of {c['name']}: {buckets}"), soft_wrap=True)
    t = summary["totals"]
    lines = [f"total: {t['concepts']} concepts, {t['images']} images, "
             f"{t['images_x_repeats']} images x repeats",
             f"batch size {t['batch_size']}{_split(t)}: {t['steps_per_epoch']} steps per epoch"]
    if t["max_steps"] is not None:
        epochs = t["max_steps"] / max(t["steps_per_epoch"], 1)
        lines.append(f"train.max_steps: {t['total_steps']} total steps (about {epochs:.1f} "
                     "epochs)")
    else:
        lines.append(f"{t['epochs']} epochs: {t['total_steps']} total steps")
    for line in lines:
        console.print(Text(line), soft_wrap=True)
    for line in summary["advice"]:
        console.print(Text.assemble(("advice: ", "cyan"), line), soft_wrap=True)


def _split(totals: dict[str, Any]) -> str:
    processes = totals["processes"]
    if processes == 1:
        return ""
    return f" ({totals['batch_size'] // processes} per process x {processes} processes)"


def _problems(exc: ForgeError) -> list[dict[str, str | None]]:
    """The scan's problems, each with its file (as the user would type it) and its fix."""
    if not isinstance(exc, DatasetError):
        return [{"path": str(exc.path) if exc.path else None, "message": exc.message,
                 "fix": exc.fix}]
    return [{"path": str(display_path(p.path)), "message": p.message, "fix": p.fix}
            for p in exc.problems]


def check_dataset(settings: Settings, as_json: bool, console: Console, processes: int = 1,
                  ) -> None:
    """Scan the configured dataset; print warnings on stderr and the summary on stdout. Steps
    count the global batch: train.batch_size on each of `processes` training processes."""
    try:
        dataset = scan_dataset(settings.dataset_dir, settings.config.dataset.caption_extension)
    except ForgeError as exc:
        warned = exc.warnings if isinstance(exc, DatasetError) else []
        print_warnings(warned)
        if as_json:  # a pre-flight script reads the problems too, not only the exit code
            console.out(json.dumps({"problems": _problems(exc), "warnings": warned}, indent=2),
                        highlight=False)
        raise
    print_warnings(dataset.warnings)
    train = settings.config.train
    warnings: list[str] = []
    examples = build_examples(dataset, settings.config.dataset, warnings.append)
    print_warnings(warnings)
    summary = summarize(dataset, train.batch_size * processes, train.epochs, train.max_steps,
                        examples, processes)
    curation = curate(dataset, settings.config.dataset.caption_extension, regularisation=frozenset(
        c["name"] for c in summary["concepts"] if c["is_reg"]))
    print_warnings(curation.warnings)
    # a concept of two folders is said once (its folders' tags are advised on alike)
    summary["advice"] = list(dict.fromkeys(summary["advice"] + curation.advice))
    summary["totals"]["near_duplicates"] = curation.near_duplicates
    if as_json:
        console.out(json.dumps(summary, indent=2), highlight=False)
    else:
        print_summary(summary, console)
