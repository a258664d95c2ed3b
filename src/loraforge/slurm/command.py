"""`loraforge slurm ...` and `loraforge runs`. Thin: parse, then call into loraforge.slurm.

Only typer and pathlib at the top: the work is imported inside each command.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from loraforge.options import ConfigOpt, JsonOpt, SetOpt, probability

if TYPE_CHECKING:
    from rich.console import Console

    from loraforge.config import Settings
    from loraforge.slurm.jobs import GenerateArgs, Options

slurm_app = typer.Typer(help="Render and submit SLURM job scripts; watch and cancel jobs.",
                        no_args_is_help=True)

RunOpt = Annotated[str | None, typer.Option("--run", help="Run name (default: train.run_name).")]
GpusOpt = Annotated[str | None, typer.Option("--gpus", metavar="[TYPE:]N",
                                             help="GPUs per node, N or TYPE:N (default: "
                                             "slurm.gpus).")]
DryOpt = Annotated[bool, typer.Option("--dry-run", help="Print the job script(s) and the sbatch "
                   "call; write and submit nothing.")]
PromptOpt = Annotated[str | None, typer.Option("--prompt", "-p", help="Prompt (default: "
                      "generate.prompt).")]
NegativeOpt = Annotated[str | None, typer.Option("--negative", "-n", help="Negative prompt "
                        "(default: generate.negative).")]
NameOpt = Annotated[str | None, typer.Option("--name", help="Scene name (output "
                    "<name>-<seed>.png).")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed (default: generate.seed).")]
LoraOpt = Annotated[list[str] | None, typer.Option("--lora", metavar="LORA[:W]",
                                                   help="LoRA to apply, as `loraforge generate "
                                                   "--lora` takes it (repeatable).")]
PoseOpt = Annotated[str | None, typer.Option("--pose", metavar="FILE|random",
                                             help="Pose map or OpenPose JSON.")]
ScenesOpt = Annotated[str | None, typer.Option("--scenes", metavar="FILE", help="Scenes file.")]
FigureOpt = Annotated[list[str] | None, typer.Option(
    "--figure", metavar="CHARACTER:PROMPT", help="Cast a posed figure, as `loraforge generate "
    "--figure` takes it (repeatable).")]
RunArg = Annotated[str | None, typer.Argument(help="Run name or job id, of any project on the "
                   "storage root (default: this project's newest jobs).")]


def _options(config: Path | None, overrides: list[str] | None, gpus: str | None,
             dry_run: bool) -> Options:
    from loraforge.slurm.jobs import Options

    return Options(config, list(overrides or []), gpus, dry_run)


def _generate_args(prompt: str | None, negative: str | None, seed: int | None,
                   lora: list[str] | None, pose: str | None, scenes: str | None,
                   name: str | None, figure: list[str] | None) -> GenerateArgs:
    from loraforge.slurm.jobs import GenerateArgs

    return GenerateArgs(prompt=prompt, negative=negative, seed=seed, lora=list(lora or []),
                        pose=pose, scenes=scenes, name=name, figure=list(figure or []))


def _settings(config: Path | None, overrides: list[str] | None) -> Settings:
    from loraforge.config import load_settings

    return load_settings(config, list(overrides or []))


def _preflight(options: Options, *checks: str, run: str | None = None,
               concepts: list[str] | None = None, sets: list[str] | None = None) -> None:
    """What the job would fail on, said now, before it waits in the queue and takes a node:
    "train" (the run name, the dataset and the base model, as `loraforge train` checks them),
    "generate" (the base model and ControlNet), "tag" (the concepts and the tagger), "run"
    (the run name alone: a sweep's runs that share their dataset and models); `sets`:
    a sweep task's own values. A dry run, which writes nothing, checks the run name, the
    dataset and the concepts only (a model check may build the tiny model) and notes what it
    finds above the script."""
    from loraforge.config import load_settings
    from loraforge.errors import ForgeError

    settings = load_settings(options.config, list(options.overrides), list(sets or []))
    try:
        if "train" in checks and options.dry_run:
            from loraforge.dataset.scan import scan_dataset
            from loraforge.train.run import check_run

            check_run(settings, run)
            scan_dataset(settings.dataset_dir, settings.config.dataset.caption_extension)
        elif "train" in checks:
            from loraforge.train.run import check_inputs

            check_inputs(settings, run)
        if "run" in checks:
            from loraforge.train.run import check_run

            check_run(settings, run)
        if "generate" in checks and not options.dry_run:
            from loraforge.models import store

            store.check_pair(store.resolve_base_model(settings),
                             store.resolve_controlnet(settings))
        if "tag" in checks:
            from loraforge.dataset.folders import concept_folders
            from loraforge.models.tagger import resolve_tagger

            concept_folders(settings.dataset_dir, concepts, [])
            if not options.dry_run:
                resolve_tagger(settings)
    except ForgeError as exc:
        if options.dry_run:
            typer.echo(f"# note: this job would fail: {exc}".replace("\n", "\n# "))
            return
        raise ForgeError(f"{exc.message} (nothing was submitted: the job would fail on it)",
                         path=exc.path, fix=exc.fix) from None


def _sweep_preflight(options: Options, run: str | None, params: list[str]) -> None:
    """`_preflight` for each run of a sweep whose dataset or models differ (a --param may set
    dataset.path or models.base); the others share that check, and have their run names
    checked one by one."""
    import json

    from loraforge.config import load_settings
    from loraforge.runs import check_run_name
    from loraforge.slurm.jobs import parse_params, sweep_tasks

    base = check_run_name(run if run is not None else
                          _settings(options.config, options.overrides).config.train.run_name)
    seen = set()
    for task in sweep_tasks(base, parse_params(params)):
        config = load_settings(options.config, list(options.overrides), task.sets).to_dict()
        key = json.dumps([config.get("dataset"), config.get("models")], sort_keys=True)
        if key not in seen:
            seen.add(key)
            _preflight(options, "train", run=task.run, sets=task.sets)
        else:  # each task's run name on its own: one may be another project's run
            _preflight(options, "run", run=task.run, sets=task.sets)


def _console() -> Console:
    from rich.console import Console

    console = Console(highlight=False)
    # A table piped to a file or a log keeps its columns readable.
    return console if console.is_terminal else Console(highlight=False, width=200)


@slurm_app.command("train")
def slurm_train(config: ConfigOpt = None, overrides: SetOpt = None, run: RunOpt = None,
                gpus: GpusOpt = None, dry_run: DryOpt = False) -> None:
    """Submit `loraforge train` as a batch job (requeued and resumed on time limits)."""
    from loraforge.slurm.jobs import submit_train

    options = _options(config, overrides, gpus, dry_run)
    _preflight(options, "train", run=run)
    submit_train(options, run, typer.echo)


@slurm_app.command("generate")
def slurm_generate(config: ConfigOpt = None, overrides: SetOpt = None, prompt: PromptOpt = None,
                   negative: NegativeOpt = None, seed: SeedOpt = None, lora: LoraOpt = None,
                   pose: PoseOpt = None, scenes: ScenesOpt = None, name: NameOpt = None,
                   figure: FigureOpt = None, gpus: GpusOpt = None,
                   dry_run: DryOpt = False) -> None:
    """Submit `loraforge generate` as a batch job."""
    from loraforge.slurm.jobs import submit_generate

    options = _options(config, overrides, gpus, dry_run)
    _preflight(options, "generate")
    submit_generate(options,
                    _generate_args(prompt, negative, seed, lora, pose, scenes, name, figure),
                    typer.echo)


@slurm_app.command("pipeline")
def slurm_pipeline(config: ConfigOpt = None, overrides: SetOpt = None, run: RunOpt = None,
                   prompt: PromptOpt = None, negative: NegativeOpt = None,
                   seed: SeedOpt = None, lora: LoraOpt = None, pose: PoseOpt = None,
                   scenes: ScenesOpt = None, name: NameOpt = None, figure: FigureOpt = None,
                   gpus: GpusOpt = None, dry_run: DryOpt = False) -> None:
    """Submit training, then generation with its LoRA once training succeeded.

    If training fails, SLURM cancels the generation job (--kill-on-invalid-dep=yes).
    """
    from loraforge.slurm.jobs import submit_pipeline

    options = _options(config, overrides, gpus, dry_run)
    _preflight(options, "train", "generate", run=run)
    submit_pipeline(options, run,
                    _generate_args(prompt, negative, seed, lora, pose, scenes, name, figure),
                    typer.echo)


@slurm_app.command("tag")
def slurm_tag(
    concepts: Annotated[list[str] | None, typer.Argument(
        help="Concepts (default: every concept).", show_default=False)] = None,
    threshold: Annotated[float | None, typer.Option(
        "--threshold", callback=probability, help="As `dataset tag --threshold`.")] = None,
    character_threshold: Annotated[float | None, typer.Option(
        "--character-threshold", callback=probability, help="As `dataset tag`.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="As `dataset tag`.")] = False,
    append: Annotated[bool, typer.Option("--append", help="As `dataset tag`.")] = False,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, max=256,
                                                   help="As `dataset tag`.")] = None,
    config: ConfigOpt = None, overrides: SetOpt = None, gpus: GpusOpt = None,
    dry_run: DryOpt = False,
) -> None:
    """Submit `loraforge dataset tag` as a batch job (fast on a GPU; a CPU works too).

    A GPU job (slurm.gpus or --gpus) tags with `--device cuda`: run
    `loraforge models fetch tagger-gpu` once first, on the login node.
    """
    from loraforge.errors import ForgeError
    from loraforge.slurm.jobs import submit_tag

    if overwrite and append:
        raise ForgeError("--overwrite and --append exclude each other",
                         fix="--append adds tags to existing captions; --overwrite replaces "
                             "them (with a backup): choose one")
    words: list[str] = []
    for flag, value in (("--threshold", threshold), ("--character-threshold",
                        character_threshold), ("--batch-size", batch_size)):
        if value is not None:
            words += [flag, str(value)]
    words += ["--overwrite"] * overwrite + ["--append"] * append
    if concepts:
        words += ["--", *concepts]
    options = _options(config, overrides, gpus, dry_run)
    _preflight(options, "tag", concepts=concepts)
    submit_tag(options, words, typer.echo)


@slurm_app.command("sweep")
def slurm_sweep(
    param: Annotated[list[str], typer.Option("--param", metavar="KEY=V1,V2", help="A value list "
                     "to sweep: section.key=v1,v2,... (repeatable; every combination is one run)."
                     )],
    config: ConfigOpt = None, overrides: SetOpt = None, run: RunOpt = None,
    max_parallel: Annotated[int | None, typer.Option("--max-parallel", min=1, help="Run at most "
                            "this many at once.")] = None,
    gpus: GpusOpt = None, dry_run: DryOpt = False,
) -> None:
    """Submit one job array: one training run per combination, named from the values
    (e.g. multi_concept-unet_lr1e-4-network_dim8). Compare them with `loraforge runs`."""
    from loraforge.slurm.jobs import submit_sweep

    options = _options(config, overrides, gpus, dry_run)
    _sweep_preflight(options, run, param)
    submit_sweep(options, run, param, max_parallel, typer.echo)


@slurm_app.command("status")
def slurm_status(run: RunArg = None, config: ConfigOpt = None, overrides: SetOpt = None,
                 as_json: JsonOpt = False) -> None:
    """The jobs submitted with `loraforge slurm`: SLURM state, node, requeues, run status."""
    from loraforge.slurm.control import print_status

    print_status(_settings(config, overrides), run, as_json, _console())


@slurm_app.command("cancel")
def slurm_cancel(run: RunArg = None, config: ConfigOpt = None, overrides: SetOpt = None,
                 ) -> None:
    """Cancel the pending or running jobs of RUN (default: this project's newest submission).

    A cancelled training saves its state; `loraforge slurm train` again resumes it.
    """
    from loraforge.slurm.control import cancel_jobs

    ids = cancel_jobs(_settings(config, overrides), run)
    typer.echo(f"cancelled: {' '.join(ids)}" if ids else "nothing to cancel: no pending or "
               "running job on this cluster")


@slurm_app.command("logs")
def slurm_logs(run: RunArg = None, config: ConfigOpt = None, overrides: SetOpt = None,
               lines: Annotated[int | None, typer.Option("--lines", "-n", min=1, help="Only "
                                "the last N lines.")] = None) -> None:
    """Print the job log of RUN (default: of this project's newest job that has one)."""
    from loraforge.slurm.control import job_log

    path, text = job_log(_settings(config, overrides), run, lines)
    typer.echo(f"==> {path} <==", err=True)
    typer.echo(text, nl=False)


@slurm_app.command("mark-failed", hidden=True)
def slurm_mark_failed(
    reason: Annotated[str, typer.Option("--reason", help="Why the run failed.")],
    config: ConfigOpt = None, overrides: SetOpt = None, run: RunOpt = None,
) -> None:
    """Used by job scripts: mark a run failed in run.json (e.g. requeued too often)."""
    from loraforge.slurm.control import mark_failed
    from loraforge.submitted import load_job_settings

    settings, _ = load_job_settings(config, overrides)  # in its job: the config as submitted
    run_dir = mark_failed(settings, run, reason)
    typer.echo(f"marked failed: {run_dir}")


def runs_command(config: ConfigOpt = None, overrides: SetOpt = None, as_json: JsonOpt = False,
                 ) -> None:
    """List training runs side by side: status, final loss, steps, the settings that differ."""
    from loraforge.slurm.control import print_runs

    print_runs(_settings(config, overrides), as_json, _console())
