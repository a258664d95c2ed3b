"""The GPU build of onnxruntime, so that `dataset tag` runs the tagger on a GPU.

The `onnxruntime` loraforge installs runs on the CPU only. `onnxruntime-gpu` adds CUDA, but it
installs into the same `onnxruntime` module folder and its newest release trails the CPU one,
so the two cannot share one environment. `loraforge models fetch tagger-gpu` therefore installs
it with pip (no dependencies: the CPU build brought them) into `<storage>/runtimes/
onnxruntime-gpu/`, once, on a login node, with a `runtime.json` record of the release, its CUDA
and the Python it was built for. `dataset tag` puts that folder first on the import path when it
tags on a GPU. PyPI's builds need CUDA 13 (1.27 on) or CUDA 12 (up to 1.26) and cuDNN 9
libraries: the release is chosen for the CUDA of the environment's torch (`--cuda` overrides),
and loads them from the nvidia-* pip packages that torch brings, else from the system (e.g.
the cluster's `module load`).

onnxruntime is imported inside the functions that need it, after `activate`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from loraforge.errors import ForgeError
from loraforge.models import folders
from loraforge.models.manifest import RUNTIMES

KEY = "tagger-gpu"  # what `models fetch` takes
PACKAGE = "onnxruntime-gpu"
#: The newest onnxruntime-gpu on PyPI for each CUDA major version (the CPU build is at 1.32.0).
RELEASES = {"13": "1.31.1", "12": "1.26.0"}
DEFAULT_CUDA = "13"
VERSION = RELEASES[DEFAULT_CUDA]
NAME = "onnxruntime-gpu"
RECORD = "runtime.json"
CUDA = "CUDAExecutionProvider"
FETCH_FIX = (f"run `loraforge models fetch {KEY}` once on a login node with internet "
             "(it installs the GPU build of onnxruntime under the storage root)")
Device = Literal["auto", "cpu", "cuda"]
Say = Callable[[str], None]

# Run by a fresh interpreter with the new folder first on its path: what it imports, from where.
_CHECK = ("import json, onnxruntime as o; print(json.dumps({'file': o.__file__, "
          "'version': o.__version__, 'providers': o.get_available_providers()}))")


def folder(storage_root: Path) -> Path:
    return storage_root / RUNTIMES / NAME


def _python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _platform() -> str:
    return sysconfig.get_platform()


def _record(storage_root: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((folder(storage_root) / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def releases() -> str:
    return " or ".join(f"{version} (CUDA {cuda})" for cuda, version in RELEASES.items())


def why_unusable(storage_root: Path) -> str | None:
    """None when the runtime folder holds one of our releases for this Python, else what is
    wrong."""
    record = _record(storage_root)
    if record is None:
        return "the GPU build of onnxruntime is not installed"
    if RELEASES.get(str(record.get("cuda"))) != record.get("version"):
        return (f"{folder(storage_root)} holds onnxruntime-gpu {record.get('version')}, and this "
                f"loraforge uses {releases()}")
    if record.get("python") != _python() or record.get("platform") != _platform():
        return (f"{folder(storage_root)} was installed for Python {record.get('python')} on "
                f"{record.get('platform')}, and this is Python {_python()} on {_platform()}")
    return None


def describe(storage_root: Path) -> str | None:
    """One line for `models list`: the runtime and whether this Python can use it; None when
    none was installed."""
    path = folder(storage_root)
    if not path.exists():
        return None
    problem = why_unusable(storage_root)
    record = _record(storage_root) or {}
    return (f"tagger GPU runtime: {PACKAGE} {record.get('version')} (CUDA {record.get('cuda')}) "
            f"in {path}" if problem is None
            else f"tagger GPU runtime: not usable: {problem} (fix: loraforge models fetch {KEY})")


def needs(storage_root: Path) -> str:
    """The libraries the installed runtime loads."""
    cuda = (_record(storage_root) or {}).get("cuda")
    return f"CUDA {cuda} and cuDNN 9" if cuda else "CUDA and cuDNN 9"


def detect_cuda() -> tuple[str, str]:
    """The CUDA major version to install for, and why: that of the environment's torch build
    (its version's `+cuXYZ`, or its nvidia-cuda-runtime package), else DEFAULT_CUDA."""
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    torch = version("torch") or ""
    if "+cu" in torch:
        major = torch.split("+cu")[1][:2]
        if major in RELEASES:
            return major, f"the CUDA of this environment's torch {torch}"
        return DEFAULT_CUDA, (f"this environment's torch {torch} is built for CUDA {major}, "
                              f"which no onnxruntime-gpu of ours is; --cuda "
                              f"{'/'.join(RELEASES)} chooses")
    for dist in ("nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime"):
        found = version(dist)
        if found and found.split(".")[0] in RELEASES:
            return found.split(".")[0], f"this environment's {dist} {found}"
    return DEFAULT_CUDA, f"no CUDA torch here; --cuda {'/'.join(RELEASES)} chooses"


def install(storage_root: Path, say: Say, file_mode: int = folders.FILE_MODE,
            cuda: str | None = None) -> Path:
    """Install the onnxruntime-gpu release for `cuda` (default: `detect_cuda`) under the storage
    root with pip, atomically; checked by importing it in a fresh interpreter. Nothing is done
    when it is already there."""
    dest = folder(storage_root)
    record = _record(storage_root) or {}
    usable = why_unusable(storage_root) is None
    if cuda is None and usable:
        say(f"{PACKAGE} {record.get('version')} (CUDA {record.get('cuda')}) is already installed "
            f"in {dest} (--cuda {'/'.join(RELEASES)} installs another build)")
        return dest
    if cuda is None:
        cuda, why = detect_cuda()
    elif cuda not in RELEASES:
        raise ForgeError(f"--cuda {cuda}: onnxruntime-gpu is built for CUDA "
                         f"{' and '.join(RELEASES)} only", fix=f"--cuda {DEFAULT_CUDA}")
    else:
        why = "--cuda"
    version = RELEASES[cuda]
    if usable and record.get("cuda") == cuda:
        say(f"{PACKAGE} {version} (CUDA {cuda}) is already installed in {dest}")
        return dest
    root = dest.parent

    def build(tmp: Path) -> None:
        say(f"installing {PACKAGE}=={version} for CUDA {cuda} ({why}) with pip (about 260 MB) "
            "...")
        _pip_install(tmp, version)
        found = _imported_from(tmp)
        record = {"package": PACKAGE, "version": found["version"], "cuda": cuda,
                  "python": _python(), "platform": _platform(), "providers": found["providers"]}
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        folders.fix_modes(tmp, file_mode)  # a storage root shared with a group

    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ForgeError(f"cannot install {PACKAGE} here ({exc})", path=root,
                         fix="make the storage root writable, or point `storage.root` (or "
                             "LORAFORGE_STORAGE_ROOT) at a writable folder") from None
    with folders.exclusive(root / f".{NAME}{folders.LOCK_SUFFIX}", f"installing {PACKAGE}"):
        folders.remove_leftovers(root, NAME)
        folders.build_model(root, NAME, build, lambda _: False, f"the {PACKAGE} runtime")
    say(f"installed {PACKAGE} {version} in {dest}: `dataset tag` now tags on a GPU where one "
        f"is visible (it needs CUDA {cuda} and cuDNN 9 libraries there)")
    return dest


def _pip_install(target: Path, version: str) -> None:
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input",
               "--disable-pip-version-check", "--no-warn-script-location", "--no-cache-dir",
               "--target", str(target), f"{PACKAGE}=={version}"]
    # --target alone decides where: a user install (PIP_USER, `user = true` in pip.conf) or
    # another prefix would clash with it; no cache: 260 MB in a small home quota
    env = {key: value for key, value in os.environ.items()
           if key not in ("PIP_TARGET", "PIP_PREFIX", "PIP_ROOT")}
    done = subprocess.run(command, capture_output=True, text=True, env={**env, "PIP_USER": "0"})
    if "No module named pip" in done.stderr:
        raise ForgeError(f"this environment ({sys.prefix}) has no pip to install {PACKAGE} "
                         "with", fix=f"add it (`{sys.executable} -m ensurepip`), then run "
                         f"`loraforge models fetch {KEY}` again")
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines()
                 if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines[-1:]
        reason = errors[-1].removeprefix("ERROR: ") if errors else f"exit {done.returncode}"
        raise ForgeError(f"pip could not install {PACKAGE}=={version}: {reason}",
                         fix="run it on a login node that reaches PyPI (or your own index: pip "
                             "honours PIP_INDEX_URL, PIP_FIND_LINKS and pip.conf)")


