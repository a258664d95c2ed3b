"""Pose maps from reference pictures: `loraforge pose extract`, and photos given to `generate`.

A picture is decoded at a reduced size where its format allows (JPEG: DCT scaling), so a huge
photo costs little memory, then scaled to fit the network's input box (368 px high, at most 656
wide: OpenPose's default resolution), run through the body network once, and parsed into people
(see `skeletons`). Keypoints are mapped back to the picture's pixels, then the pose is letterboxed
onto the scene size generation uses and drawn in the standard pose map colours.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from loraforge.config import TINY
from loraforge.errors import ForgeError
from loraforge.fsutil import write_refused
from loraforge.generate.poses import (
    Person,
    PoseMap,
    draw_pose,
    fit_pose,
    parse_size,
    recorded_source,
    refuse_foreign,
    save_png,
    write_pose_json,
    written_json_digest,
)
from loraforge.hashing import digest_file

if TYPE_CHECKING:
    import numpy as np
    import torch

    from loraforge.config import Settings

Say = Callable[[str], None]

INPUT_HEIGHT = 368
INPUT_MAX_WIDTH = 656
PAD_VALUE = 128
OUTPUT_SUFFIX = ".pose"
#: A picture is decoded at no less than this box (JPEG: at 1/2 to 1/8 scale where it still
#: fills it): twice the network's input, so a huge photo never needs its full-size pixels.
DECODE_BOX = (2 * INPUT_MAX_WIDTH, 2 * INPUT_HEIGHT)


def input_size(width: int, height: int) -> tuple[int, int]:
    """The network's input size for a W x H picture: fitted into 656 x 368, aspect kept."""
    scale = min(INPUT_HEIGHT / height, INPUT_MAX_WIDTH / width)
    return max(1, round(width * scale)), max(1, round(height * scale))


def load_picture(path: Path) -> Image.Image:
    """The picture as RGB, decoded at no more than about `DECODE_BOX` where the format can skip
    detail (JPEG)."""
    from loraforge.dataset.images import load_image

    return load_image(path, fit=DECODE_BOX)


