"""`python -m bench {train,generate,memory} --model tiny|sd15 [...]`: measure, print, append to
BENCHMARKS.md with the machine, versions and date."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

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


def run_train(args: argparse.Namespace, work: Path) -> str:
    import torch

    from bench.models import model_folders
    from bench.train import ours, ours_processes, reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base, _ = model_folders(args.model, models_root(work))
    rows = []
    for batch in args.batch:
        results = [ours(work, base, batch, args.resolution, args.steps, device, [])]
        for extra in args.variant:
            results.append(ours(work, base, batch, args.resolution, args.steps, device,
                                extra.split()))
        for count in args.processes:
            results.append(ours_processes(work, base, batch, args.resolution, args.steps,
                                          count))
        ref = reference(base, batch, args.resolution, args.steps, device)
        floor = reference(base, batch, args.resolution, args.steps, device, cached=True)
        for result in [*results, ref, floor]:
            rows.append([result.name, str(batch), f"{result.images_per_s:.2f}",
                         f"{result.images_per_s / ref.images_per_s:.2f}x",
                         f"{result.first_step_s:.1f}", f"{result.peak_memory_gb:.2f}",
                         f"{result.tflops():.1f}" if args.model == "sd15" else "-"])
    return table(["trainer", "batch", "images/s", "vs reference", "first step (s)",
                  "peak memory (GB)", "TFLOP/s"], rows)


def run_generate(args: argparse.Namespace, work: Path) -> str:
    from bench.generate import ours, random_loras, stock
    from bench.models import model_folders

    base, controlnet = model_folders(args.model, models_root(work))
    loras = random_loras(base, work, args.loras)
    rows = []
    for size in args.size:
        width, height = (int(v) for v in size.split("x"))
        for batch in args.batch:
            results = [ours(base, controlnet, width, height, batch, args.steps, variant, loras)
                       for variant in [None, *args.variant]]
            results.append(stock(base, controlnet, width, height, batch, args.steps, loras))
            for r in results:
                rows.append([r.name, size, str(batch), f"{r.seconds_per_image:.3f}",
                             f"{r.warmup_s:.1f}",
                             f"{r.tflops():.1f}" if args.model == "sd15" else "-"])
    return table(["pipeline", "size", "batch", "s / image", "warm-up (s)", "TFLOP/s"], rows)


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


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("what", choices=["train", "generate", "memory"])
    parser.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--batch", type=int, nargs="+", default=None)
    parser.add_argument("--resolution", type=int, default=None)
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
    parser.add_argument("--note", default="", help="a line written above the table")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    tiny = args.model == "tiny"
    if args.what == "train":
        args.batch = args.batch or ([8] if tiny else [1, 2, 4, 8])
        args.resolution = args.resolution or (64 if tiny else 512)
        args.steps = args.steps or (40 if tiny else 60)
    elif args.what == "memory":
        args.batch = args.batch or [1]
        args.resolution = args.resolution or (64 if tiny else 512)
    else:
        args.batch = args.batch or ([1] if tiny else [1, 4])
        args.size = args.size or (["128x96"] if tiny else ["512x512", "512x768"])
        args.steps = args.steps or 25
    with tempfile.TemporaryDirectory(prefix="loraforge-bench-") as tmp:
        body = {"train": run_train, "generate": run_generate,
                "memory": run_memory}[args.what](args, Path(tmp))
    title = f"### {args.what}, {args.model} model ({machine()})"
    command = "python -m bench " + shlex.join(sys.argv[1:])
    text = "\n".join(filter(None, [title, "", f"`{command}`", args.note, "", body, ""]))
    print(text)
    if not args.no_write:
        with open(ROOT / "BENCHMARKS.md", "a", encoding="utf-8") as fh:
            fh.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
