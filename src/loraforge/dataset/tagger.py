"""`loraforge dataset tag`: caption every image with a WD14-family tagger, offline.

Each caption is the concept's trigger (its folder's name) first, then the character tags whose
probability reaches `--character-threshold`, then the general tags reaching `--threshold`, each
group most probable first; rating tags are left out. Tag names become words (`long_hair` ->
`long hair`) except emoticons such as `^_^`, whose underscore is part of the face.

Hand-written captions are never lost. By default only images without a caption (or with an
empty one) are tagged. `--append` adds the tags a caption lacks at its end (and puts the trigger
first); `--overwrite` replaces captions, after copying the old ones to the backup folder (see
`caption_edit`). Reruns change nothing that is already as it would be written, so a job stopped
halfway just runs again: an `--append` or `--overwrite` stopped part-way records itself in its
backup folder, and the same command run again goes on with that folder, so that one folder holds
every caption's text from before the tagging. A caption that is a symlink is written through it
(see `caption_edit`), once however many links reach its file; one that is a loop, or whose target
does not exist, is skipped with a warning, and so is a file that is also the caption of a folder
the command leaves out, or of another concept (a caption starts with one trigger). Another
caption edit is refused while one is unfinished (see `tag_list`): the captions it has not reached
yet would no longer be its originals.

Input preparation follows the model card: the image (EXIF orientation applied, transparency on
white, any colour mode as RGB, see `images.load_image`) is padded to a square with white,
centred, resized to the model's input size with a bicubic filter, and handed over as BGR float32
values 0-255. A picture that cannot be read is skipped with a warning naming it; its caption is
left as it was.

Where: `--device auto` (the default) tags on a GPU when one is visible and the GPU build of
onnxruntime is installed (`models.gpu_runtime`), else on the CPU with a note saying why;
`--device cuda` refuses to fall back (a GPU job); `--device cpu` never tries CUDA.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shlex
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TextIO

from PIL import Image

from loraforge.dataset.caption_edit import (
    CaptionWriter,
    append_tags,
    broken_link,
    caption_file,
    caption_tags,
    put_first,
    read_caption,
    tag_key,
)
from loraforge.dataset.folders import (
    CaptionPath,
    ConceptFolder,
    captions_by_file,
    concept_folders,
    left_out,
    trigger_clash,
)
from loraforge.dataset.images import load_image
from loraforge.dataset.scan import display_path
from loraforge.errors import ForgeError
from loraforge.progress import Progress, duration

if TYPE_CHECKING:
    import numpy as np

    from loraforge.config import Settings
    from loraforge.models.gpu_runtime import Device
    from loraforge.models.tagger import Tag, TaggerModel

Mode = Literal["missing", "append", "overwrite"]
Say = Callable[[str], None]
WHITE = (255, 255, 255)
#: Seconds between progress lines in a log file (a terminal gets a bar).
PROGRESS_EVERY_SECONDS = 15.0


# --- the model card's input preparation and output reading ---------------------------------

#: Pictures longer than this are scaled down before padding (the model sees 448 px anyway).
MAX_PAD_SIDE = 4096


def prepare_image(image: Image.Image, size: int) -> np.ndarray:
    """An RGB image as the tagger's input: padded to a white square (centred; an odd margin
    puts the extra pixel right/bottom), resized to `size` x `size` (bicubic) and returned as
    (size, size, 3) float32 BGR values 0-255."""
    import numpy as np

    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if max(rgb.size) > MAX_PAD_SIDE:  # a long strip: its white square alone would take GBs
        scale = MAX_PAD_SIDE / max(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))),
                         Image.Resampling.BICUBIC)
    side = max(rgb.size)
    square = Image.new("RGB", (side, side), WHITE)
    square.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1]


def tag_text(name: str) -> str:
    """A tag list name as caption text: `_` becomes a space, except in emoticons (no two
    letters in a row: `^_^`, `o_o`, `>_<`), where it is part of the face."""
    letters = any(a.isalpha() and b.isalpha() for a, b in itertools.pairwise(name))
    return name.replace("_", " ") if letters else name


def select_tags(probabilities: np.ndarray, tags: list[Tag], threshold: float,
                character_threshold: float) -> list[str]:
    """Character tags at or above `character_threshold`, then general tags at or above
    `threshold`, each group most probable first (ties: tag list order); no rating tags."""
    import numpy as np

    from loraforge.models.tagger import CHARACTER, GENERAL

    order = np.argsort(-np.asarray(probabilities), kind="stable").tolist()
    characters = [tags[i].name for i in order if tags[i].category == CHARACTER
                  and probabilities[i] >= character_threshold]
    general = [tags[i].name for i in order if tags[i].category == GENERAL
               and probabilities[i] >= threshold]
    return [tag_text(name) for name in characters + general]


def new_caption(trigger: str, old: str | None, tags: list[str], mode: Mode) -> str:
    """The caption `mode` makes of an image's current caption `old` and its predicted tags."""
    if mode == "append" and old is not None and caption_tags(old):
        return put_first(append_tags(old, tags), trigger)
    return ", ".join([trigger, *(t for t in tags if tag_key(t) != tag_key(trigger))])


