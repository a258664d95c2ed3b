"""The bad-input corpus: one hostile input per case, through the real command line.

Each case builds a small project (tiny model, two concepts), spoils one thing, runs one
`loraforge` command in this process through the CLI's entry point (`loraforge.cli.main`: the
real argument parsing and `error:`/`fix:` printing, without a 1-2 s interpreter start per case)
and asserts what a user must see: exit code 1, a message naming the file, key or value and a
fix, no traceback, and not one file of the project created, changed or removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import assert_user_error, draw_character, write_training_project

from loraforge.cli import main
from loraforge.config import STORAGE_ENV

DS = "master_dataset"
KNIGHT = f"{DS}/1_red_knight"


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def run_main(args: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch,
             capsys: pytest.CaptureFixture[str]) -> Ran:
    """`loraforge ARGS` in `cwd`, in this process; an exception other than SystemExit (a
    traceback a user would see) fails the test by itself."""
    monkeypatch.chdir(cwd)
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", ["loraforge", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main()
    captured = capsys.readouterr()
    code = stop.value.code
    return Ran(code if isinstance(code, int) else (0 if code is None else 1), captured.out,
               captured.err)


def _state(path: Path) -> str:
    if path.is_symlink():
        return f"link to {path.readlink()}"
    return "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with the sha256 of its bytes ("dir" for folders)."""
    return {p.relative_to(root).as_posix(): _state(p) for p in sorted(root.rglob("*"))}


def assert_refused(ran: Ran, *needles: str) -> None:
    """Exit 1; `error:` with every needle; a `fix:`; no traceback."""
    assert ran.code == 1, (ran.code, ran.text)
    assert "Traceback" not in ran.text, ran.text
    assert "error:" in ran.err and "fix:" in ran.err, ran.text
    for needle in needles:
        assert needle in ran.text, (needle, ran.text)


# --- how each case spoils the project ----------------------------------------------------------

Setup = Callable[[Path], None]


def toml(*lines: str) -> Setup:
    """Append lines (new tables) to forge.toml."""
    def apply(root: Path) -> None:
        config = root / "forge.toml"
        config.write_text(config.read_text() + "\n".join(lines) + "\n")
    return apply


def key(section: str, line: str) -> Setup:
    """Set one `key = value` line in a [section] of forge.toml, replacing the key's line there."""
    def apply(root: Path) -> None:
        config = root / "forge.toml"
        name = line.split("=", 1)[0].strip()
        lines, current = [], None
        for text in config.read_text().splitlines():
            if text.startswith("["):
                current = text.strip("[] ")
            elif current == section and text.split("=", 1)[0].strip() == name:
                continue
            lines.append(text)
        if f"[{section}]" not in lines:
            lines.append(f"[{section}]")
        lines.insert(lines.index(f"[{section}]") + 1, line)
        config.write_text("\n".join(lines) + "\n")
    return apply


def train_key(line: str) -> Setup:
    return key("train", line)


def write(rel: str, data: bytes | str) -> Setup:
    def apply(root: Path) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            path.write_text(data, encoding="utf-8")
        else:
            path.write_bytes(data)
    return apply


def rename(rel: str, new: str) -> Setup:
    def apply(root: Path) -> None:
        (root / rel).rename(root / new)
    return apply


def link_loop(rel: str) -> Setup:
    """`rel` and `rel`-back: two symbolic links pointing at each other."""
    def apply(root: Path) -> None:
        (root / rel).symlink_to(f"{rel}-back")
        (root / f"{rel}-back").symlink_to(rel)
    return apply


def both(*setups: Setup) -> Setup:
    def apply(root: Path) -> None:
        for setup in setups:
            setup(root)
    return apply


def image(rel: str, colour: tuple[int, int, int] = (20, 160, 20)) -> Setup:
    def apply(root: Path) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        draw_character(root / rel, colour, "box", 0)
    return apply


def nothing(_root: Path) -> None:
    return None


def pickled(rel: str) -> Setup:
    """A pickle (as torch.save of the old format writes), whatever its name."""
    return write(rel, pickle.dumps({"state_dict": {"x": [1, 2, 3]}}, protocol=2))


REG_BOTH = toml("[dataset.concepts.red_knight]", "is_reg = true",
                "[dataset.concepts.blue_mage]", "is_reg = true")
HUGE_REPEATS = rename(KNIGHT, f"{DS}/99999999999999999999_red_knight")
TINY_BASE = "store/tiny-sd15"

