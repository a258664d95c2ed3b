"""The image tagger `loraforge dataset tag` runs: a WD14-family ONNX model and its tag list.

A tagger folder holds `model.onnx` (SmilingWolf's wd-v1-4 / wd-*-tagger-v3 exports: one input
of NHWC float32 BGR pixels 0-255 at a fixed square size, one output of per-tag probabilities)
and `selected_tags.csv` (columns `tag_id,name,category,count`; category 9 = rating,
4 = character, 0 = general), in the output's order. `models.tagger` names it: a folder under the
storage root (default `wd-tagger`, what `loraforge models fetch tagger` installs), an absolute
path, or `tiny`: a random model of the same interface built here from a fixed seed, for tests and
the demo. It predicts nothing meaningful, but every step around it is the real one.

onnxruntime and numpy are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.config import TINY
from loraforge.errors import ForgeError
from loraforge.models import folders, gpu_runtime
from loraforge.models.manifest import describe_files, write_manifest

if TYPE_CHECKING:
    import numpy as np

    from loraforge.config import Settings

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
TINY_NAME = "tiny-tagger"
RATING, GENERAL, CHARACTER = 9, 0, 4
FETCH_FIX = ("run `loraforge models fetch tagger` (on a login node with internet), or set "
             "`models.tagger` in forge.toml to a folder holding model.onnx and "
             "selected_tags.csv (`tiny` for the embedded test tagger)")

# The embedded tiny tagger: same interface as the real ones, random weights, fixed seed.
TINY_SEED = 20261204
TINY_SIZE = 448  # the real models' input size, so the real preprocessing runs
TINY_POOL = 56  # 448 / 56 = an 8 x 8 grid of mean colours feeds one linear layer
TINY_RATINGS = ("general", "sensitive", "questionable", "explicit")
TINY_GENERAL = ("1girl", "1boy", "solo", "smile", "open_mouth", "long_hair", "short_hair",
                "red_hair", "blue_eyes", "hat", "armor", "cape", "dress", "sword", "holding",
                "standing", "full_body", "upper_body", "looking_at_viewer", "outdoors", "sky",
                "simple_background", "white_background", "^_^")
TINY_CHARACTERS = ("tiny_knight_(forge)", "tiny_mage_(forge)")


@dataclass(frozen=True)
class Tag:
    name: str
    category: int


def resolve_tagger(settings: Settings) -> Path:
    """The configured tagger's folder (the tiny one is built on first use), checked."""
    name = settings.config.models.tagger
    if name == TINY:
        return ensure_tiny_tagger(settings.storage_root)
    path = settings.model_dir(name)
    check_tagger(path)
    return path


def check_tagger(path: Path) -> None:
    """Raise ForgeError unless `path` holds a tagger's two files."""
    if not path.is_dir():
        raise ForgeError("tagger model not found", path=path, fix=FETCH_FIX)
    for name in (MODEL_FILE, TAGS_FILE):
        if not (path / name).is_file():
            raise ForgeError(f"is not a tagger folder (no {name})", path=path, fix=FETCH_FIX)


def read_tags(path: Path) -> list[Tag]:
    """The tags of a `selected_tags.csv`, in the model output's order."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ForgeError(f"cannot be read ({exc})", path=path,
                         fix="fetch the tagger again: loraforge models fetch tagger") from None
    reader = csv.DictReader(io.StringIO(text))
    if not {"name", "category"} <= set(reader.fieldnames or ()):
        raise ForgeError("is not a tagger's tag list (it needs the columns name and category)",
                         path=path, fix="fetch the tagger again: loraforge models fetch tagger")
    tags = []
    for row in reader:
        try:
            tags.append(Tag(row["name"], int(row["category"])))
        except (TypeError, ValueError):
            raise ForgeError(f"line {reader.line_num} has no whole-number category", path=path,
                             fix="fetch the tagger again: loraforge models fetch tagger"
                             ) from None
    if not tags:
        raise ForgeError("lists no tags", path=path,
                         fix="fetch the tagger again: loraforge models fetch tagger")
    return tags


def _threads() -> int:
    """onnxruntime's threads: OMP_NUM_THREADS (job scripts set it to the CPUs SLURM gave),
    else every CPU this process may use."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return len(os.sched_getaffinity(0))


