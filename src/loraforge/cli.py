"""The `loraforge` command. Thin: parse, load the config, call one function.

Heavy libraries (torch, diffusers) are imported inside the functions called here, never at the top,
so `--help` and config errors answer at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
import typer.main
from rich.console import Console
from rich.text import Text

from loraforge.config import CONFIG_NAME, Settings, load_settings, outside_project_note
from loraforge.dataset.command import dedupe_command, tag_command, tags_command
from loraforge.errors import ForgeError
from loraforge.fsutil import DISK_FULL, full_disk_error
from loraforge.generate.command import generate_command
from loraforge.models.command import models_app
from loraforge.options import ConfigOpt, JsonOpt, SetOpt
from loraforge.report.command import report_command
from loraforge.slurm.command import runs_command, slurm_app
from loraforge.submitted import load_job_settings
from loraforge.usage import HELP_OPTION_NAMES, conventional, report_usage_error

app = typer.Typer(help="LoRA Forge: multi-concept LoRA training and posed scenes for SD 1.5.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  context_settings={"help_option_names": HELP_OPTION_NAMES})
config_app = typer.Typer(help="Show the resolved configuration.", no_args_is_help=True)
dataset_app = typer.Typer(help="Check the training dataset; caption, curate and dedupe it.",
                          no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(models_app, name="models")
pose_app = typer.Typer(help="OpenPose pose maps: random figures, drawn from pose JSON, or "
                       "extracted from pictures.",
                       no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")
app.add_typer(pose_app, name="pose")
app.add_typer(slurm_app, name="slurm")
app.command("generate")(generate_command)
dataset_app.command("tag")(tag_command)
dataset_app.command("tags")(tags_command)
dataset_app.command("dedupe")(dedupe_command)
app.command("runs")(runs_command)
app.command("report")(report_command)


out = Console(soft_wrap=True, highlight=False)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        out.print(f"loraforge {version('loraforge')}")
        raise typer.Exit()


@app.callback()
def root(version: Annotated[bool, typer.Option(
        "--version", "-V", callback=_print_version, is_eager=True,
        help="Print the version and exit.")] = False) -> None:
    """LoRA Forge: multi-concept LoRA training and posed scenes for SD 1.5."""


def _settings(config: Path | None, overrides: list[str] | None) -> Settings:
    return load_settings(config, overrides or [])


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Project folder.")] = Path("."),
    tiny: Annotated[bool, typer.Option("--tiny", help="Use the embedded tiny model (demo, "
                                       "tests, no downloads).")] = False,
    scripts: Annotated[bool, typer.Option("--scripts", help="Write again the job scripts "
                                          "that no longer ask what forge.toml \\[slurm] asks "
                                          "(the old ones are kept as .bak).")] = False,
) -> None:
    """Write a commented forge.toml, master_dataset/ (with a README), the two SLURM job
    scripts and logs/; never overwrites a file."""
    from loraforge.project import init_project

    for line in init_project(directory, tiny=tiny, scripts=scripts):
        out.print(line, markup=False)


@config_app.command("show")
def config_show(config: ConfigOpt = None, overrides: SetOpt = None, as_json: JsonOpt = False,
                ) -> None:
    """Print the resolved configuration: every key, with defaults and overrides applied."""
    from loraforge.project import show_config

    show_config(_settings(config, overrides), as_json, out)


@dataset_app.command("check")
def dataset_check(config: ConfigOpt = None, overrides: SetOpt = None, as_json: JsonOpt = False,
                  processes: Annotated[int | None, typer.Option(
                      "--processes", min=1, help="Training processes (GPUs) sharing each "
                      "batch; default train.gpus. For a SLURM job: slurm.nodes x GPUs per "
                      "node.")] = None) -> None:
    """Explain every problem in master_dataset/ before a GPU is spent."""
    from loraforge.dataset.check import check_dataset
    from loraforge.slurm.script import drift_note, script_drift

    settings = _settings(config, overrides)
    drift = script_drift(settings) if settings.source is not None else {}
    if drift:  # the next step is `sbatch submit_training.ssub`, which does not read forge.toml
        Console(stderr=True).print(drift_note(drift), markup=False, soft_wrap=True)
    check_dataset(settings, as_json, out, processes or settings.config.train.gpus)


@pose_app.command("random")
def pose_random(
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE",
                                         help="PNG pose map to write.")],
    figures: Annotated[int, typer.Option("--figures", help="Number of people.")] = 2,
    size: Annotated[str, typer.Option("--size", metavar="WxH", help="WIDTHxHEIGHT."
                                      )] = "1024x768",
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same pose.")] = 0,
    pose_json: Annotated[Path | None, typer.Option(
        "--pose-json", metavar="FILE", help="Also write the figures as OpenPose JSON (what "
        "`pose render` and pose editors read).")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Draw plausible random OpenPose figures, side by side, deterministic per seed."""
    from loraforge.generate.poses import random_pose_command

    mode = _settings(config, overrides).file_mode
    for line in random_pose_command(output, figures, size, seed, pose_json, mode):
        out.print(line, markup=False)