# (id, setup, command, needles)
CASES: list[tuple[str, Setup, list[str], tuple[str, ...]]] = [
    # config: forge.toml and --set
    ("config-unknown-key", train_key("epoch = 3"), ["config", "show"],
     ("forge.toml", "unknown key `train.epoch`", "did you mean `train.epochs`?")),
    ("config-toml-syntax", toml("[train", "epochs = 3"), ["config", "show"],
     ("forge.toml", "is not valid TOML")),
    ("config-not-utf8", write("forge.toml", b"[train]\nrun_name = \"caf\xe9\"\n"),
     ["config", "show"], ("forge.toml", "is not UTF-8")),
    ("config-missing-file", nothing, ["config", "show", "--config", "nope.toml"],
     ("nope.toml", "config file not found")),
    ("set-without-equals", nothing, ["config", "show", "--set", "train.epochs"],
     ("train.epochs", "is not key=value")),
    ("set-without-section", nothing, ["config", "show", "--set", "epochs=3"],
     ("`epochs`", "must be section.key")),
    ("set-bad-value", nothing, ["config", "show", "--set", "train.epochs=0"],
     ("--set train.epochs=0", "greater than or equal to 1")),
    ("set-into-a-value-not-a-section", write("forge.toml", b"train = 3\n"),
     ["config", "show", "--set", "train.epochs=1"],
     ("--set train.epochs=1: the config file sets `train` to a value, not a [train] section",
      "under a `[train]` line")),
    ("set-section-is-a-value", nothing, ["config", "show", "--set", "seed.x=1"],
     ("error: unknown key `seed` (--set seed.x=1)", "valid keys: storage")),
    ("resolution-above-max-bucket", key("dataset", "resolution = 2048"), ["config", "show"],
     ("dataset", "resolution (2048) is above max_bucket (1024)",
      "raise dataset.max_bucket to at least 2048")),
    ("resolution-above-max-bucket-set", nothing,
     ["dataset", "check", "--set", "dataset.max_bucket=512", "--set",
      "dataset.resolution=768"], ("--set dataset.max_bucket=512 --set dataset.resolution=768",
                                  "resolution (768) is above max_bucket (512)")),
    ("resolution-not-multiple-of-8", nothing, ["config", "show", "--set",
                                                "dataset.resolution=100"],
     ("dataset.resolution=100", "must be a multiple of 8")),
    ("min-bucket-above-max", nothing, ["config", "show", "--set", "dataset.min_bucket=900",
                                       "--set", "dataset.max_bucket=800"],
     ("min_bucket (900) is above max_bucket (800)",)),
    ("no-bucket-step-multiple", nothing,
     ["dataset", "check", "--set", "dataset.min_bucket=300", "--set",
      "dataset.max_bucket=310", "--set", "dataset.resolution=304"],
     ("no multiple of bucket_step (64) lies between 300 and max_bucket (310)",)),
    ("sample-prompt-unknown-flag", train_key('sample_prompts = ["knight --x 3"]'),
     ["config", "show"], ("forge.toml", "train.sample_prompts", "unknown flag `--x`",
                          "known flags")),
    ("sample-prompt-bad-number", train_key('sample_prompts = ["knight --w wide"]'),
     ["dataset", "check"], ("train.sample_prompts", "--w (width) needs a whole number",
                            "got `wide`")),
    ("sample-prompt-no-text", train_key('sample_prompts = ["--w 512"]'), ["config", "show"],
     ("train.sample_prompts", "no prompt text before its flags")),
    ("sample-prompt-flag-twice", train_key('sample_prompts = ["knight --s 2 --s 3"]'),
     ["train"], ("train.sample_prompts", "--s (steps) is given twice")),
    ("optimizer-typo", train_key('optimizer = "adamw"'), ["config", "show"],
     ("train.optimizer", "did you mean AdamW?")),
    ("file-mode-not-octal", key("storage", 'file_mode = "0999"'), ["config", "show"],
     ("storage.file_mode", "octal")),
    ("preview-sampler-typo", key("train", 'sample_sampler = "Euler ax"'), ["config", "show"],
     ("train.sample_sampler", "unknown sampler `Euler ax`", "did you mean `Euler a`?")),
    ("default-sampler-typo-queued", key("generate", 'sampler = "DPM++ 3M"'),
     ["slurm", "generate", "--dry-run"], ("generate.sampler", "unknown sampler `DPM++ 3M`")),
    ("dataset-path-a-link-loop", link_loop("loop"),
     ["dataset", "check", "--set", "dataset.path=loop"], ("loop", "is a loop of symbolic links")),
    ("storage-root-a-link-loop", link_loop("loop"),
     ["models", "list", "--set", "storage.root=loop"], ("loop", "is a loop of symbolic links")),
    ("dataset-path-is-the-project", nothing, ["dataset", "check", "--set", 'dataset.path=""'],
     ("is a project or storage folder (it holds forge.toml, master_dataset", "not a dataset",
      "set dataset.path")),
    ("finished-run-record-without-settings", both(
        write("store/Multi_Concept_Output/rx/run.json", '{"status": "finished", "config": 5}'),
        write("store/Multi_Concept_Output/rx/rx.safetensors", b"kept")),
     ["train", "--run", "rx"], ("rx/run.json", "cannot be read (it records no settings)",
                                "its LoRA rx.safetensors is untouched")),
    ("run-record-damaged", write("store/Multi_Concept_Output/rx/run.json", '{"status": "fin'),
     ["train", "--run", "rx"], ("rx/run.json", "the run's record cannot be read (not JSON",
                                "move it away", "run.json.damaged", "--restart")),
    ("run-folder-is-a-file", write("store/Multi_Concept_Output/rx", "mine\n"),
     ["train", "--run", "rx"], ("Multi_Concept_Output/rx", "is a file where the run's folder")),
    ("caption-extension-of-a-picture", nothing,
     ["dataset", "tag", "--set", "dataset.caption_extension=.png"],
     ("dataset.caption_extension", "'.png' is a picture's extension", "'.txt'")),
    ("config-option-is-a-folder", nothing, ["config", "show", "--config", "master_dataset"],
     ("master_dataset", "is a folder, not a config file")),
    ("config-option-is-the-project-folder", write("lab/forge.toml", "[train]\nepochs = 2\n"),
     ["config", "show", "--config", "lab"],
     ("lab: is a folder, not a config file", "pass the config inside it: --config lab/forge.toml")),
    ("file-mode-locks-the-owner-out", nothing,
     ["dataset", "tags", "--remove", "solo", "--set", "storage.file_mode=0000"],
     ("storage.file_mode", "owner needs read and write")),
    ("file-mode-bare-number", key("storage", "file_mode = 644"), ["config", "show"],
     ("storage.file_mode", 'in quotes, such as "0644"', "644 would be read as decimal")),
    ("caption-extension-without-dot", key("dataset", 'caption_extension = "txt"'),
     ["dataset", "check"], ("dataset.caption_extension", "must look like '.txt'")),
    ("mixed-precision-unknown", train_key('mixed_precision = "fp8"'), ["train"],
     ("train.mixed_precision", "'fp8'")),
    ("concept-override-unknown-key", toml("[dataset.concepts.red_knight]", "is_regular = 1"),
     ["dataset", "check"],
     ("unknown key `dataset.concepts.red_knight.is_regular`", "did you mean")),
    # dataset: master_dataset/
    ("repeats-overflow", HUGE_REPEATS, ["dataset", "check"],
     ("99999999999999999999_red_knight", "at most 1000 are allowed", "mv ")),
    ("repeats-overflow-train", HUGE_REPEATS, ["train"], ("at most 1000 are allowed",)),
    ("repeats-zero", rename(KNIGHT, f"{DS}/0_red_knight"), ["dataset", "check"],
     ("0_red_knight", "has 0 repeats")),
    ("no-repeat-count", rename(KNIGHT, f"{DS}/red_knight"), ["dataset", "check"],
     ("red_knight", "does not start with a repeat count", "10_red_knight")),
    ("only-regularisation", REG_BOTH, ["dataset", "check"],
     ("every concept is a regularisation concept", "[dataset.concepts.red_knight]",
      "nothing to train")),
    ("only-regularisation-train", REG_BOTH, ["train"],
     ("every concept is a regularisation concept",)),
    ("override-of-unknown-concept", toml("[dataset.concepts.green_elf]", "flip_aug = true"),
     ["dataset", "check"], ("green_elf", "not a concept folder", "red_knight")),
    ("corrupt-png", write(f"{KNIGHT}/2.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64),
     ["dataset", "check"], ("2.png", "corrupt or truncated")),
    ("empty-image", write(f"{KNIGHT}/2.png", b""), ["dataset", "check"],
     ("2.png", "is empty (0 bytes)")),
    ("pdf-in-concept", write(f"{KNIGHT}/notes.pdf", b"%PDF-1.4\n%..."), ["dataset", "check"],
     ("notes.pdf", "a PDF document")),
    ("gif-in-concept", write(f"{KNIGHT}/anim.gif", b"GIF89a" + b"\x00" * 32),
     ["dataset", "check"], ("anim.gif", "is a GIF image")),
    ("kohya-npz", write(f"{KNIGHT}/0.npz", b"PK\x03\x04"), ["dataset", "check"],
     ("0.npz", "kohya latent cache")),
    ("utf16-caption", write(f"{KNIGHT}/0.txt", "red_knight".encode("utf-16")),
     ["dataset", "check"], ("0.txt", "is UTF-16 text", "iconv")),
    ("image-at-dataset-root", image(f"{DS}/stray.png"), ["dataset", "check"],
     ("stray.png", "outside any concept folder")),
    ("folder-in-concept", image(f"{KNIGHT}/more/3.png"), ["dataset", "check"],
     ("more", "is a folder inside a concept folder")),
    ("same-stem-twice", image(f"{KNIGHT}/0.jpg"), ["dataset", "check"],
     ("0.jpg", "has the same name as 0.png")),
    ("concept-without-images", write(f"{DS}/3_green_elf/.keep", ""), ["dataset", "check"],
     ("3_green_elf", "has no images")),
    ("dataset-path-missing", key("dataset", 'path = "pictures"'), ["dataset", "check"],
     ("pictures", "dataset folder not found")),
    ("dataset-path-is-a-file", both(write("pictures", "x"), key("dataset",
                                                                'path = "pictures"')),
     ["dataset", "check"], ("pictures", "is not a folder")),
    ("caption-with-other-extension", write(f"{KNIGHT}/0.caption", "red_knight"),
     ["dataset", "check"], ("0.caption", "looks like a caption",
                            'dataset.caption_extension = ".caption"')),
    # train: refused before any model loads
    ("run-name-with-slash", nothing, ["train", "--run", "a/b"],
     ("run name `a/b` is not allowed", "--run blake_v2")),
    ("base-model-missing", key("models", 'base = "AnyLoRA"'), ["train"],
     ("AnyLoRA", "base model not found", "loraforge models fetch")),
    ("base-model-is-a-file", both(write("model.safetensors", b"x"),
                                  key("models", 'base = "../model.safetensors"')),
     ["train"], ("model.safetensors", "is a single-file checkpoint", "models import")),
    # generate and pose
    ("pose-render-png", image("pose.png"), ["pose", "render", "pose.png"],
     ("pose.png", "is a PNG image, not OpenPose JSON", "--pose pose.png")),
    ("pose-render-bad-json", write("pose.json", "{\"people\": 3"), ["pose", "render",
                                                                  "pose.json"],
     ("pose.json",)),
    ("pose-render-missing", nothing, ["pose", "render", "nope.json"],
     ("nope.json", "no such file")),
    ("pose-random-too-short", nothing, ["pose", "random", "-o", "p.png", "--size", "72x72"],
     ("72x72 canvas is too short",)),
    ("pose-random-too-many", nothing, ["pose", "random", "-o", "p.png", "--size", "256x256",
                                       "--figures", "9"], ("9 figures do not fit",)),
    ("pose-json-under-a-file", write("notes", "mine\n"),
     ["pose", "random", "-o", "p.png", "--pose-json", "notes/p.json"],
     ("notes/p.json", "notes is a file, not a folder")),
    ("pose-random-more-than-any-canvas-holds", nothing,
     ["pose", "random", "-o", "p.png", "--size", "256x256", "--figures", "1000"],
     ("1000 figures do not fit", "even the widest canvas, 16384x256, holds at most 256")),
    ("pose-random-bad-size", nothing, ["pose", "random", "-o", "p.png", "--size", "big"],
     ("size 'big' is not WIDTHxHEIGHT",)),
    ("generate-size-blamed", nothing, ["generate", "--size", "72x72", "--pose", "random"],
     ("--size", "too short for a figure")),
    ("generate-lora-missing", nothing, ["generate", "--lora", "none.safetensors"],
     ("none.safetensors", "LoRA file not found")),
    ("generate-lora-pickle", pickled("old.ckpt"), ["generate", "--lora", "old.ckpt"],
     ("old.ckpt", "is a pickled checkpoint")),
    ("generate-pose-missing", nothing, ["generate", "--pose", "nope.png"],
     ("nope.png", "pose map not found")),
    ("generate-scenes-missing", nothing, ["generate", "--scenes", "scenes.toml"],
     ("scenes.toml", "scenes file not found")),
    # models
    ("import-text-as-safetensors", write("model.safetensors", "<html>404 Not Found</html>\n"),
     ["models", "import", "model.safetensors", "--as", "base"],
     ("model.safetensors", "is a text file", "<html>404", "download the model again")),
    ("import-pickle-as-safetensors", pickled("model.safetensors"),
     ["models", "import", "model.safetensors", "--as", "base"],
     ("model.safetensors", "is a pickled checkpoint", "rename this one to .ckpt")),
    ("import-text-as-ckpt", write("model.ckpt", "<!DOCTYPE html><html>Access denied\n"),
     ["models", "import", "model.ckpt", "--as", "base"],
     ("model.ckpt", "is a text file, not a checkpoint", "Access denied", "download the model")),
    ("import-junk-as-ckpt", write("model.ckpt", bytes(range(256))[::-1] * 2),
     ["models", "import", "model.ckpt", "--as", "base"],
     ("model.ckpt", "neither torch's zip nor a pickle", "download it again")),
    ("import-cut-pickle", write("model.ckpt", b"\x80\x02}q\x00(X\x01"),
     ["models", "import", "model.ckpt", "--as", "base"],
     ("model.ckpt", "is not a readable checkpoint", "truncated")),
    ("import-not-a-checkpoint", write("model.txt", "x"),
     ["models", "import", "model.txt", "--as", "base"],
     ("model.txt", "is not a checkpoint file")),
    ("import-missing", nothing, ["models", "import", "gone.safetensors", "--as", "base"],
     ("gone.safetensors", "file not found")),
    ("import-a-folder", write("folder/x", "x"), ["models", "import", "folder", "--as", "base"],
     ("folder", "is a folder")),
    ("import-as-unknown", write("model.safetensors", b"x"),
     ["models", "import", "model.safetensors", "--as", "vae"], ("--as must be base or "
                                                               "controlnet",)),
    ("verify-unknown-model", nothing, ["models", "verify", "nope"],
     ("nope", "model not found")),
    ("verify-a-file", write("model.safetensors", b"x"),
     ["models", "verify", "model.safetensors"],
     ("model.safetensors", "is a file, not a model folder", "loraforge models import")),
    # slurm and runs
    ("slurm-logs-no-jobs", nothing, ["slurm", "logs"],
     ("no jobs were submitted", "loraforge slurm train")),
    ("slurm-status-unknown-run", nothing, ["slurm", "status", "ghost"],
     ("no jobs were submitted",)),
    ("slurm-time-bad", key("slurm", 'time = "soon"'), ["slurm", "train", "--dry-run"],
     ("slurm.time", "soon")),
    ("slurm-mem-bad", key("slurm", 'mem = "lots"'), ["slurm", "train", "--dry-run"],
     ("slurm.mem", "lots")),
    ("slurm-time-bad-set", nothing, ["slurm", "train", "--dry-run", "--set",
                                     "slurm.time=forever"],
     ("error: --set slurm.time=forever: `slurm.time` = 'forever' is not a SLURM time limit",)),
    ("report-unknown-run", nothing, ["report", "ghost"], ("no training run `ghost`",)),
    # more of each family
    ("caption-cp1252", write(f"{KNIGHT}/0.txt", "caf\xe9, knight".encode("cp1252")),
     ["dataset", "check"], ("0.txt", "is not UTF-8 text", "iconv -f")),
    ("concept-name-missing", rename(KNIGHT, f"{DS}/10_"), ["dataset", "check"],
     ("10_", "no concept name after the repeat count")),
    ("concept-name-only-digits", rename(KNIGHT, f"{DS}/10"), ["dataset", "check"],
     ("10", "has a repeat count but no concept name", "10_my_concept")),
    ("broken-link-in-concept", lambda root: (root / KNIGHT / "5.png").symlink_to("gone.png"),
     ["dataset", "check"], ("5.png", "is a broken link")),
    ("generate-sampler-unknown", nothing, ["generate", "--sampler", "Euler b"],
     ("--sampler", "unknown sampler `Euler b`", "use one of")),
    ("generate-cfg-out-of-range", nothing, ["generate", "--cfg", "99"], ("--cfg",)),
    ("config-nan-rate", key("train", "unet_lr = nan"), ["dataset", "check"],
     ("train.unet_lr", "should be a finite number")),
    ("set-inf-scale", nothing, ["config", "show", "--set", "generate.cfg=inf"],
     ("generate.cfg=inf", "should be a finite number")),
    ("generate-scenes-unknown-field", write("scenes.toml", '[[scene]]\nprompt = "x"\nwidht = 5\n'),
     ["generate", "--scenes", "scenes.toml"], ("scenes.toml", "widht")),
    ("generate-lora-weight-not-a-number", write("store/x.safetensors", b"x"),
     ["generate", "--lora", "store/x.safetensors:heavy"],
     ("--lora", "the LoRA weight `heavy`", "is not a number", "store/x.safetensors:0.8")),
    ("pose-render-no-people", write("pose.json", '{"width": 64, "height": 64}'),
     ["pose", "render", "pose.json"], ("pose.json", "has no canvas_width")),
    ("pose-random-json-is-png", nothing, ["pose", "random", "-o", "p.png", "--pose-json", "p.png"],
     ("p.png",)),
    ("slurm-sweep-empty-value", nothing, ["slurm", "sweep", "--dry-run", "--param",
                                          "train.unet_lr="], ("train.unet_lr=", "empty value")),
    ("slurm-partition-bad", key("slurm", 'partition = "a b"'), ["slurm", "train", "--dry-run"],
     ("slurm.partition", "a b")),
]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, tiny_store: Path) -> Path:
    """The unspoiled project: two concepts, the tiny model (linked in as store/, so that
    model folders given by name resolve)."""
    root = tmp_path_factory.mktemp("template")
    write_training_project(root, tiny_store)
    return root


