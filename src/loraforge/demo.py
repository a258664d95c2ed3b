"""`loraforge demo DIR`: the whole journey on the embedded tiny model, with no download.

init (tiny settings) -> build the tiny model -> write a sample dataset of two concepts -> check
it -> train a LoRA -> render a posed two-figure scene with it. Every step is the real command's
code; rerunning reuses what is already there.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console

from loraforge.config import CONFIG_NAME, STORAGE_ENV, TINY, load_settings
from loraforge.dataset.check import check_dataset
from loraforge.dataset.sample import SAMPLE_FOLDERS, write_sample_dataset
from loraforge.errors import ForgeError
from loraforge.project import init_project


def check_demo_folder(directory: Path) -> None:
    """The demo only (re)uses a folder of its own: in a user's project it would add its sample
    characters to the dataset, and every later training would learn them."""
    config = directory / CONFIG_NAME
    if not config.is_file():
        return
    settings = load_settings(config)
    fix = "run the demo in a folder of its own, e.g. `loraforge demo demo`"
    if settings.config.models.base != TINY:
        raise ForgeError("is a project of yours (its forge.toml does not use the tiny model): "
                         "the demo would add its sample characters to your dataset",
                         path=directory, fix=fix)
    dataset = settings.dataset_dir
    own = sorted(p.name for p in dataset.iterdir()
                 if p.is_dir() and p.name not in SAMPLE_FOLDERS) if dataset.is_dir() else []
    if own:
        raise ForgeError(f"holds concept folders of its own ({', '.join(own)}): the demo would "
                         "add its sample characters beside them", path=dataset, fix=fix)


def run_demo(directory: Path, console: Console) -> None:
    """The demo keeps everything in `directory`: a storage root exported for the user's own
    work (LORAFORGE_STORAGE_ROOT) is set aside while it runs, else the tiny LoRA would join,
    or be refused beside, the user's runs, and become the newest run that generate picks."""
    exported = os.environ.pop(STORAGE_ENV, None)
    try:
        if exported:
            console.print(f"note: {STORAGE_ENV} is set ({exported}); the demo leaves that "
                          f"storage alone and keeps its models and runs in {directory}",
                          markup=False)
        _run_demo(directory, console)
    finally:
        if exported is not None:
            os.environ[STORAGE_ENV] = exported


def _run_demo(directory: Path, console: Console) -> None:
    check_demo_folder(directory)
    console.rule("1. project")
    for line in init_project(directory, tiny=True):
        console.print(line, markup=False)
    settings = load_settings(directory / CONFIG_NAME)

    console.rule("2. embedded tiny model")
    from loraforge.models.tiny import ensure_tiny_models

    base, controlnet = ensure_tiny_models(settings.storage_root)
    console.print(f"base model: {base}\nControlNet: {controlnet}", markup=False)

    console.rule("3. sample dataset")
    written = write_sample_dataset(settings.dataset_dir)
    console.print(f"{len(written)} new files in {settings.dataset_dir}", markup=False)
    check_dataset(settings, False, console)

    console.rule("4. train")
    from loraforge.report.html import write_report
    from loraforge.train.run import train

    result = train(settings, None, restart=False, report=write_report)
    console.print(f"LoRA: {result.final}", markup=False)

    console.rule("5. generate")
    from loraforge.generate.run import generate
    from loraforge.generate.scenes import Options

    images = generate(settings, Options(prompt="red_knight, blue_mage, 2 characters standing "
                                        "side by side", loras=[str(result.final)],
                                        pose="random", figures=2, name="demo"),
                      lambda line: console.print(line, markup=False))
    console.print(f"scene: {images[-1]}", markup=False)
    console.print(f"report: {result.final.parent / 'report.html'}", markup=False)