@pose_app.command("render")
def pose_render(
    pose_json: Annotated[Path, typer.Argument(help="OpenPose JSON (people[].pose_keypoints_2d)."
                                              )],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="FILE", help="PNG to write (default: beside the JSON, .png)."
        )] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Draw the OpenPose JSON that pose editors exchange as a pose map."""
    from loraforge.generate.poses import render_pose_command

    mode = _settings(config, overrides).file_mode
    for line in render_pose_command(pose_json, output, mode):
        out.print(line, markup=False)


@pose_app.command("extract")
def pose_extract(
    pictures: Annotated[list[Path], typer.Argument(help="Pictures (png, jpg, webp, bmp), or "
                                                   "folders of them.")],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="PNG pose map to write (default: PICTURE.pose.png beside the "
        "picture), or a folder to write NAME.pose.png into (with several pictures, a folder)."
        )] = None,
    json_out: Annotated[Path | None, typer.Option(
        "--pose-json", metavar="FILE",
        help="OpenPose JSON to write (default: beside the PNG, .json).")] = None,
    size: Annotated[str | None, typer.Option(
        "--size", help="WIDTHxHEIGHT of the map (default: generate.width x generate.height)."
        )] = None,
    hands: Annotated[bool, typer.Option(
        "--hands", help="Also detect each person's hands (21 keypoints each; needs "
        "hand_pose_model.safetensors beside the body detector).")] = False,
    face: Annotated[bool, typer.Option(
        "--face", help="Also detect each person's face (70 keypoints; needs "
        "facenet.safetensors beside the body detector).")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Extract again the pictures whose pose map and JSON are already "
        "there (default: they are kept, so a rerun goes on where a stopped one ended). A JSON "
        "edited since it was written is kept even so.")] = False,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Detect every person in pictures (models.detector) and write their OpenPose pose maps
    and JSON, letterboxed onto the scene size."""
    from loraforge.generate.extract import extract_command

    extract_command(_settings(config, overrides), pictures, output, json_out, size,
                    lambda line: out.print(line, markup=False), hands, face, overwrite)