def _imported_from(target: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(target), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True,
                          env=env)
    try:
        found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        reason = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise ForgeError(f"the installed {PACKAGE} does not import ({reason})", path=target,
                         fix="check that this Python can use pip's manylinux wheels, then run "
                             f"`loraforge models fetch {KEY}` again") from None
    if Path(found["file"]).resolve().parent.parent != target.resolve() or CUDA not in \
            found["providers"]:
        raise ForgeError(f"the installed {PACKAGE} was not the onnxruntime that imported ("
                         f"{found['file']}, providers {', '.join(found['providers'])})",
                         path=target, fix=f"run `loraforge models fetch {KEY}` again")
    return found


def gpu_visible(environ: os._Environ[str] | dict[str, str] = os.environ) -> bool:
    """Whether this process is given a GPU: CUDA_VISIBLE_DEVICES names one (SLURM sets it for a
    job with GPUs); where it is unset, none inside a SLURM job (a job without GPUs on a GPU
    node still sees the device files), else an NVIDIA device file exists."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return visible.strip() not in ("", "-1", "NoDevFiles")
    if environ.get("SLURM_JOB_ID"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


@dataclass(frozen=True)
class Choice:
    """Whether the tagger tries CUDA, and a note for the user when it will not."""

    cuda: bool
    note: str | None = None


def choose(storage_root: Path, device: Device) -> Choice:
    """Decide where `dataset tag` runs, and put the GPU runtime first on the import path when it
    runs on the GPU. `cuda` without a usable runtime raises ForgeError."""
    if device == "cpu" or (device == "auto" and not gpu_visible()):
        return Choice(False)
    problem = why_unusable(storage_root)
    if problem is None:
        activate(storage_root)
        return Choice(True)
    if environment_has_cuda():
        return Choice(True)
    if device == "cuda":
        raise ForgeError(f"--device cuda needs the GPU build of onnxruntime: {problem}",
                         fix=f"{FETCH_FIX}; or tag on the CPU: --device cpu")
    return Choice(False, f"a GPU is visible, but tagging runs on the CPU: {problem} ("
                         f"`loraforge models fetch {KEY}` once, on a login node)")


def environment_has_cuda() -> bool:
    """Whether the environment's own onnxruntime is a GPU build (installed by hand)."""
    from importlib import metadata

    try:
        metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return False
    return True


