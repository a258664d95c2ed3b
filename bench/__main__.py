"""`python -m bench {train,generate,casting,memory,job} --model tiny|sd15 [...]`: measure,
print, append to BENCHMARKS.md with the machine, versions and date."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    import torch

    import loraforge

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU, {torch.get_num_threads()} threads ({platform.processor() or 'x86_64'})"
    return (f"{datetime.date.today().isoformat()}, {device}, torch {torch.__version__}, "
            f"loraforge {loraforge.__version__}, Python {platform.python_version()}")


def models_root(work: Path) -> Path:
    """Where the benchmark models are built: $LORAFORGE_BENCH_MODELS keeps them between runs."""
    return Path(os.environ.get("LORAFORGE_BENCH_MODELS") or work / "models")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def measured(name: str, measure: Callable[[], Any]) -> Any:
    """`measure()`, or None when it fails: the other rows of a table are still worth having
    (a GPU run is short and rare). Progress goes to stderr as each row is done, so a run cut
    off by its time limit still leaves the rows it finished in its log."""
    started = time.perf_counter()
    try:
        result = measure()
    except Exception as exc:  # a failed variant is a row of the table, not the end of it
        print(f"bench: {name} failed after {time.perf_counter() - started:.0f} s: "
              f"{type(exc).__name__}: {str(exc)[:500]}", file=sys.stderr, flush=True)
        return None
    print(f"bench: {name}: {result}", file=sys.stderr, flush=True)
    return result


def run_train(args: argparse.Namespace, work: Path) -> str:
    import torch

    from bench.models import model_folders
    from bench.train import KOHYA_UNET, ours, ours_processes, reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base, _ = model_folders(args.model, models_root(work))
    header = ["trainer", "batch", "images/s", "vs reference", "first step (s)",
              "peak memory (GB)", "TFLOP/s"]
    rows = []
    for batch in args.batch:
        # The plain rows first, the variants (slow to compile, maybe cut off) last.
        runs = [(f"loraforge b{batch}", lambda b=batch: ours(
            work, base, b, args.resolution, args.steps, device, []))]
        if not args.skip_reference:
            runs += [(f"reference b{batch}", lambda b=batch: reference(
                base, b, args.resolution, args.steps, device))]
            runs += [(f"reference cached b{batch}", lambda b=batch: reference(
                base, b, args.resolution, args.steps, device, cached=True))]
            if args.same_modules:
                runs += [(f"reference kohya cached b{batch}", lambda b=batch: reference(
                    base, b, args.resolution, args.steps, device, cached=True,
                    modules=KOHYA_UNET))]
                runs += [(f"reference kohya with text encoder b{batch}", lambda b=batch:
                          reference(base, b, args.resolution, args.steps, device,
                                    modules=KOHYA_UNET, train_text=True))]
        if args.distinct_captions:
            runs += [(f"loraforge, distinct captions b{batch}", lambda b=batch: ours(
                work, base, b, args.resolution, args.steps, device, [], distinct=True))]
        runs += [(f"loraforge ({extra}) b{batch}", lambda b=batch, e=extra: ours(
            work, base, b, args.resolution, args.steps, device, e.split()))
            for extra in args.variant]
        runs += [(f"loraforge, {count} processes b{batch}", lambda b=batch, c=count:
                  ours_processes(work, base, b, args.resolution, args.steps, c))
                 for count in args.processes]
        # Rounds interleave the rows, so that a drift of the machine's speed hits each alike.
        rounds = [[measured(f"{name} (round {i + 1})", run) for name, run in runs]
                  for i in range(args.rounds)]
        results = [(name, _median([done[j] for done in rounds]))
                   for j, (name, _) in enumerate(runs)]
        ref = next((r for name, r in results if name == f"reference b{batch}" and r), None)
        for name, result in results:
            if result is None:
                rows.append([f"{name.rsplit(' b', 1)[0]}: failed (see the log)", str(batch),
                             *["-"] * 5])
                continue
            rows.append([result.name, str(batch), f"{result.images_per_s:.2f}",
                         f"{result.images_per_s / ref.images_per_s:.2f}x" if ref else "-",
                         f"{result.first_step_s:.1f}", f"{result.peak_memory_gb:.2f}",
                         f"{result.tflops():.1f}" if args.model == "sd15" else "-"])
    return table(header, rows)


def _median(results: list[Any]) -> Any:
    """The run of median throughput among those that did not fail (None: all failed)."""
    done = sorted((r for r in results if r is not None), key=lambda r: r.images_per_s)
    return done[(len(done) - 1) // 2] if done else None


def run_generate(args: argparse.Namespace, work: Path) -> str:
    from bench.generate import ours, random_loras, stock
    from bench.models import model_folders

    base, controlnet = model_folders(args.model, models_root(work))
    loras = random_loras(base, work, args.loras)
    rows = []
    for size in args.size:
        width, height = (int(v) for v in size.split("x"))
        for batch in args.batch:
            # The plain rows first, the variants (slow to compile, maybe cut off) last.
            runs = [(f"loraforge ({variant or 'plain'}) {size} b{batch}",
                     lambda b=batch, v=variant, w=width, h=height: ours(
                         base, controlnet, w, h, b, args.steps, v, loras))
                    for variant in [None, *args.variant]]
            if not args.skip_reference:
                runs.insert(1, (f"stock {size} b{batch}", lambda b=batch, w=width, h=height:
                                stock(base, controlnet, w, h, b, args.steps, loras)))
            for name, run in runs:
                r = measured(name, run)
                if r is None:
                    rows.append([f"{name.rsplit(' ', 2)[0]}: failed (see the log)", size,
                                 str(batch), "-", "-", "-"])
                    continue
                rows.append([r.name, size, str(batch), f"{r.seconds_per_image:.3f}",
                             f"{r.warmup_s:.1f}",
                             f"{r.tflops():.1f}" if args.model == "sd15" else "-"])
    return table(["pipeline", "size", "batch", "s / image", "warm-up (s)", "TFLOP/s"], rows)


def run_casting(args: argparse.Namespace, work: Path) -> str:
    from bench.casting import measure
    from bench.generate import random_loras
    from bench.models import model_folders

    base, controlnet = model_folders(args.model, models_root(work))
    loras = random_loras(base, work, 2)
    rows = []
    for size in args.size:
        results = measure(base, controlnet, loras, work, size, args.steps, args.repeats)
        plain = results[0].seconds_per_image
        rows += [[r.scene, size, f"{r.seconds_per_image:.3f}",
                  f"{r.seconds_per_image / plain - 1:+.0%}"] for r in results]
    return table(["scene (two figures, two LoRAs)", "size", "s / image", "vs not cast"], rows)


def run_memory(args: argparse.Namespace, work: Path) -> str:
    import torch

    from bench.memory import lora_step, vae_caching
    from bench.models import model_folders

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base, _ = model_folders(args.model, models_root(work))
    results = [vae_caching(base, batch, args.resolution, device) for batch in args.vae_batch]
    for batch in args.batch:
        results += [lora_step(base, batch, args.resolution, device, keep)
                    for keep in (False, True)]
    return table(["phase", "batch", "resolution", "peak memory (GB)"],
                 [[r.phase, str(r.batch), str(r.resolution), f"{r.peak_gb:.2f}"]
                  for r in results])


def run_job(args: argparse.Namespace, work: Path) -> str:
    from bench.job import TARGET_WALL_S, prepare
    from bench.job import run_job as timed_job

    config = prepare(work)
    rows = []
    for resolution in args.resolution:
        r = measured(f"job {resolution} px", lambda res=resolution: timed_job(
            config, res, args.steps, args.timeout))
        if r is None:
            rows.append([f"{resolution} px: failed (see the log)", *["-"] * 5])
            continue
        steps = str(r.steps) if r.finished else f"{r.steps} of {args.steps} (stopped)"
        rows.append([str(r.resolution), steps, f"{r.wall_s:.1f}", f"{r.overhead_s:.1f}",
                     f"{r.steps_per_s:.1f}",
                     f"{r.wall_s / TARGET_WALL_S:.2f}x" if r.finished else "-"])
    return table(["resolution", "steps", "wall (s)", "outside the steps (s)", "steps/s",
                  f"vs {TARGET_WALL_S:.0f} s"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("what", choices=["train", "generate", "casting", "memory", "job"])
    parser.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--batch", type=int, nargs="+", default=None)
    parser.add_argument("--resolution", type=int, nargs="+", default=None,
                        help="training resolution (job: each one in turn)")
    parser.add_argument("--size", nargs="+", default=None, help="WxH (generate)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--variant", action="append", default=[],
                        help="train: extra trainer overrides, e.g. "
                             "'train.gradient_checkpointing=true'; generate: one of compile, "
                             "compile=blocks, fuse_qkv, channels_last")
    parser.add_argument("--processes", type=int, nargs="+", default=[],
                        help="train: also run `loraforge train` with train.gpus = N, the same "
                             "global batch split over N processes")
    parser.add_argument("--loras", type=int, default=2,
                        help="generate: random character LoRAs active in every image (a "
                             "two-character scene)")
    parser.add_argument("--vae-batch", type=int, nargs="+", default=[1, 8],
                        help="memory: VAE images per call while caching latents")
    parser.add_argument("--skip-reference", action="store_true",
                        help="leave out the reference rows (train: the reference loops; "
                             "generate: diffusers' stock pipeline)")
    parser.add_argument("--same-modules", action="store_true",
                        help="train: add the cached reference loop adapting kohya's U-Net "
                             "modules, the ones ours trains (compare with ours at "
                             "train.text_encoder_lr=0), and the plain loop adapting those and "
                             "training a text encoder LoRA too (compare with ours' defaults)")
    parser.add_argument("--distinct-captions", action="store_true",
                        help="train: add ours on a dataset whose captions all differ (the "
                             "plain rows' captions share their tags)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="train: measure every row this many times, the rows interleaved, "
                             "and keep each row's median (a shared CPU's speed drifts)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="casting: images per scene and round (the best is kept)")
    parser.add_argument("--timeout", type=float, default=600,
                        help="job: stop a job after this many seconds (its row says how far "
                             "it got)")
    parser.add_argument("--note", default="", help="a line written above the table")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    if args.what == "generate":
        from bench.generate import VARIANTS

        for variant in args.variant:
            if variant not in VARIANTS:
                parser.error(f"unknown generate variant {variant!r}: one of "
                             f"{', '.join(VARIANTS)}")
    tiny = args.model == "tiny"
    if args.what != "job" and args.resolution and len(args.resolution) > 1:
        parser.error("--resolution takes one value, except for job")
    if args.what == "train":
        args.batch = args.batch or ([8] if tiny else [1, 2, 4, 8])
        args.resolution = args.resolution[0] if args.resolution else (64 if tiny else 512)
        args.steps = args.steps or (40 if tiny else 60)
    elif args.what == "memory":
        args.batch = args.batch or [1]
        args.resolution = args.resolution[0] if args.resolution else (64 if tiny else 512)
    elif args.what == "job":
        if not tiny:
            parser.error("job trains the demo's project, on the tiny model (--model tiny)")
        args.resolution = args.resolution or [512]
        args.steps = args.steps or 1500
    elif args.what == "casting":
        args.size = args.size or ["512x384"]
        args.steps = args.steps or 8
    else:
        args.batch = args.batch or ([1] if tiny else [1, 4])
        args.size = args.size or (["128x96"] if tiny else ["512x512", "512x768"])
        args.steps = args.steps or 25
    with tempfile.TemporaryDirectory(prefix="loraforge-bench-") as tmp:
        body = {"train": run_train, "generate": run_generate, "casting": run_casting,
                "memory": run_memory, "job": run_job}[args.what](args, Path(tmp))
    title = f"### {args.what}, {args.model} model ({machine()})"
    command = "python -m bench " + shlex.join(sys.argv[1:])
    text = "\n".join([title, "", f"`{command}`", *([args.note] if args.note else []), "", body,
                      ""])
    print(text)
    if not args.no_write:
        with open(ROOT / "BENCHMARKS.md", "a", encoding="utf-8") as fh:
            fh.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