@app.command()
def train(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    run: Annotated[str | None, typer.Option("--run", help="Run name (default: train.run_name)."
                                            )] = None,
    restart: Annotated[bool, typer.Option("--restart", help="Start the run over instead of "
                                          "resuming its newest saved state.")] = False,
) -> None:
    """Train one multi-concept LoRA over all concept folders (resumes an interrupted run).

    With train.gpus > 1 it starts one process per GPU. Exit code 75 means: interrupted by a
    signal, state saved; rerun the same command to resume.
    """
    from loraforge.train.distributed import (
        check_local_gpus,
        launch_local,
        rerun_argv,
        world_from_env,
    )
    from loraforge.train.run import check_inputs
    from loraforge.train.run import train as train_lora
    from loraforge.train.signals import RESUMABLE_EXIT, Interrupted, StopRequest

    world = world_from_env()
    with StopRequest() as stop:  # from the start: a signal while the libraries load too
        try:
            settings, edited = load_job_settings(config, overrides or [])
            processes = settings.config.train.gpus
            if processes > 1 and not world.distributed:  # rank 0 of those started says the note
                check_inputs(settings, run)
                check_local_gpus(processes)
                stop.stop_here(world)
                threads = max(1, len(os.sched_getaffinity(0)) // processes)  # the CPUs we may use
                raise typer.Exit(launch_local(processes, rerun_argv(), threads))
            if edited and world.is_main:  # in a job: forge.toml was edited since its submission
                Console(stderr=True).print(edited, markup=False, soft_wrap=True)
            from loraforge.report.html import write_report

            result = train_lora(settings, run, restart, world, write_report, stop)
        except Interrupted as stopped:
            if not world.is_main:  # rank 0 saved the state and says so
                raise typer.Exit(RESUMABLE_EXIT) from None
            Console(stderr=True).print(
                "interrupted: state saved; rerun the same command to resume" if stopped.saved
                else "interrupted before the first step (nothing to save); rerun the same "
                "command to start")
            raise typer.Exit(RESUMABLE_EXIT) from None
    if world.is_main:
        if result.trainer is None:
            said = (f"; {result.note}" if result.note else
                    " with these settings; pass --restart to train it again")
            Console(stderr=True).print(f"run `{result.final.parent.name}` had already "
                                       f"finished{said}", markup=False, soft_wrap=True)
        out.print(f"LoRA: {result.final}", markup=False)


@app.command("eval")
def eval_run(
    run: Annotated[str | None, typer.Argument(help="Run name (default: this project's newest "
                                              "finished run).")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
    held_out: Annotated[Path | None, typer.Option("--held-out", help="Folder of held-out "
                        "images in the dataset's layout (<repeats>_<name>/); concepts without "
                        "one are measured on their training images with fresh noise.")] = None,
) -> None:
    """Concept separation of a finished run: each concept's denoising loss with its own
    trigger, with every other concept's trigger and without the LoRA, at fixed noise and
    timesteps. Writes separation.json into the run folder and shows it in its report."""
    import json

    from loraforge.report.command import find_run
    from loraforge.report.html import write_report
    from loraforge.train.separation import (
        measure,
        newest_finished_run,
        print_table,
        write_separation,
    )

    settings = _settings(config, overrides)
    if run is not None:
        run_dir = find_run(settings.runs_dir, run)
    else:
        chosen = newest_finished_run(settings.runs_dir, settings.base_dir)
        run_dir = chosen.run_dir
        Console(stderr=True).print(f"note: no run named: measuring {chosen.said}",
                                   markup=False, soft_wrap=True)
    result = measure(settings, run_dir, held_out)
    path = write_separation(run_dir, result, settings.file_mode)
    write_report(run_dir, settings.file_mode)
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
    else:
        print_table(result, out)
        out.print(f"written: {path}", markup=False)


@app.command()
def demo(directory: Annotated[Path, typer.Argument(
        help="Folder to create, or an earlier demo's to reuse (a project of yours is refused)."
        )] = Path("demo")) -> None:
    """The whole journey on the embedded tiny model: dataset, check, train, posed scene.
    Interrupted while it trains (Ctrl-C, a signal), it saves the training's state and exits 75:
    the same command goes on from there."""
    from loraforge.demo import run_demo
    from loraforge.train.signals import RESUMABLE_EXIT, Interrupted

    try:
        run_demo(directory, out)
    except Interrupted as stop:
        done = "state saved" if stop.saved else "nothing to save yet"
        Console(stderr=True).print(f"interrupted while training ({done}); rerun the same "
                                   "command (or `make demo`) to go on", markup=False)
        raise typer.Exit(RESUMABLE_EXIT) from None


#: Commands whose errors the built-in defaults may explain, outside a project (not init and
#: demo; nor pose, which reads forge.toml for the detector and file modes only, and whose
#: errors are about its pictures and output files).
PROJECT_COMMANDS = ("config", "dataset", "train", "generate", "models", "slurm", "runs",
                    "report", "eval")


def _project_note(args: list[str]) -> str | None:
    """For an error of a command that reads forge.toml run where there is none: say so, since
    the built-in defaults (storage here, master_dataset/ here) then explain the error."""
    if not args or args[0] not in PROJECT_COMMANDS:
        return None
    if any(a in ("--config", "-c") or a.startswith("--config=") for a in args):
        return None
    try:
        if (Path.cwd() / CONFIG_NAME).exists():  # a file, or a folder the error named
            return None
    except FileNotFoundError:  # the folder is gone: the error said so
        return None
    return outside_project_note()


#: What a command stopped by a full disk leaves (its files are written whole, or not at all).
FULL_DISK_KEPT = ("that file was left as it was (nothing half-written), and the files written "
                  "before it are kept")


class _Terminated(BaseException):
    """SIGTERM (`kill`, `scancel`, a job's time limit) outside training, which saves its state on
    its own: raised where the program is, so half-written files are removed on the way out."""


def _terminated(_number: int, _frame: object) -> None:
    raise _Terminated


def main() -> None:
    """Entry point: user errors become one message and a non-zero exit, never a traceback."""
    import signal

    err = Console(stderr=True)
    command = typer.main.get_command(app)
    conventional(command)
    if sys.argv[1:2] != ["train"]:  # train catches it itself, as a resumable stop (exit 75)
        signal.signal(signal.SIGTERM, _terminated)
    try:
        try:
            code = command.main(prog_name="loraforge", standalone_mode=False)
        except OSError as exc:  # a refusal of the file system that no check foresaw
            if exc.errno in DISK_FULL:  # files are written whole (fsutil), or not at all
                path = exc.filename2 or exc.filename
                raise full_disk_error(exc, path, FULL_DISK_KEPT if path else
                                      "the files written before are kept") from None
            # a rename names its target second: that is the path the user knows
            raise ForgeError(exc.strerror or str(exc), path=exc.filename2 or exc.filename,
                             fix="check that this path is what it should be (a folder or a "
                                 "file), that its folder exists and that you may write there; "
                                 "then run the command again") from None
    except typer.TyperException as exc:
        sys.exit(report_usage_error(exc, err))
    except ForgeError as exc:
        err.print(Text.assemble(("error: ", "bold red"), str(exc)), soft_wrap=True)
        note = _project_note(sys.argv[1:])
        if note:
            err.print(note, soft_wrap=True, markup=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except _Terminated:
        err.print("terminated (SIGTERM)")
        sys.exit(143)  # what a shell reports for a process that SIGTERM ended
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