# --- the command ------------------------------------------------------------------------------

@dataclass
class Job:
    concept: ConceptFolder
    image: Path
    caption: Path
    old: str | None


@dataclass
class ConceptReport:
    written: int = 0
    unchanged: int = 0
    kept: int = 0
    skipped: int = 0
    linked: int = 0  # captions whose file another folder's caption reaches (a link)


@dataclass
class TagResult:
    reports: dict[str, ConceptReport] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    backup_dir: Path | None = None
    images: int = 0
    seconds: float = 0.0


def plan_jobs(concepts: list[ConceptFolder], extension: str, mode: Mode, result: TagResult,
              files: dict[Path, list[CaptionPath]]) -> list[Job]:
    """The images to tag: with `mode` missing, only those without a (non-empty) caption; one
    per caption file, however many links reach it (`files`: `captions_by_file`), and none
    whose file is also the caption of a folder left out or of another concept."""
    jobs = []
    planned: dict[Path, bool] = {}  # each caption file met: whether it is tagged
    for concept in concepts:
        report = result.reports.setdefault(concept.folder.name, ConceptReport())
        for image in concept.images:
            caption = concept.caption_path(image, extension)
            if (broken := broken_link(caption)) is not None:
                why, fix = broken
                result.warnings.append(f"{display_path(caption)}: {why}; {image.name} not "
                                       f"tagged (fix: {fix})")
                report.skipped += 1
                continue
            old = None
            if caption.exists():
                try:
                    old = read_caption(caption)
                except (OSError, UnicodeDecodeError) as exc:
                    why = "is not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else \
                        f"cannot be read ({exc.strerror})"
                    result.warnings.append(f"{display_path(caption)}: {why}; "
                                           f"{image.name} not tagged, its caption left as it is")
                    report.skipped += 1
                    continue
            if mode == "missing" and old is not None and caption_tags(old):
                report.kept += 1
                continue
            if (file := caption_file(caption)) in planned:
                if planned[file]:
                    report.linked += 1
                else:
                    report.skipped += 1
                continue
            shared = files.get(file, [])
            problem = left_out(shared, concepts) or trigger_clash(caption, shared)
            planned[file] = problem is None
            if problem is not None:
                why, fix = problem
                result.warnings.append(f"{display_path(caption)}: {why}; {image.name} not "
                                       f"tagged, its caption left as it is (fix: {fix})")
                report.skipped += 1
                continue
            jobs.append(Job(concept, image, caption, old))
    return jobs


def _load(job: Job, size: int) -> np.ndarray | ForgeError:
    try:
        return prepare_image(load_image(job.image), size)
    except ForgeError as exc:
        return exc
    except MemoryError:
        return ForgeError("is too large to decode in memory", path=job.image,
                          fix="downscale it (a few megapixels is plenty)")


