"""Shared fixtures: run the real CLI in a subprocess, and build the tiny model once per session."""

from __future__ import annotations

import errno
import functools
import os

# One torch (OpenMP) thread in this process and every process it starts, set before torch is
# imported. On the tiny model one thread trains as fast as two, and where processes run side by
# side (a run beside the one it is compared with, ranks, SLURM jobs, the taught work in the
# background) two threads each fight over 2 cores: two trainings at once took 22 s instead of 9.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import pickle
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock
from taught_work import RESULTS, STATUS

from loraforge.project import toml_value

# Modules that train, render or start processes. With the SLURM tests and the tests marked slow
# one by one, about 140 of the suite's ~890 tests but most of its time; `make check` (pytest
# -m "not slow and not slurm", two xdist workers on 2 cores) runs the rest in about 3.5 minutes.
SLOW_MODULES = frozenset({"test_demo", "test_full_disk", "test_generate", "test_models_import",
                          "test_report", "test_shared_storage", "test_train", "test_train_data",
                          "test_train_distributed", "test_train_state"})


# The session fixture behind the taught tiny base (tests/taught_work.py, in the background).
TAUGHT = "taught_work"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        group = _worker_group(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    # The tests on the taught tiny base go last: it is made in the background meanwhile.
    taught = [item for item in items if TAUGHT in _fixtures(item)]
    items[:] = [item for item in items if item not in taught] + taught


def _worker_group(item: pytest.Item) -> str | None:
    """Under pytest-xdist (`make test` runs `-n auto --dist loadgroup`), the tests that share
    something made once go to one worker: the SLURM cluster's tests (one cluster on this machine's
    munge), and the tests of a module that share one of its module fixtures (a trained run, a
    loaded pipeline), which each worker would otherwise make again."""
    if "slurm_cluster" in _fixtures(item):
        return "slurm"
    module = item.nodeid.split("::")[0]
    # pytest has no public way to a test's fixture definitions; _fixtureinfo is what it uses.
    definitions = getattr(item, "_fixtureinfo", None)
    for defs in (definitions.name2fixturedefs.values() if definitions else ()):
        if defs[-1].scope == "module" and defs[-1].baseid == module:
            return module
    return None


def _fixtures(item: pytest.Item) -> list[str]:
    """The fixtures a collected test uses, its dependencies' included."""
    return getattr(item, "fixturenames", [])


def run_cli(*args: str | os.PathLike[str], cwd: Path | None = None,
            env: dict[str, str] | None = None, timeout: float = 600,
            ) -> subprocess.CompletedProcess[str]:
    """Run `loraforge ARGS` as a user would, in a fresh process; return its exit code and output."""
    full_env = {k: v for k, v in os.environ.items() if k != "LORAFORGE_STORAGE_ROOT"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "loraforge", *map(str, args)], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def assert_user_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """A bad input: exit code 1, a message containing every needle, and no traceback."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    """In-process training and generation switch the process offline (os.environ); later
    tests, and the subprocesses they start, must not inherit that."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """In-process rendering on a 2-core machine shared with other processes: one torch thread
    is several times faster than two fighting over the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A storage root holding the embedded tiny base model and ControlNet, built once."""
    from loraforge.models.tiny import ensure_tiny_models

    root = tmp_path_factory.mktemp("store")
    ensure_tiny_models(root)
    return root


class TaughtWork:
    """tests/taught_work.py in the background: the taught tiny base and the runs on it.

    Made once per test run: under pytest-xdist (`-n`) the first worker that asks starts it in a
    folder all workers share, and the others wait for the same files."""

    def __init__(self, shared: Path, run: bool, oracle: bool) -> None:
        self.store, self.work = shared / "taught", shared / "taught_run"
        self.log = self.work / "taught_work.log"
        self.process: subprocess.Popen[bytes] | None = None
        with FileLock(shared / "taught.lock"):
            if self.work.exists():
                return
            self.store.mkdir()
            self.work.mkdir()
            flags = [flag for flag, wanted in (("--run", run), ("--oracle", oracle)) if wanted]
            # At the lowest priority: it takes what the tests leave idle. (Beside xdist's two
            # workers, at its share of the cores instead, the suite took 815 s, not 753 s.)
            command = ["nice", "-n", "19", sys.executable,
                       str(Path(__file__).with_name("taught_work.py")), str(self.store),
                       str(self.work), *flags]
            with self.log.open("wb") as log:
                self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    @functools.cache  # noqa: B019 (one per session, alive as long as the session)
    def results(self) -> dict[str, Any]:
        """Wait for it to finish; its measurements (empty when only the base was asked for),
        read once."""
        status = self.work / STATUS
        deadline = time.monotonic() + 1800
        while not status.exists() or not status.read_text().strip():
            if time.monotonic() > deadline:
                pytest.fail(f"tests/taught_work.py did not finish in 30 minutes:\n"
                            f"{self.log.read_text()[-4000:]}")
            time.sleep(0.5)
        if status.read_text().strip() != "0":
            pytest.fail(f"tests/taught_work.py failed:\n{self.log.read_text()[-4000:]}")
        return pickle.loads((self.work / RESULTS).read_bytes())

    def stop(self, interrupted: bool) -> None:
        """The worker that started it: kill it if the run was cut short, else let it finish
        for the other workers' tests."""
        if self.process is None or self.process.poll() is not None:
            return
        if interrupted:
            self.process.kill()
        self.process.wait()


@pytest.fixture(scope="session")
def taught_work(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                ) -> Iterator[TaughtWork]:
    """Started before the suite's first test where any test needs it (`_taught_early`)."""
    wanted = set().union(*(_fixtures(item) for item in request.session.items))
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # this run's folder: its workers' own folders are inside it
    work = TaughtWork(shared, run="taught_run" in wanted, oracle="taught_oracle" in wanted)
    yield work
    work.stop(interrupted=bool(request.session.shouldstop or request.session.shouldfail))


@pytest.fixture(scope="session", autouse=True)
def _taught_early(request: pytest.FixtureRequest) -> None:
    if any(TAUGHT in _fixtures(item) for item in request.session.items):
        request.getfixturevalue(TAUGHT)


@pytest.fixture(scope="session")
def taught_store(taught_work: TaughtWork) -> Path:
    """A storage root holding the taught tiny base (it denoises flat colours and paints the colour
    its prompt names) and the tiny ControlNet."""
    taught_work.results()
    return taught_work.store


@pytest.fixture(scope="session")
def taught_run(taught_work: TaughtWork) -> tuple[Path, Any]:
    """A finished multi-concept run `ours` on the taught tiny base: `blake` (flat red pictures)
    and `mira` (flat blue), 200 steps with `init --tiny`'s settings (bench/separation.py).
    Returns its project folder (forge.toml, master_dataset/, held_out/, store/) and its
    separation table, measured on held_out/."""
    return taught_work.work, taught_work.results()["ours"]


@pytest.fixture(scope="session")
def taught_oracle(taught_work: TaughtWork) -> Any:
    """The independent diffusers + peft loop on `taught_run`'s data, measured the same way."""
    return taught_work.results()["oracle"]


def draw_character(path: Path, colour: tuple[int, int, int], shape: str, offset: int) -> None:
    """A 256x256 image: a coloured figure on a light background (a stand-in character)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (256, 256), (235, 235, 225))
    draw = ImageDraw.Draw(image)
    box = (60 + offset, 40, 190 + offset, 230)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    else:
        draw.rectangle(box, fill=colour)
    draw.ellipse((100 + offset, 10, 150 + offset, 60), fill=(240, 200, 170))
    image.save(path)


def write_training_project(root: Path, tiny_store: Path, train: dict[str, object] | None = None,
                           ) -> Path:
    """A project: two concepts of two captioned images, the tiny model, fast settings.
    Returns its forge.toml."""
    root.mkdir(parents=True, exist_ok=True)
    for folder, colour, shape in (("1_red_knight", (200, 30, 30), "box"),
                                  ("1_blue_mage", (30, 40, 200), "circle")):
        concept = root / "master_dataset" / folder
        concept.mkdir(parents=True)
        name = folder.split("_", 1)[1]
        for i in range(2):
            draw_character(concept / f"{i}.png", colour, shape, offset=20 * i - 10)
            (concept / f"{i}.txt").write_text(f"{name}, solo, standing, pose {i}")
    values: dict[str, object] = {
        "epochs": 3, "batch_size": 2, "optimizer": "AdamW", "mixed_precision": "no",
        "network_dim": 4, "network_alpha": 2, "unet_lr": 2e-3, "text_encoder_lr": 1e-3,
        "lr_scheduler": "constant", "lr_warmup": 0, "max_token_length": 75,
        "log_every_seconds": 0.01, **(train or {})}
    lines = ["[storage]", 'root = "store"', "[models]",
             f'base = "{tiny_store / "tiny-sd15"}"',
             f'controlnet = "{tiny_store / "tiny-controlnet"}"',
             "[dataset]", "resolution = 64", "[train]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    config = root / "forge.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """`small_disk("8m")`: a tmpfs of that size, mounted for the test (a real disk that fills
    up: ENOSPC from the kernel, not a mock), unmounted after it. Skips the test where mounting
    is not permitted (not root, or a container without CAP_SYS_ADMIN)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755",
                                   "tmpfs", str(point)], capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("no `mount` command here: a full disk needs a small tmpfs")
        if done.returncode != 0:
            pytest.skip("mounting a small tmpfs (the full disk) is not permitted here: "
                        f"{done.stderr.strip() or done.returncode}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


def fill_disk(folder: Path) -> Path:
    """Fill the disk holding `folder` to its last byte with one file; returns it (removing it
    frees the space again)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, bytes(1 << 16))
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    try:  # the last, smaller pieces
        while True:
            os.write(fd, bytes(512))
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    os.close(fd)
    return filler