def network_input(picture: Image.Image) -> torch.Tensor:
    """(1, 3, H8, W8): BGR in [-0.5, 0.5), padded right and bottom to multiples of 8 with grey."""
    import numpy as np
    import torch

    width, height = input_size(*picture.size)
    pixels = np.asarray(picture.resize((width, height), Image.Resampling.BICUBIC),
                        dtype=np.float32)
    padded = np.full((-(-height // 8) * 8, -(-width // 8) * 8, 3), PAD_VALUE, dtype=np.float32)
    padded[:height, :width] = pixels
    return torch.from_numpy(padded[:, :, ::-1].transpose(2, 0, 1).copy())[None] / 256 - 0.5


def network_maps(net: torch.nn.Module, picture: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """The network's affinity fields (38, h, w) and heatmaps (19, h, w) over the input size."""
    import torch

    from loraforge.generate.skeletons import upsample

    with torch.no_grad():
        fields, heatmaps = net(network_input(picture))
    return upsample(fields[0], heatmaps[0], *input_size(*picture.size))


def detect(net: torch.nn.Module, picture: Image.Image) -> PoseMap:
    """Every person the network finds in ``picture``, in the picture's pixel coordinates."""
    from loraforge.generate.skeletons import people_from_maps

    fields, heatmaps = network_maps(net, picture)
    width, height = input_size(*picture.size)
    sx, sy = picture.width / width, picture.height / height
    people = tuple(
        Person(tuple(None if p is None else ((p[0] + 0.5) * sx - 0.5, (p[1] + 0.5) * sy - 0.5)
                     for p in person.keypoints))
        for person in people_from_maps(fields, heatmaps))
    return PoseMap(picture.width, picture.height, people)


# --- the detector ---------------------------------------------------------------------------

@dataclass
class Detector:
    """The configured body network (and with ``hands`` / ``face`` the hand / face network),
    loaded on first use."""

    settings: Settings
    hands: bool = False
    face: bool = False
    _net: torch.nn.Module | None = field(default=None, init=False, repr=False)
    _hand_net: torch.nn.Module | None = field(default=None, init=False, repr=False)
    _face_net: torch.nn.Module | None = field(default=None, init=False, repr=False)

    @property
    def is_tiny(self) -> bool:
        return self.settings.config.models.detector == TINY

    def net(self) -> torch.nn.Module:
        if self._net is None:
            from loraforge.models import bodypose, store

            folder = store.resolve_detector(self.settings)
            self._net = bodypose.load_detector(folder)
            from loraforge.models import cpm

            if self.hands:
                self._hand_net = cpm.load_hand_detector(folder)
            if self.face:
                self._face_net = cpm.load_face_detector(folder)
        return self._net

    def people(self, picture: Image.Image, path: Path) -> PoseMap:
        """The people in ``picture``; ForgeError naming ``path`` when there is nobody."""
        pose = detect(self.net(), picture)
        if not pose.people:
            fix = ("use a picture where each person's head, shoulders and hips are visible "
                   "and not tiny in the frame, or draw the pose (`loraforge pose random`, or a "
                   "pose editor's JSON)")
            if self.is_tiny:
                fix = ("models.detector is \"tiny\" (random weights: it finds no real people); "
                       "run `loraforge models fetch openpose-detector` and set "
                       "models.detector = \"controlnet-detector\"")
            raise ForgeError("no person found", path=path, fix=fix)
        if self._hand_net is not None:
            from loraforge.generate.hands import add_hands

            pose = add_hands(self._hand_net, picture, pose)
        if self._face_net is not None:
            from loraforge.generate.faces import add_faces

            pose = add_faces(self._face_net, picture, pose)
        return pose


def photo_poses(settings: Settings) -> Callable[[Path, Image.Image], PoseMap] | None:
    """What `generate` does with a picture that is not a pose map: extract its people
    (`generate.pose_from_photo = "extract"`), or None to refuse it."""
    if settings.config.generate.pose_from_photo != "extract":
        return None
    detector = Detector(settings)
    return lambda path, picture: detector.people(picture, path)


# --- `loraforge pose extract` ------------------------------------------------------------------

def _pictures(inputs: list[Path]) -> tuple[list[Path], bool, list[str]]:
    """The pictures named (folders expanded to their images, sorted, passing over hidden files
    and OS clutter as the dataset scan does: macOS's ._NAME.png copies), whether it is a batch,
    and a note for each named file left out: an earlier output, or not a picture (in a batch;
    named alone, that is an error)."""
    from loraforge.dataset.images import IMAGE_EXTENSIONS
    from loraforge.dataset.scan import is_clutter, is_pose_output

    pictures: list[Path] = []
    left_out: list[tuple[Path, str]] = []
    batch = len(inputs) > 1
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            batch = True
            found = sorted(p for p in item.iterdir() if p.is_file() and not is_clutter(p.name)
                           and p.suffix.lower() in IMAGE_EXTENSIONS
                           and not is_pose_output(p.name))
            if not found:
                raise ForgeError("holds no pictures (png, jpg, jpeg, webp, bmp; NAME.pose.png "
                                 "files are earlier pose maps and are skipped)", path=item,
                                 fix="name the pictures, or a folder that holds some")
            pictures += found
        elif not item.exists():
            raise ForgeError("no such file", path=item, fix="check the path to the picture")
        elif is_pose_output(item.name):
            left_out.append((item, "a pose map or JSON that pose extract wrote"))
        elif item.suffix.lower() not in IMAGE_EXTENSIONS:
            left_out.append((item, "not a picture: png, jpg, jpeg, webp, bmp"))
        else:
            pictures.append(item)
    if not pictures:
        item, why = left_out[0] if len(left_out) == 1 else (
            Path(inputs[0]), "no pictures among the files named")
        raise ForgeError(why, path=item,
                         fix="name pictures (png, jpg, jpeg, webp, bmp) or folders of them")
    return pictures, batch, [f"{item}: skipped ({why})" for item, why in left_out]


def _into_folder(output: Path | None, batch: bool) -> bool:
    """Whether the pose maps go into the folder `output` (several pictures, or -o naming an
    existing folder or a name without an extension)."""
    return batch or (output is not None and (output.is_dir() or not output.suffix))


def _outputs(picture: Path, output: Path | None, json_out: Path | None, batch: bool,
             ) -> tuple[Path, Path]:
    stem = picture.stem + OUTPUT_SUFFIX
    if _into_folder(output, batch):
        folder = output if output is not None else picture.parent
        return folder / f"{stem}.png", json_out or folder / f"{stem}.json"
    png = output if output is not None else picture.with_name(f"{stem}.png")
    return png, json_out if json_out is not None else png.with_suffix(".json")


def _refuse_clashes(pictures: list[Path], output: Path | None) -> None:
    """Refuse, all in one message, the pictures whose pose maps would have one name (anim.png
    and anim.webp both write anim.pose.png)."""
    writers: dict[Path, list[Path]] = {}
    for picture in pictures:
        writers.setdefault(_outputs(picture, output, None, True)[0].resolve(), []).append(picture)
    clashes = [(png, found) for png, found in writers.items() if len(found) > 1]
    if not clashes:
        return
    listed = "; ".join(
        f"{' and '.join(p.name if len({q.parent for q in found}) == 1 else str(p) for p in found)}"
        f" would {'both' if len(found) == 2 else 'all'} write {png.name}"
        for png, found in clashes)
    raise ForgeError(listed, path=clashes[0][1][0].parent,
                     fix="rename one of each (e.g. anim.webp to anim_2.webp), or extract them "
                         "one at a time with -o")


def _check_outputs(pictures: list[Path], output: Path | None, json_out: Path | None,
                   batch: bool) -> None:
    """Refuse outputs that cannot be written (or would replace a file of the user's) before
    any picture is read: a refused JSON never leaves its pose map written alone."""
    if batch:
        _refuse_clashes(pictures, output)
        if json_out is not None:
            raise ForgeError("--pose-json names one file, but several pictures are extracted",
                             path=json_out, fix="drop --pose-json: each picture's JSON is written "
                             "beside its pose map (NAME.pose.json)")
        if output is not None and output.suffix.lower() == ".png":
            raise ForgeError("several pictures are extracted, so -o must be a folder",
                             path=output, fix="pass a folder, e.g. -o poses/")
        if output is not None and output.exists() and not output.is_dir():
            raise ForgeError("is a file; several pictures need a folder for their pose maps",
                             path=output, fix="pass a folder, e.g. -o poses/")
        return  # a file of the user's at an output: refused for the pictures to extract
    png, json_path = _outputs(pictures[0], output, json_out, batch)
    if png.is_dir():
        raise ForgeError("is a folder; expected the pose map's file name", path=png,
                         fix="pass another -o, e.g. -o pose_map.png")
    if png.suffix.lower() != ".png":
        raise ForgeError("pose maps are written as PNG (a lossy format would change the "
                         "colours the ControlNet reads)", path=png,
                         fix=f"name the output {png.with_suffix('.png').name}")
    if json_path.suffix.lower() != ".json" or json_path.resolve() == png.resolve():
        raise ForgeError("the OpenPose JSON needs its own .json name", path=json_path,
                         fix="pass --pose-json with a .json name, e.g. pose_map.json")
    for written in (png, json_path):
        if written.resolve() == pictures[0].resolve():
            raise ForgeError("the output would overwrite the picture", path=written,
                             fix="pass -o with another name")
    refuse_foreign(png)  # a file of the user's at either output: neither is written
    try:
        refuse_foreign(json_path)
    except ForgeError as exc:
        raise ForgeError(exc.message, path=json_path,
                         fix=_json_fix(json_path, json_out is not None)) from None


def _json_fix(json_path: Path, named: bool) -> str:
    """The fix for a file of the user's at the JSON output: another --pose-json, or moving it."""
    if named:
        return "pass another --pose-json name, or move that file away first if it may go"
    return (f"name the JSON with --pose-json (e.g. --pose-json "
            f"{json_path.with_name(json_path.stem + '.pose.json')}), or move that file away "
            "first if it may go")


@dataclass(frozen=True)
class _Job:
    """One picture and the pose map and JSON it is extracted to; `source`: the picture's
    SHA-256 and the options that shape its map (size, hands, face), as the map records it."""

    picture: Path
    png: Path
    json: Path
    source: str


def _json_digest(text: str | bytes) -> str:
    return hashlib.sha256(text.encode("utf-8") if isinstance(text, str) else text).hexdigest()


def _not_ours(job: _Job) -> str | None:
    """Why the existing JSON of `job` may hold the user's work (edited in a pose editor since
    `pose extract` wrote it), or None when it is, byte for byte, the JSON that its pose map
    records having been written beside it."""
    recorded = written_json_digest(job.png)
    if recorded is None:
        where = (f"{job.png.name} does not record it: written by `pose render` or by an older "
                 "loraforge" if job.png.exists() else "no pose map beside it records it")
        return f"is not known to be the JSON pose extract wrote ({where})"
    try:
        current = _json_digest(job.json.read_bytes())
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc}), so it is not known to be ours"
    if current != recorded:
        return "was changed since pose extract wrote it (in a pose editor?)"
    return None


def _refuse_unknown_json(job: _Job, named: bool) -> None:
    """Refuse, for the one picture named, a JSON at its output that pose extract is not known
    to have written beside a map of this picture (a pose editor's, OpenPose's own): it is never
    replaced, so nothing would be extracted. One edited since this picture's map was written
    is kept, with a line (`_plan`): that map is there."""
    if not job.json.exists() or recorded_source(job.png) == job.source:
        return
    why = _not_ours(job)
    if why is not None:
        raise ForgeError(f"exists and {why}: extracting would replace it", path=job.json,
                         fix=_json_fix(job.json, named))


def _plan(jobs: list[_Job], overwrite: bool) -> tuple[list[_Job], list[_Job], list[str]]:
    """The jobs to extract, those already extracted (map and JSON there, kept unless
    ``overwrite``), and a line for each picture kept even with ``overwrite`` because its JSON
    may be the user's: a JSON is replaced only when it is what pose extract wrote."""
    todo: list[_Job] = []
    done: list[_Job] = []
    kept: list[str] = []
    for job in jobs:
        if not job.json.exists():  # a map alone: the batch stopped between the two writes
            todo.append(job)
            continue
        stale = recorded_source(job.png) != job.source  # another picture, size, hands or face
        if job.png.exists() and not overwrite and not stale:
            done.append(job)
        elif (why := _not_ours(job)) is None:
            todo.append(job)
        else:
            made = (" (it was made from another picture or with other options)" if stale
                    else "")
            kept.append(f"{job.picture}: kept, not extracted again{made}: {job.json} {why}; "
                        "move that JSON away (or delete it) to extract the picture again")
    return todo, done, kept


def _source(picture: Path, width: int, height: int, hands: bool, face: bool) -> str:
    """What a pose map records having been made from (`_Job.source`)."""
    try:
        digest = digest_file(picture)
    except OSError:
        digest = "unreadable"  # never matches a map: the picture's error comes when it is read
    return f"{digest} {width}x{height} hands={hands} face={face}"


def _write(job: _Job, pose: PoseMap, mode: int) -> None:
    """The pose map, recording the digest of the JSON, then the JSON (a run stopped between
    the two leaves a map alone: the rerun extracts that picture again)."""
    text = pose.to_json()
    save_png(draw_pose(pose), job.png, mode, _json_digest(text), job.source)
    try:
        write_pose_json(job.json, pose, mode)
    except OSError as exc:
        raise ForgeError(f"cannot be written: {exc.strerror or exc}", path=job.json) from None


def _below(folder: Path, root: Path) -> tuple[str, ...] | None:
    """The names leading from the folder `root` down to `folder` (() for `root` itself), or
    None when `folder` lies outside it; reached by any path (a symlink, another mount of the
    same folder: existing folders are compared as files, by device and inode)."""
    names: list[str] = []
    resolved = folder.resolve()
    for place in (resolved, *resolved.parents):
        if place == root or _same_folder(place, root):
            return tuple(reversed(names))
        names.append(place.name)
    return None


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def _dataset_refusal(names: tuple[str, ...], dataset_dir: Path) -> str:
    """Why pose maps may not go to the folder `names` below the dataset folder."""
    from loraforge.dataset.scan import display_path, parse_folder_name

    if len(names) == 1 and parse_folder_name(names[0]) is not None:
        return ("is a concept folder of the training dataset: pose maps written here would be "
                "trained as the concept's pictures")
    where = ("is the training dataset folder (dataset.path)" if not names else
             f"is inside the training dataset folder ({display_path(dataset_dir)}, dataset.path)")
    return f"{where}: pose maps written here would be mixed into the training data"


def _refuse_dataset_outputs(jobs: list[_Job], json_out: Path | None, dataset_dir: Path) -> None:
    """Refuse outputs in the training dataset folder (dataset.path) or anywhere below it: in a
    concept folder the pose maps would be trained as the concept's pictures, elsewhere
    `dataset check` would stop on them (and its fixes would move them into training)."""
    from loraforge.dataset.scan import shell_path

    root = dataset_dir.resolve()
    poses = dataset_dir.parent / "poses"
    outputs = [(job.png.parent, f"-o {shell_path(poses)}/") for job in jobs]
    if json_out is not None:
        outputs.append((json_out.parent, f"--pose-json {shell_path(poses / json_out.name)}"))
    refused = [(folder, names, example) for folder, example in dict.fromkeys(outputs)
               if (names := _below(folder, root)) is not None]
    if refused:
        folder, names, _ = refused[0]
        examples = " ".join(dict.fromkeys(example for _, _, example in refused))
        raise ForgeError(_dataset_refusal(names, dataset_dir), path=folder,
                         fix=f"write them outside the dataset folder, e.g. {examples}")


def _refuse_unwritable(jobs: list[_Job]) -> None:
    """Refuse, before the detector is loaded, an output folder where no file can be made
    (read-only reference photos on lab storage): tried by making one there, which answers
    for root, an immutable folder and a read-only mount too."""
    for folder in sorted({path.parent for job in jobs for path in (job.png, job.json)}):
        existing = next(f for f in (folder, *folder.parents) if f.exists())
        refused = write_refused(existing)
        if refused is not None:
            raise ForgeError(f"cannot be written: {refused.strerror or refused}", path=folder,
                             fix="write the pose maps elsewhere with -o DIR, e.g. -o poses/")


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _summary(total: int, extracted: int, people: int, already: int, kept: int,
             no_pose: list[str], unreadable: list[str], unwritten: list[str]) -> str:
    """The batch's last line: what was extracted, kept, found without a pose, could not be
    read, not written."""
    summary = (f"{_count(total, 'picture', 'pictures')}: {extracted} extracted "
               f"({_count(people, 'person', 'people')})")
    if already:
        summary += f", {already} already extracted, kept (--overwrite extracts them again)"
    if kept:
        summary += f", {kept} kept: their JSON may have been edited (see above)"
    summary += f", {len(no_pose)} without a pose" + (f": {', '.join(no_pose)}" if no_pose else "")
    for names, what in ((unreadable, "unreadable"), (unwritten, "not written")):
        if names:
            summary += f"; {len(names)} {what}: {', '.join(names)}"
    return summary


def extract_command(settings: Settings, inputs: list[Path], output: Path | None,
                    json_out: Path | None, size: str | None, say: Say,
                    hands: bool = False, face: bool = False, overwrite: bool = False) -> None:
    """`loraforge pose extract`: one pose map (PNG) and OpenPose JSON per picture, letterboxed
    onto the scene size. A picture whose map and JSON are already there is kept (a rerun goes
    on where a stopped batch ended) unless ``overwrite``; a JSON edited since it was written is
    kept even then, with a line saying so. A batch goes on past a bad picture and ends with a
    summary; ForgeError (exit 1) when any picture could not be read, gave no pose or could not
    be written. Refused before the detector is loaded: outputs in the dataset folder, an output
    folder where no file can be made, and for one picture a JSON of the user's at its output."""
    gen = settings.config.generate
    width, height = parse_size(size) if size else (gen.width, gen.height)
    pictures, batch, notes = _pictures(inputs)
    _check_outputs(pictures, output, json_out, batch)
    jobs = [_Job(picture, *_outputs(picture, output, json_out, batch),
                 _source(picture, width, height, hands, face)) for picture in pictures]
    _refuse_dataset_outputs(jobs, json_out, settings.dataset_dir)
    if not batch:
        _refuse_unknown_json(jobs[0], json_out is not None)
    for note in notes:
        say(note)
    todo, done, kept = _plan(jobs, overwrite)
    if batch:  # a file of the user's at an output: refused (one picture's: _check_outputs)
        for written in (path for job in todo for path in (job.png, job.json)):
            refuse_foreign(written)
    for line in kept:
        say(line)
    if not batch and done:
        say(f"{done[0].picture}: already extracted ({done[0].png}, {done[0].json}), kept; "
            "--overwrite extracts it again")
    _refuse_unwritable(todo)
    detector = Detector(settings, hands, face)
    if todo:
        detector.net()  # a missing or damaged detector stops the batch before the first picture
    people = 0
    unreadable: list[str] = []
    no_pose: list[str] = []
    unwritten: list[str] = []
    for job in todo:
        failed = unreadable  # then, once read, no_pose; once detected, unwritten
        try:
            picture = load_picture(job.picture)
            failed = no_pose
            found = detector.people(picture, job.picture)
            failed = unwritten
            _write(job, fit_pose(found, width, height), settings.file_mode)
        except ForgeError as exc:
            if not batch:
                raise
            failed.append(job.picture.name)
            say(f"error: {exc}")
            continue
        n = len(found.people)
        people += n
        parts = (f", {sum(h is not None for p in found.people for h in p.hands)} hands"
                 if hands else "")
        parts += (f", {sum(p.face is not None for p in found.people)} faces" if face else "")
        say(f"{job.picture} -> {job.png} ({_count(n, 'person', 'people')}{parts}, "
            f"{width}x{height}; JSON: {job.json.name})")
    if batch:
        extracted = len(todo) - len(unreadable) - len(no_pose) - len(unwritten)
        summary = _summary(len(pictures), extracted, people, len(done), len(kept), no_pose,
                           unreadable, unwritten)
        if unreadable or no_pose or unwritten:
            fix = "see each picture's error above"
            if unwritten:
                fix += ("; free space or make the folder writable (or pass -o DIR), then run "
                        "the same command again: the pictures written are kept")
            if extracted:
                fix += f"; the pose maps of the {extracted} extracted were written"
            raise ForgeError(summary, fix=fix)
        say(summary)