def _first_line(exc: Exception) -> str:
    """The first line of an onnxruntime error (they run to pages), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """SIGTERM, SIGINT and SIGUSR1 blocked in the threads started meanwhile (onnxruntime's
    thread pool, made with the session), so that a job's SIGTERM reaches a thread of Python's,
    which stops the command, not a pool thread waiting inside onnxruntime. (A `dataset tag`
    sent SIGTERM once hung for a minute in a CI run; this is the likely cause, not a proven
    one: it did not happen again in 27 tries here.)"""
    import signal

    stops = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class TaggerModel:
    """An onnxruntime session of a tagger folder: `size` (input side) and `predict`.

    With `cuda` it tries onnxruntime's CUDA provider first; `provider` says where it runs, and
    `cuda_problem` why not on CUDA when that was tried."""

    def __init__(self, folder: Path, cuda: bool = False) -> None:
        import onnxruntime as ort

        self.folder = folder
        self.tags = read_tags(folder / TAGS_FILE)
        options = ort.SessionOptions()
        options.intra_op_num_threads = _threads()
        options.log_severity_level = 3
        ort.set_default_logger_severity(4)  # a CUDA that fails to load is reported by us, once
        providers = ["CPUExecutionProvider"]
        if cuda and gpu_runtime.CUDA in ort.get_available_providers():
            gpu_runtime.preload(ort)
            providers.insert(0, gpu_runtime.CUDA)
        printed = io.StringIO()  # where onnxruntime prints a provider's failure ("EP Error")
        try:
            with contextlib.redirect_stdout(printed), _signals_blocked():
                self.session = ort.InferenceSession(str(folder / MODEL_FILE), options,
                                                    providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise ForgeError(f"is not a model onnxruntime can load ({_first_line(exc)})",
                             path=folder / MODEL_FILE,
                             fix="fetch the tagger again: loraforge models fetch tagger"
                             ) from None
        self.provider = self.session.get_providers()[0]
        if self.provider == gpu_runtime.CUDA:
            self.session.disable_fallback()  # a CUDA failure while tagging is an error, not a
            # silent switch to the CPU that keeps holding the GPU
        reported = next((line.removeprefix("EP Error").strip() for line in
                         printed.getvalue().splitlines() if line.startswith("EP Error")), None)
        self.cuda_problem = (gpu_runtime.cuda_problem(ort, reported)
                             if cuda and self.provider != gpu_runtime.CUDA else None)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = inputs[0].shape
        if len(inputs) != 1 or len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2]:
            raise ForgeError(f"takes {len(inputs)} input(s) of shape {shape}, not one batch of "
                             "square BGR images (N, size, size, 3)", path=folder / MODEL_FILE,
                             fix="use a WD14-family tagger: loraforge models fetch tagger")
        self.size = shape[1] if isinstance(shape[1], int) else TINY_SIZE
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        width = outputs[0].shape[-1]
        if isinstance(width, int) and width != len(self.tags):
            raise ForgeError(f"has {width} outputs but {TAGS_FILE} lists {len(self.tags)} tags",
                             path=folder, fix="fetch the tagger again: loraforge models fetch "
                             "tagger (the two files must come from the same repository)")

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, size, size, 3) float32 BGR 0-255 -> (N, tags) probabilities."""
        try:
            return self.session.run([self.output_name], {self.input_name: batch})[0]
        except Exception as exc:  # onnxruntime's untyped errors, e.g. CUDA out of memory
            if self.provider != gpu_runtime.CUDA:
                raise
            raise ForgeError(f"the tagger failed on the GPU ({_first_line(exc)})",
                             path=self.folder,
                             fix="a smaller --batch-size, or tag on the CPU: --device cpu; the "
                                 "captions written so far are kept, a rerun continues") from None


# --- the embedded tiny tagger -----------------------------------------------------------------

def tiny_tag_rows() -> list[tuple[int, str, int, int]]:
    """(tag_id, name, category, count) rows of the tiny tagger's tag list."""
    rows = [(name, RATING) for name in TINY_RATINGS] + [(n, GENERAL) for n in TINY_GENERAL]
    rows += [(name, CHARACTER) for name in TINY_CHARACTERS]
    return [(100_000 + i, name, category, 1000 - 10 * i)
            for i, (name, category) in enumerate(rows)]


def tiny_model_bytes() -> bytes:
    """The tiny tagger's ONNX file: NHWC -> NCHW, 8 x 8 mean colours, one linear layer, sigmoid.
    The same bytes on every call (a fixed seed, a fixed opset and IR version)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(TINY_SEED)
    features = 3 * (TINY_SIZE // TINY_POOL) ** 2
    count = len(tiny_tag_rows())
    weight = (rng.normal(0.0, 2.0, (features, count)) / np.sqrt(features)).astype(np.float32)
    bias = rng.normal(-0.3, 1.0, count).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("AveragePool", ["nchw"], ["pooled"], kernel_shape=[TINY_POOL] * 2,
                         strides=[TINY_POOL] * 2),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Div", ["flat", "scale"], ["unit"]),
        helper.make_node("Gemm", ["unit", "weight", "bias"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_wd_tagger",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                       ["batch", TINY_SIZE, TINY_SIZE, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", count])],
        [numpy_helper.from_array(np.array(255.0, np.float32), "scale"),
         numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, producer_name="loraforge", producer_version="1",
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString(deterministic=True)


def tiny_tags_csv() -> str:
    lines = ["tag_id,name,category,count"]
    lines += [f"{tag_id},{name},{category},{count}"
              for tag_id, name, category, count in tiny_tag_rows()]
    return "\n".join(lines) + "\n"


def _tiny_marker() -> dict[str, Any]:
    recipe = hashlib.sha256(json.dumps([TINY_SEED, TINY_SIZE, TINY_POOL, tiny_tag_rows()])
                            .encode()).hexdigest()[:16]
    return {"type": "embedded", "recipe": recipe}


def ensure_tiny_tagger(storage_root: Path) -> Path:
    """`<storage_root>/tiny-tagger`, built (atomically) when missing or from another recipe."""
    from loraforge.models.manifest import read_manifest

    dest = Path(storage_root) / TINY_NAME
    manifest = read_manifest(dest)
    if manifest is not None and manifest.get("source") == _tiny_marker() and all(
            (dest / name).is_file() for name in (MODEL_FILE, TAGS_FILE)):
        return dest
    try:
        with folders.exclusive(dest.with_name(f".{TINY_NAME}{folders.LOCK_SUFFIX}"),
                               "building the tiny tagger"):
            tmp = folders.make_partial(dest.parent, TINY_NAME)
            try:
                (tmp / MODEL_FILE).write_bytes(tiny_model_bytes())
                (tmp / TAGS_FILE).write_text(tiny_tags_csv(), encoding="utf-8")
                write_manifest(tmp, {"kind": "tagger", "source": _tiny_marker(),
                                     "files": describe_files(tmp)})
                folders.fix_modes(tmp)
                folders.install(tmp, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise ForgeError(f"cannot build the tiny tagger here ({exc.strerror or exc})",
                         path=storage_root, fix="make the storage root writable, or point "
                         "`storage.root` (or LORAFORGE_STORAGE_ROOT) at a writable folder"
                         ) from None
    return dest
