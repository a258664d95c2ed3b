"""`loraforge generate`: the command's options. Light imports only (cli.py imports this module
for --help); the work happens in `loraforge.generate.run`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from loraforge.options import ConfigOpt, SetOpt


def generate_command(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    prompt: Annotated[str | None, typer.Option(
        "--prompt", "-p", help="Prompt, A1111 syntax: (word:1.2), (word), \\[word], BREAK, "
        "<lora:name:0.8>. Default: generate.prompt.")] = None,
    negative: Annotated[str | None, typer.Option(
        "--negative", "-n", help="Negative prompt. Default: generate.negative.")] = None,
    lora: Annotated[list[str] | None, typer.Option(
        "--lora", metavar="LORA[:W]",
        help="LoRA to apply: FILE.safetensors[:WEIGHT] or a run name[:WEIGHT] "
        "(repeatable: they stack); `none` for the base model alone. Default: the LoRA of "
        "this project's newest finished training run (another project's on the storage root "
        "is only taken by name), at generate.lora_weight.")] = None,
    pose: Annotated[str | None, typer.Option(
        "--pose", metavar="FILE|random",
        help="Pose map (OpenPose PNG, or OpenPose JSON), a photo (its people's poses are "
        "detected), or `random`. Default: generate.pose_map, random figures when that file "
        "is missing.")] = None,
    figures: Annotated[int | None, typer.Option(
        "--figures", help="People in a random pose map (a pose file has its own people: "
        "another number beside one is refused). Default: generate.figures.")] = None,
    seed: Annotated[int | None, typer.Option(
        "--seed", help="First seed (-1: random). Default: generate.seed.")] = None,
    count: Annotated[int | None, typer.Option(
        "--count", help="Images per scene: seeds S, S+1, ... Default: generate.count.")] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", min=1, max=64, help="Seeds denoised together (lower it if a GPU "
        "runs out of memory). Default: generate.batch_size.")] = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", help="Sampling steps. Default: generate.steps.")] = None,
    cfg: Annotated[float | None, typer.Option(
        "--cfg", help="CFG scale. Default: generate.cfg.")] = None,
    sampler: Annotated[str | None, typer.Option(
        "--sampler", help="A1111 sampler name: 'DPM++ 2M Karras', 'DPM++ 2M', "
        "'DPM++ 2M SDE Karras', 'DPM++ SDE Karras', 'Euler a', 'Euler', 'Heun', 'DDIM', "
        "'UniPC'. Default: generate.sampler.")] = None,
    size: Annotated[str | None, typer.Option(
        "--size", metavar="WxH",
        help="WIDTHxHEIGHT, rounded to multiples of 8. Default: generate.width x "
        "generate.height.")] = None,
    control_scale: Annotated[float | None, typer.Option(
        "--control-scale", help="ControlNet strength (0 = pose ignored). Default: "
        "generate.control_scale.")] = None,
    clip_skip: Annotated[int | None, typer.Option(
        "--clip-skip", help="Clip skip. Default: what the LoRA was trained with, else "
        "train.clip_skip.")] = None,
    name: Annotated[str | None, typer.Option(
        "--name", help="Scene name: the output files are <name>-<seed>.png. Default: scene."
    )] = None,
    scenes: Annotated[Path | None, typer.Option(
        "--scenes", metavar="FILE",
        help="TOML file of \\[\\[scene]] tables (name, prompt, negative, pose, seed or "
        "seeds, count, size, figures, loras, steps, cfg, sampler, control_scale, clip_skip, "
        "background_weight, region_pad, region_soften, and \\[\\[scene.figure]] tables), "
        "rendered with the models loaded once; the options above are their defaults.")] = None,
    figure: Annotated[list[str] | None, typer.Option(
        "--figure", help="Cast a posed figure, left to right (repeatable): \"CHARACTER: "
        "prompt\" (a concept of the LoRA, spaces and any script allowed, or a run of one "
        "concept) or a "
        "prompt alone (\": prompt\" when plain words and a colon begin it); --prompt is then "
        "the background's.")] = None,
    background_weight: Annotated[float | None, typer.Option(
        "--background-weight", help="Casting: how much --prompt still acts inside a figure's "
        "region (0 to 1). Default: generate.background_weight.")] = None,
    source: Annotated[Path | None, typer.Option(
        "--from", help="Render again the scene a generated image records (its PNG's "
        "`loraforge` chunk): its batch's seeds, prompts, pose, LoRAs and figures.")] = None,
    precision: Annotated[str, typer.Option(
        "--precision", help="auto (fp16 on a GPU, fp32 on the CPU), fp16, bf16 or fp32."
    )] = "auto",
) -> None:
    """Render posed scenes with the base model, the OpenPose ControlNet and LoRAs.

    Writes Final_Images/<scene>-<seed>.png with A1111 PNG info, its pose map and a JSON sidecar;
    the newest image is also Final_Images/final_command_scene.png.
    """
    import logging
    import sys

    from rich.console import Console

    from loraforge.errors import RESUMABLE_EXIT, ForgeError
    from loraforge.generate.pipeline import PRECISIONS
    from loraforge.generate.run import Stopped, generate
    from loraforge.generate.scenes import Options
    from loraforge.submitted import load_job_settings

    if precision not in PRECISIONS:
        raise ForgeError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}",
                         fix="use --precision auto (the default)")
    extra = [] if batch_size is None else [f"generate.batch_size={batch_size}"]
    settings, edited = load_job_settings(config, [*(overrides or []), *extra])
    if edited:  # in a job: forge.toml was edited since its submission
        Console(stderr=True).print(edited, markup=False, soft_wrap=True)
    out = Console(soft_wrap=True, highlight=False)
    logger = logging.getLogger("loraforge.generate")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        handler.setLevel(logging.WARNING)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    options = Options(prompt=prompt, negative=negative, loras=lora, pose=pose, figures=figures,
                      seed=seed, count=count, steps=steps, cfg=cfg, sampler=sampler, size=size,
                      control_scale=control_scale, clip_skip=clip_skip, name=name, scenes=scenes,
                      cast=figure, background_weight=background_weight, source=source)
    try:
        generate(settings, options, lambda line: out.print(line, markup=False), precision)
    except Stopped as stop:
        goes_on = ("rerun the same command to go on (images made with the same settings are "
                   "kept, not made again)")
        if stop.drawn:
            firsts = ", ".join(f"{name}: {seed}" for name, seed in stop.drawn)
            goes_on = (f"its seeds were drawn at random (-1), so the same command would draw "
                       f"others and make every image again; to go on, rerun it with the seeds "
                       f"drawn in place of -1 ({firsts}): the images made are kept")
        Console(stderr=True).print(f"stopped by SIGUSR1 (a time limit is near): {stop}; "
                                   f"{goes_on}", markup=False, soft_wrap=True)
        raise typer.Exit(RESUMABLE_EXIT) from None