@pytest.fixture()
def project(template: Path, tmp_path: Path) -> Path:
    import shutil

    root = tmp_path / "project"
    shutil.copytree(template, root)
    return root


@pytest.mark.parametrize(("setup", "args", "needles"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly_and_changes_nothing(
        project: Path, setup: Setup, args: list[str], needles: tuple[str, ...],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    setup(project)
    before = snapshot(project)
    ran = run_main(args, project, monkeypatch, capsys)
    assert_refused(ran, *needles)
    after = snapshot(project)
    assert {path: after.get(path) for path in before} == before  # nothing lost or changed
    new = set(after) - set(before)
    if args[0] == "train":  # a refused run may leave its folder, with run.json saying why
        new = {path for path in new if not path.startswith("store")}
    assert not new, new


def test_a_dataset_train_refuses_leaves_no_run_folder(
        project: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Only regularisation concepts: refused before the run folder (lock, run.json) exists."""
    REG_BOTH(project)
    ran = run_main(["train"], project, monkeypatch, capsys)
    assert_refused(ran, "regularisation")
    assert not (project / "store" / "Multi_Concept_Output").exists()


def test_the_corpus_covers_every_command_family() -> None:
    families = {args[0] for _, _, args, _ in CASES}
    assert families >= {"config", "dataset", "train", "generate", "pose", "models", "slurm"}
    assert len(CASES) >= 60


# --- outside a project, and what is only a warning ---------------------------------------------

def test_a_folder_named_forge_toml_is_not_taken_for_no_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The built-in defaults were used in silence, as if there were no config here."""
    (tmp_path / "forge.toml").mkdir()
    ran = run_main(["config", "show"], tmp_path, monkeypatch, capsys)
    assert_refused(ran, "forge.toml: is a folder, so it cannot be this project's forge.toml")
    assert "no forge.toml" not in ran.text


def test_an_error_outside_a_project_says_there_is_no_forge_toml(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    ran = run_main(["dataset", "check"], tmp_path, monkeypatch, capsys)
    assert_refused(ran, "dataset folder not found",
                   f"note: there is no forge.toml in {tmp_path}", "loraforge init")
    assert list(tmp_path.iterdir()) == []
    for args, answer in ((["runs"], "no runs yet"), (["models", "list"], "no models under"),
                         (["slurm", "status"], "no jobs yet")):
        empty = run_main(args, tmp_path, monkeypatch, capsys)
        assert empty.code == 0 and answer in empty.out, empty.text
        assert f"note: there is no forge.toml in {tmp_path}" in empty.err
    inside = run_main(["dataset", "check", "--set", "dataset.path=elsewhere"],
                      write_project_config(tmp_path), monkeypatch, capsys)
    assert_refused(inside, "dataset folder not found")
    assert "no forge.toml" not in inside.text


def write_project_config(root: Path) -> Path:
    (root / "forge.toml").write_text("[train]\nepochs = 1\n")
    return root


def test_two_folders_of_one_concept_are_a_warning(
        project: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """kohya users weight a subset with a second folder (`5_x` beside `10_x`): allowed, and
    said, since it is a mistake when the two are different characters."""
    image(f"{DS}/5_red_knight/9.png")(project)
    ran = run_main(["dataset", "check", "--json"], project, monkeypatch, capsys)
    assert ran.code == 0, ran.text
    assert "1_red_knight and 5_red_knight all train the concept `red_knight`" in ran.err
    assert "rename one folder" in ran.err
    summary = json.loads(ran.out)
    folders = [c["folder"] for c in summary["concepts"]]
    assert folders == ["1_blue_mage", "1_red_knight", "5_red_knight"]
    # one concept of two folders: counted once, its repeats advised on together, no `mv` (each
    # folder renamed to the one advised name moved the second into the first)
    assert summary["totals"]["concepts"] == 2
    knight = [a for a in summary["advice"] if a.startswith("red_knight:")]
    assert any("red_knight: 2 folders together give 1_red_knight 2 x 1 + 5_red_knight 1 x 5 = 7"
               in a for a in knight), knight
    assert not any("_red_knight master_dataset/" in a for a in knight), knight
    assert len(knight) == len(set(knight))


def test_dataset_check_marks_regularisation_concepts(
        project: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    toml("[dataset.concepts.blue_mage]", "is_reg = true")(project)
    ran = run_main(["dataset", "check", "--json"], project, monkeypatch, capsys)
    assert ran.code == 0, ran.text
    flags = {c["name"]: c["is_reg"] for c in json.loads(ran.out)["concepts"]}
    assert flags == {"blue_mage": True, "red_knight": False}
    advice = " ".join(json.loads(ran.out)["advice"])
    assert "red_knight: 2 images x 1 repeats" in advice and "blue_mage:" not in advice
    table = run_main(["dataset", "check"], project, monkeypatch, capsys)
    assert "blue_mage is a regularisation concept (is_reg)" in table.out


def test_a_small_image_is_enlarged_to_its_bucket_unless_no_upscale(
        project: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The warning's claim, checked against the buckets training uses."""
    from PIL import Image

    from loraforge.config import load_settings
    from loraforge.dataset.examples import build_examples
    from loraforge.dataset.scan import scan_dataset

    Image.new("RGB", (96, 96), (9, 9, 9)).save(project / KNIGHT / "small.png")
    ran = run_main(["dataset", "check", "--set", "dataset.resolution=256"], project,
                   monkeypatch, capsys)
    assert ran.code == 0, ran.text
    assert "small.png: is only 96x96 px" in ran.err and "is enlarged to its bucket" in ran.err
    for no_upscale, expected in ((False, (256, 256)), (True, (64, 64))):
        settings = load_settings(project / "forge.toml", [
            "dataset.resolution=256", f"dataset.bucket_no_upscale={str(no_upscale).lower()}"])
        dataset = scan_dataset(settings.dataset_dir)
        (small,) = [e for e in build_examples(dataset, settings.config.dataset, print)
                    if e.path.name == "small.png"]
        assert small.bucket == expected


def test_a_malformed_manifest_is_named_by_list_and_verify(
        project: Path, tiny_store: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    model = project / "store" / "copied"
    shutil.copytree(tiny_store / "tiny-controlnet", model)
    (model / "manifest.json").write_text('{"files": ')
    listed = run_main(["models", "list"], project, monkeypatch, capsys)
    assert listed.code == 0, listed.text
    assert "warning: " in listed.err
    assert "manifest.json: is malformed (not valid JSON" in listed.err
    assert "malformed manifest.json" in listed.out
    verified = run_main(["models", "verify", "copied"], project, monkeypatch, capsys)
    assert verified.code == 1, verified.text
    assert "copied: DAMAGED" in verified.out
    assert "manifest.json is malformed" in verified.out
    assert "no manifest.json" not in verified.out
    # A manifest that lists no weights (hand-edited) cannot call the weights "ok".
    (model / "manifest.json").write_text('{"files": {}}')
    verified = run_main(["models", "verify", "copied"], project, monkeypatch, capsys)
    assert verified.code == 1, verified.text
    assert "manifest.json does not list diffusion_pytorch_model.safetensors" in verified.out
    # A folder that is no model is named as such, not "DAMAGED" with advice to move it aside.
    (project / "store" / "notes").mkdir()
    (project / "store" / "notes" / "todo.txt").write_text("x")
    verified = run_main(["models", "verify", "notes"], project, monkeypatch, capsys)
    assert verified.code == 1 and "is not a model folder" in verified.err, verified.text
    assert "DAMAGED" not in verified.out


def test_a_folder_this_user_may_not_read_is_skipped_by_list_and_verify(
        tiny_store: Path, tmp_path: Path) -> None:
    """Shared lab storage with another user's private folder in it: `models list` and `models
    verify` failed whole ("Permission denied" on a model_index.json it does not hold)."""
    store = tmp_path / "store"
    shutil.copytree(tiny_store / "tiny-controlnet", store / "Mine")
    private = store / "Theirs"
    private.mkdir()
    (private / "model_index.json").write_text("{}")
    private.chmod(0o000)
    prefix: list[str] = []
    if os.geteuid() == 0:  # root reads anything: run the commands without that privilege
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv (util-linux) to run a command as root without "
                        "CAP_DAC_OVERRIDE")
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--"]
    env = {**os.environ, STORAGE_ENV: str(store)}
    try:
        listed, verified, named = (
            subprocess.run([*prefix, sys.executable, "-m", "loraforge", "models", *args],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
            for args in (["list"], ["verify"], ["verify", "Theirs"]))
    finally:
        private.chmod(0o700)
    warning = (f"warning: {private}: cannot be read (Permission denied); skipped (if it is a "
               f"model for you too, its owner can share it: `chmod -R a+rX {private}`)")
    for ran in (listed, verified):
        assert ran.returncode == 0 and "Traceback" not in ran.stderr, ran.stdout + ran.stderr
        assert warning in ran.stderr.splitlines()
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ["NAME", "Mine"]
    assert verified.stdout.splitlines()[0] == "Mine: ok (3 files re-hashed)"
    assert_user_error(named, f"{private}: cannot be read (Permission denied)", "chmod -R a+rX")


def test_verify_names_model_folders_that_cannot_load(
        project: Path, tiny_store: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Copied in by hand (no manifest.json), each of these was "ok": a ControlNet whose weights
    file is cut short, a detector file cut to 100 bytes, and a base model whose U-Net weights
    are only the fp16 variant file, which the loaders never read."""
    import torch
    from safetensors.torch import save_file

    store = project / "store"
    controlnet = shutil.copytree(tiny_store / "tiny-controlnet", store / "cn")
    base = shutil.copytree(tiny_store / "tiny-sd15", store / "base")
    for folder in (controlnet, base):
        (folder / "manifest.json").unlink()
    weights = controlnet / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    unet = base / "unet" / "diffusion_pytorch_model.safetensors"
    unet.rename(unet.with_name("diffusion_pytorch_model.fp16.safetensors"))
    body = store / "pose" / "body_pose_model.safetensors"
    body.parent.mkdir()
    save_file({"model0.conv1_1.weight": torch.zeros(8, 3, 3, 3),
               "model0.conv1_1.bias": torch.zeros(8)}, str(body))
    body.write_bytes(body.read_bytes()[:100])

    verified = run_main(["models", "verify"], project, monkeypatch, capsys)
    assert verified.code == 1, verified.text
    shown = [line for line in verified.out.splitlines() if not line.startswith("  note:")]
    assert shown[:6] == [
        "base: DAMAGED",
        "  problem: unet: holds only diffusion_pytorch_model.fp16.safetensors, a variant file "
        "that is not loaded: rename it to diffusion_pytorch_model.safetensors",
        "cn: DAMAGED",
        "  problem: diffusion_pytorch_model.safetensors: is an incomplete or damaged weights file",
        "pose: DAMAGED",
        "  problem: body_pose_model.safetensors: is an incomplete or damaged weights file"]
    assert "3 model(s) damaged: move each aside and fetch or import it again" in verified.out
