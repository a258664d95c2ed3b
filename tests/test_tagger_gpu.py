"""Tagging on a GPU: `models fetch tagger-gpu` installs the real onnxruntime-gpu wheel with the
real pip (from lora_env/wheels/, a local stand-in for PyPI that tests/setup_wheels.sh fills),
`dataset tag` imports it and tries CUDA, and `slurm tag` renders a job that uses it. This machine
has no GPU and no CUDA libraries: a GPU is made "visible" with CUDA_VISIBLE_DEVICES, and the
real runtime then fails to load CUDA, which is what a GPU node without matching CUDA libraries
does. That the tagger then runs on a real GPU cannot be tested here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from conftest import assert_user_error, draw_character, run_cli

from loraforge.models import gpu_runtime

WHEELS = Path(__file__).resolve().parents[1] / "lora_env" / "wheels"
PYTHON_TAG = f"cp{sys.version_info.major}{sys.version_info.minor}"
HAS_WHEEL = any(WHEELS.glob(f"onnxruntime_gpu-{gpu_runtime.VERSION}-{PYTHON_TAG}-*.whl"))
needs_wheel = pytest.mark.skipif(not HAS_WHEEL, reason="no onnxruntime-gpu wheel for this "
                                 "machine (tests/setup_wheels.sh says why)")
ACTIVATE = str(Path(sys.prefix) / "bin" / "activate")
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}
A_GPU = {"CUDA_VISIBLE_DEVICES": "0"}  # what SLURM sets for a job given one GPU


def _project(root: Path) -> Path:
    """A tiny-tagger project with one concept of two uncaptioned pictures."""
    root.mkdir(parents=True)
    (root / "forge.toml").write_text(f'[storage]\nroot = "store"\n[models]\ntagger = "tiny"\n'
                                     f'[slurm]\nenv_activate = "{ACTIVATE}"\n')
    concept = root / "master_dataset" / "10_red_knight"
    concept.mkdir(parents=True)
    draw_character(concept / "0.png", (200, 30, 30), "box", 0)
    draw_character(concept / "1.png", (30, 40, 200), "circle", 20)
    return root


def _offline_index(folder: Path) -> dict[str, str]:
    """pip's own settings for a local package index: only the wheels in `folder`."""
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(folder), "PIP_CONFIG_FILE": "/dev/null"}


def _captions(project: Path) -> list[str]:
    return sorted(p.name for p in (project / "master_dataset").rglob("*.txt"))