def activate(storage_root: Path) -> None:
    """Put the runtime folder first on the import path; ForgeError if another onnxruntime was
    imported already (it cannot be swapped inside a running process)."""
    path = folder(storage_root)
    loaded = sys.modules.get("onnxruntime")
    if loaded is not None:
        if Path(loaded.__file__ or "").resolve().is_relative_to(path.resolve()):
            return
        raise ForgeError(f"onnxruntime was imported from {loaded.__file__} before the GPU "
                         "build could be put first", fix="tag in a process of its own "
                         "(`loraforge dataset tag`), or with --device cpu")
    sys.path.insert(0, str(path))


def nvidia_roots() -> list[Path]:
    """The folders on the import path that hold an `nvidia/` package tree (the nvidia-* pip
    packages a CUDA torch installs into its environment's site-packages)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    locations = spec.submodule_search_locations if spec is not None else None
    return [Path(location).parent for location in locations or []]


def preload(ort: ModuleType) -> list[Path]:
    """Load the CUDA and cuDNN libraries this onnxruntime build needs, in its order, from the
    nvidia-* pip packages of the environment: onnxruntime's own `preload_dlls` looks for them
    only beside itself, in the runtime folder. What is not found there is left to the system's
    library path (`module load`). Returns the files loaded."""
    import ctypes

    wanted = getattr(ort, "_get_nvidia_dll_paths", None)  # (nvidia, ..., lib, file) in order
    if wanted is None:
        return []
    relative: list[tuple[str, ...]] = []
    with contextlib.suppress(Exception):
        relative = list(wanted(False, True, True))
    loaded = []
    roots = nvidia_roots()
    for parts in relative:
        for root in roots:
            path = root.joinpath(*parts)
            if path.is_file():
                with contextlib.suppress(OSError):
                    ctypes.CDLL(str(path))
                    loaded.append(path)
                    break
    return loaded


def cuda_problem(ort: ModuleType, reported: str | None = None) -> str:
    """Why onnxruntime's CUDA provider did not start: the library the loader could not open
    (the provider's own, then cuDNN, which it opens later), else what onnxruntime reported."""
    import ctypes

    library = Path(ort.__file__ or "").parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not library.is_file():
        return "this onnxruntime has no CUDA provider"
    for name in (str(library), "libcudnn.so.9"):
        try:
            ctypes.CDLL(name)
        except OSError as exc:
            return str(exc).strip().splitlines()[0]
    return reported or "onnxruntime could not start CUDA on this GPU"