def _batches(jobs: list[Job], size: int, batch_size: int, workers: int,
             ) -> Iterator[list[tuple[Job, np.ndarray | ForgeError]]]:
    """Prepared batches in order; `workers` threads read the next batches (one each) while the
    model runs on this one."""
    def load_chunk(chunk: list[Job]) -> list[tuple[Job, np.ndarray | ForgeError]]:
        return [(job, _load(job, size)) for job in chunk]

    chunks = [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = [pool.submit(load_chunk, chunk) for chunk in chunks[:workers]]
        for index in range(len(chunks)):
            if index + workers < len(chunks):
                pending.append(pool.submit(load_chunk, chunks[index + workers]))
            yield pending[index].result()


def tag_dataset(settings: Settings, only: list[str] | None, threshold: float,
                character_threshold: float, mode: Mode, batch_size: int, say: Say,
                stream: TextIO | None = None, device: Device = "auto") -> TagResult:
    """Tag the images of the chosen concepts (all by default) on `device`; see the module's
    docstring."""
    import numpy as np

    from loraforge.models import gpu_runtime
    from loraforge.models.tagger import TaggerModel, resolve_tagger

    result = TagResult()
    extension = settings.config.dataset.caption_extension
    concepts = concept_folders(settings.dataset_dir, only, result.warnings)
    jobs = plan_jobs(concepts, extension, mode, result,
                     captions_by_file(settings.dataset_dir, extension))
    if not jobs:
        return result
    record, resume = None, None
    if mode != "missing":  # it changes captions that a stopped edit may be editing
        from loraforge.dataset.tag_list import stopped_edit

        record = tagging_record(only, mode, threshold, character_threshold)
        resume = stopped_edit(settings.dataset_dir, record)
    choice = gpu_runtime.choose(settings.storage_root, device)
    model: TaggerModel = TaggerModel(resolve_tagger(settings), cuda=choice.cuda)
    needs = gpu_runtime.needs(settings.storage_root)
    if model.cuda_problem and device == "cuda":
        raise ForgeError(f"--device cuda: onnxruntime could not use CUDA ({model.cuda_problem})",
                         fix=f"the GPU build needs {needs} "
                             "libraries: a torch of that CUDA brings them as nvidia-* pip "
                             "packages, or load the cluster's (e.g. `module load cuda cudnn`); "
                             "`models fetch tagger-gpu --cuda 12` installs the build for CUDA "
                             "12; or tag on the CPU: --device cpu (`slurm tag --gpus 0`)")
    if model.cuda_problem:
        say(f"note: tagging on the CPU: onnxruntime could not use CUDA ({model.cuda_problem}; "
            f"it needs {needs} libraries)")
    elif choice.note:
        say(f"note: {choice.note}")
    say(f"tagger: {display_path(model.folder)} on {model.provider.replace('ExecutionProvider', '')}"
        f", {len(jobs)} image(s), batch {batch_size}, threshold {threshold}, characters "
        f"{character_threshold}")
    if resume is not None:
        say(f"continuing the tagging stopped earlier: its backup folder {display_path(resume)}/ "
            "keeps the old captions of this one too")
    writer = CaptionWriter(settings.dataset_dir, "tag", settings.file_mode, folder=resume,
                           record=record)
    progress = Progress("tag", len(jobs), PROGRESS_EVERY_SECONDS, stream=stream)
    started = time.monotonic()
    done = 0
    with writer, contextlib.closing(progress):
        workers = max(1, min(4, len(os.sched_getaffinity(0))))
        for batch in _batches(jobs, model.size, batch_size, workers):
            ready = [(job, x) for job, x in batch if not isinstance(x, ForgeError)]
            for job, x in batch:
                if isinstance(x, ForgeError):
                    result.warnings.append(f"{display_path(job.image)}: {x.message}; not tagged"
                                           ", its caption left as it is")
                    result.reports[job.concept.folder.name].skipped += 1
            if ready:
                probabilities = model.predict(np.stack([x for _, x in ready]))
                for (job, _), row in zip(ready, probabilities, strict=True):
                    tags = select_tags(row, model.tags, threshold, character_threshold)
                    text = new_caption(job.concept.name, job.old, tags, mode)
                    report = result.reports[job.concept.folder.name]
                    if writer.write(job.caption, job.old, text):
                        report.written += 1
                    elif writer.changed_meanwhile[-1:] == [job.caption]:
                        report.skipped += 1
                        result.warnings.append(
                            f"{display_path(job.caption)}: written or edited while tagging ran; "
                            f"{job.image.name} not tagged, its caption left as it is (rerun to "
                            "tag it with --append or --overwrite)")
                    else:
                        report.unchanged += 1
                    result.images += 1
            done += len(batch)
            if progress.update(done, len(batch)):
                rate = progress.rate
                print(f"tagged {done}/{len(jobs)} images, "
                      f"{'?' if rate is None else f'{rate:.1f}'} images/s, eta "
                      f"{duration(progress.eta)}", file=progress.stream, flush=True)
        result.backup_dir = writer.finish()
    result.seconds = time.monotonic() - started
    return result


def tagging_record(only: list[str] | None, mode: Mode, threshold: float,
                   character_threshold: float) -> dict[str, object]:
    """What a tagging that changes captions is, as JSON for its backup folder (`caption_edit`):
    the command that goes on with it, and what must match for a rerun to be that tagging."""
    words = ["loraforge", "dataset", "tag", *(only or []), f"--{mode}", "--threshold",
             str(threshold), "--character-threshold", str(character_threshold)]
    return {"command": shlex.join(words), "concepts": list(only) if only else None,
            "tagging": {"mode": mode, "threshold": threshold,
                        "character_threshold": character_threshold}}


def report_lines(result: TagResult, mode: Mode) -> list[str]:
    lines = []
    for folder, r in result.reports.items():
        parts = [f"{r.written} caption(s) written"]
        if r.unchanged:
            parts.append(f"{r.unchanged} already as tagged")
        if r.kept:
            parts.append(f"{r.kept} hand-written kept (--append adds tags to them, --overwrite "
                         "replaces them with a backup)" if mode == "missing" else
                         f"{r.kept} kept")
        if r.skipped:
            parts.append(f"{r.skipped} skipped (see the warnings)")
        if r.linked:
            parts.append(f"{r.linked} shared with another folder through a link (tagged there)")
        lines.append(f"{folder}: {', '.join(parts)}")
    if result.images:
        rate = result.images / max(result.seconds, 1e-9)
        lines.append(f"tagged {result.images} image(s) in {result.seconds:.1f} s "
                     f"({rate:.1f} images/s)")
    if result.backup_dir is not None:
        lines.append(f"the old captions are in {display_path(result.backup_dir)}/ (copy them "
                     "back to undo)")
    return lines