@pytest.fixture(scope="module")
def gpu_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project whose storage root holds the GPU runtime, installed once by the real command."""
    if not HAS_WHEEL:
        pytest.skip("no onnxruntime-gpu wheel for this machine")
    project = _project(tmp_path_factory.mktemp("gpu") / "proj")
    # a group-shared storage root (file_mode 0664), and pip set to install for the user (as
    # many clusters' pip.conf is), which --target must win over
    result = run_cli("models", "fetch", "tagger-gpu", "--set", 'storage.file_mode="0664"',
                     cwd=project, env={**_offline_index(WHEELS), "PIP_USER": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    return project


@needs_wheel
def test_fetch_installs_the_gpu_runtime_once_for_this_python(gpu_project: Path) -> None:
    runtime = gpu_project / "store" / "runtimes" / "onnxruntime-gpu"
    record = json.loads((runtime / "runtime.json").read_text())
    assert record["version"] == gpu_runtime.VERSION and record["cuda"] == "13"
    assert record["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert "CUDAExecutionProvider" in record["providers"]
    assert (runtime / "onnxruntime" / "capi" / "libonnxruntime_providers_cuda.so").is_file()
    assert not list(runtime.parent.glob(".*.partial"))
    assert (runtime / "onnxruntime" / "__init__.py").stat().st_mode & 0o777 == 0o664
    assert (runtime / "onnxruntime").stat().st_mode & 0o777 == 0o775
    stamp = (runtime / "runtime.json").stat().st_mtime_ns

    again = run_cli("models", "fetch", "tagger-gpu", cwd=gpu_project, env=_offline_index(WHEELS))
    assert again.returncode == 0, again.stderr
    assert "already installed" in again.stdout
    assert (runtime / "runtime.json").stat().st_mtime_ns == stamp

    # another build that cannot be had leaves the installed one as it was
    other = run_cli("models", "fetch", "tagger-gpu", "--cuda", "12", cwd=gpu_project,
                    env=_offline_index(WHEELS))
    assert_user_error(other, f"onnxruntime-gpu=={gpu_runtime.RELEASES['12']}:")
    assert (runtime / "runtime.json").stat().st_mtime_ns == stamp
    assert not [p for p in runtime.parent.iterdir() if p.suffix in (".partial", ".old")]

    listed = run_cli("models", "list", cwd=gpu_project)
    assert listed.returncode == 0, listed.stderr
    assert (f"tagger GPU runtime: onnxruntime-gpu {gpu_runtime.VERSION} (CUDA 13) in {runtime}"
            in listed.stdout)


@needs_wheel
@pytest.mark.skipif(any(Path("/dev").glob("nvidia[0-9]*")), reason="a real GPU: CUDA may load")
def test_tagging_with_a_visible_gpu_imports_the_gpu_runtime_and_says_why_cuda_failed(
        gpu_project: Path) -> None:
    # --device cuda refuses the CPU: the library the GPU build could not load is named, with
    # the fix, and no caption is written
    forced = run_cli("dataset", "tag", "--device", "cuda", cwd=gpu_project, env=A_GPU)
    assert_user_error(forced, "onnxruntime could not use CUDA", ".so", "CUDA 13",
                      "--device cpu")
    assert _captions(gpu_project) == []

    # auto with a GPU visible: the GPU build is imported (only it has a CUDA provider library
    # to fail on), CUDA fails here, and the pictures are tagged on the CPU with one note
    auto = run_cli("dataset", "tag", cwd=gpu_project, env=A_GPU)
    assert auto.returncode == 0, auto.stderr
    assert "note: tagging on the CPU: onnxruntime could not use CUDA (lib" in auto.stdout
    assert "tagger:" in auto.stdout and " on CPU," in auto.stdout
    assert "Traceback" not in auto.stderr and "[E:onnxruntime" not in auto.stderr
    assert _captions(gpu_project) == ["0.txt", "1.txt"]


@needs_wheel
def test_cuda_libraries_are_loaded_from_the_environments_nvidia_packages(
        gpu_project: Path, tmp_path: Path) -> None:
    """A CUDA torch brings CUDA and cuDNN as nvidia-* pip packages in its site-packages, which
    onnxruntime's own preload never searches from the runtime folder. Stand-ins (copies of this
    machine's libm, real shared libraries) sit where the CUDA 13 and cuDNN wheels put theirs."""
    libm = next(line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                if "/libm.so" in line or "/libm-" in line)
    site = tmp_path / "site-packages"
    stand_ins = [site / "nvidia" / "cu13" / "lib" / "libcublasLt.so.13",
                 site / "nvidia" / "cudnn" / "lib" / "libcudnn.so.9"]
    for path in stand_ins:
        path.parent.mkdir(parents=True)
        shutil.copyfile(libm, path)
    runtime = gpu_project / "store" / "runtimes" / "onnxruntime-gpu"
    code = ("import sys; sys.path[:0] = sys.argv[1:3]; import onnxruntime as ort; "
            "from loraforge.models.gpu_runtime import preload; loaded = preload(ort); "
            "maps = open('/proc/self/maps').read(); "
            "print(ort.__file__); print(*[p for p in loaded if str(p) in maps], sep='\\n')")
    done = subprocess.run([sys.executable, "-c", code, str(runtime), str(site)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(str(runtime))
    assert lines[1:] == [str(path) for path in stand_ins]


@needs_wheel
def test_a_runtime_for_another_python_is_not_used(gpu_project: Path, tmp_path: Path) -> None:
    project = _project(tmp_path / "proj")
    runtime = project / "store" / "runtimes" / "onnxruntime-gpu"
    runtime.mkdir(parents=True)
    record = json.loads((gpu_project / "store" / "runtimes" / "onnxruntime-gpu" /
                         "runtime.json").read_text())
    (runtime / "runtime.json").write_text(json.dumps({**record, "python": "3.99"}))
    result = run_cli("dataset", "tag", "--device", "cuda", cwd=project, env=A_GPU)
    assert_user_error(result, "installed for Python 3.99", "models fetch tagger-gpu")
    assert _captions(project) == []
    listed = run_cli("models", "list", cwd=project)
    assert "tagger GPU runtime: not usable:" in listed.stdout
    assert "installed for Python 3.99" in listed.stdout


def test_without_the_gpu_runtime_tagging_names_the_fetch(tmp_path: Path) -> None:
    project = _project(tmp_path / "proj")
    forced = run_cli("dataset", "tag", "--device", "cuda", cwd=project, env=A_GPU)
    assert_user_error(forced, "--device cuda needs the GPU build of onnxruntime",
                      "loraforge models fetch tagger-gpu")
    assert _captions(project) == []

    auto = run_cli("dataset", "tag", cwd=project, env=A_GPU)
    assert auto.returncode == 0, auto.stderr
    assert ("note: a GPU is visible, but tagging runs on the CPU: the GPU build of onnxruntime "
            "is not installed") in auto.stdout
    assert _captions(project) == ["0.txt", "1.txt"]

    (project / "master_dataset" / "10_red_knight" / "2.png").write_bytes(
        (project / "master_dataset" / "10_red_knight" / "0.png").read_bytes())
    quiet = run_cli("dataset", "tag", cwd=project, env=NO_GPU)
    assert quiet.returncode == 0, quiet.stderr
    assert "note:" not in quiet.stdout and " on CPU," in quiet.stdout


def test_fetch_says_when_pip_cannot_get_the_runtime(tmp_path: Path) -> None:
    project = _project(tmp_path / "proj")
    (tmp_path / "empty-index").mkdir()
    result = run_cli("models", "fetch", "tagger-gpu", cwd=project,
                     env=_offline_index(tmp_path / "empty-index"))
    assert_user_error(result, f"pip could not install onnxruntime-gpu=={gpu_runtime.VERSION}",
                      "No matching distribution", "PIP_INDEX_URL")
    runtimes = project / "store" / "runtimes"
    assert not (runtimes / "onnxruntime-gpu").exists()
    assert not [p for p in runtimes.iterdir() if p.name.endswith(".partial")]

    # a storage root that cannot be written (here: under /proc, which even root cannot)
    unwritable = run_cli("models", "fetch", "tagger-gpu", "--set",
                         'storage.root="/proc/forge-store"', cwd=project)
    assert_user_error(unwritable, "cannot install onnxruntime-gpu here", "storage.root")

    pinned = run_cli("models", "fetch", "tagger-gpu", "--revision", "main", cwd=project)
    assert_user_error(pinned, "pinned to", gpu_runtime.VERSION)


def test_fetch_takes_the_build_for_the_cuda_of_the_gpu_nodes(tmp_path: Path) -> None:
    project = _project(tmp_path / "proj")
    (tmp_path / "empty-index").mkdir()
    index = _offline_index(tmp_path / "empty-index")
    # the build for the CUDA of this environment's torch (a CPU torch: the default, CUDA 13)
    cuda, why = gpu_runtime.detect_cuda()
    default = run_cli("models", "fetch", "tagger-gpu", cwd=project, env=index)
    assert f"for CUDA {cuda} ({why})" in default.stdout
    assert f"onnxruntime-gpu=={gpu_runtime.RELEASES[cuda]}:" in default.stderr
    # CUDA 12 drivers take the last release built for CUDA 12
    older = run_cli("models", "fetch", "tagger-gpu", "--cuda", "12", cwd=project, env=index)
    assert_user_error(older, f"onnxruntime-gpu=={gpu_runtime.RELEASES['12']}:",
                      "No matching distribution")
    assert "for CUDA 12 (--cuda)" in older.stdout
    # a CUDA 12 torch without `+cu` in its version brings nvidia-cuda-runtime-cu12 (its
    # metadata stands in for it here; a `+cu` torch decides before it is looked at)
    if "+cu" not in metadata.version("torch"):
        site = tmp_path / "site" / "nvidia_cuda_runtime_cu12-12.8.90.dist-info"
        site.mkdir(parents=True)
        (site / "METADATA").write_text("Metadata-Version: 2.1\nName: nvidia-cuda-runtime-cu12"
                                       "\nVersion: 12.8.90\n")
        found = run_cli("models", "fetch", "tagger-gpu", cwd=project,
                        env={**index, "PYTHONPATH": str(site.parent)})
        assert "for CUDA 12 (this environment's nvidia-cuda-runtime-cu12 12.8.90)" in \
            found.stdout
        assert f"onnxruntime-gpu=={gpu_runtime.RELEASES['12']}:" in found.stderr
    # a torch whose version names its CUDA decides (its metadata stands in for it, found first)
    for version, expected in (("2.13.0+cu128", "for CUDA 12 (the CUDA of this environment's "
                                               "torch 2.13.0+cu128)"),
                              ("2.13.0+cu118", "for CUDA 13 (this environment's torch "
                                               "2.13.0+cu118 is built for CUDA 11")):
        info = tmp_path / version / f"torch-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: "
                                       f"{version}\n")
        told = run_cli("models", "fetch", "tagger-gpu", cwd=project,
                       env={**index, "PYTHONPATH": str(info.parent)})
        assert expected in told.stdout, told.stdout
    assert_user_error(run_cli("models", "fetch", "tagger-gpu", "--cuda", "11", cwd=project),
                      "built for CUDA 13 and 12 only")
    assert_user_error(run_cli("models", "fetch", "tagger", "--cuda", "12", cwd=project),
                      "models fetch tagger-gpu --cuda 12")


def test_a_gpu_is_visible_where_slurm_or_the_machine_gives_one() -> None:
    assert gpu_runtime.gpu_visible({"CUDA_VISIBLE_DEVICES": "0", "SLURM_JOB_ID": "7"})
    assert gpu_runtime.gpu_visible({"CUDA_VISIBLE_DEVICES": "GPU-5e1f"})
    for hidden in ("", "-1", "NoDevFiles"):
        assert not gpu_runtime.gpu_visible({"CUDA_VISIBLE_DEVICES": hidden})
    # a job without GPUs on a GPU node still sees /dev/nvidia*, but was given none
    assert not gpu_runtime.gpu_visible({"SLURM_JOB_ID": "7"})


def test_slurm_tag_uses_the_gpu_only_with_its_runtime(tmp_path: Path) -> None:
    project = _project(tmp_path / "proj")
    refused = run_cli("slurm", "tag", "--gpus", "1", cwd=project)
    assert_user_error(refused, "asks for a GPU but could only tag on the CPU",
                      "models fetch tagger-gpu", "--gpus 0")
    assert not (project / "store" / "jobs").exists()

    shown = run_cli("slurm", "tag", "--gpus", "1", "--dry-run", cwd=project)
    assert shown.returncode == 0, shown.stderr
    assert "# note: the job asks for a GPU" in shown.stdout
    assert "loraforge dataset tag" in shown.stdout and "--device cuda" in shown.stdout

    cpu = run_cli("slurm", "tag", "--gpus", "0", "--dry-run", cwd=project)
    assert cpu.returncode == 0, cpu.stderr
    assert "--device cpu" in cpu.stdout and "# note:" not in cpu.stdout
    assert "--gres" not in cpu.stdout


@needs_wheel
def test_slurm_tag_with_the_runtime_renders_a_gpu_job_without_a_note(gpu_project: Path) -> None:
    shown = run_cli("slurm", "tag", "--gpus", "1", "--dry-run", cwd=gpu_project)
    assert shown.returncode == 0, shown.stderr
    assert "--device cuda" in shown.stdout and "# note" not in shown.stdout
    assert "#SBATCH --gres=gpu:1" in shown.stdout
