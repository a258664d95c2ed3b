"""Tagging throughput: `python -m bench.tag [--tagger tiny|FOLDER] [--images N] [--batch 1 8]`.

Images per second through `loraforge dataset tag`'s own code (decode, the model card's input
preparation, the model, caption writing) on N drawn 512 x 768 PNGs, and for the model alone on
ready batches. With the embedded tiny tagger this measures our overhead; with a real tagger
folder (`models fetch tagger`) the real cost, on a GPU with `--device cuda` (after `models fetch
tagger-gpu`). Tagger folders and the GPU runtime are looked up in the storage root of the
folder it runs in. Prints a markdown table, and the compute a real WD14 ViT tagger needs per
image for comparison.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path


def vit_gflops(size: int = 448, patch: int = 16, width: int = 768, layers: int = 12) -> float:
    """Forward GFLOP of a ViT-B/16 at `size` px (wd-vit-tagger-v3): patch embedding, then per
    layer the q/k/v/out projections (4 N d^2), attention (2 N^2 d) and the MLP (8 N d^2)
    multiply-adds, 2 FLOP each; the classifier head is negligible."""
    tokens = (size // patch) ** 2 + 1
    embed = (size // patch) ** 2 * (3 * patch * patch) * width
    per_layer = 12 * tokens * width**2 + 2 * tokens**2 * width
    return 2 * (embed + layers * per_layer) / 1e9


def write_pictures(folder: Path, count: int) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True)
    for i in range(count):
        image = Image.new("RGB", (512, 768), (235, 235, 225))
        draw = ImageDraw.Draw(image)
        draw.ellipse((100 + 7 * i % 150, 150, 400, 700), fill=(40 * i % 255, 90, 160))
        image.save(folder / f"{i:04d}.png")


def measure(tagger: str, images: int, batches: list[int], device: str) -> list[list[str]]:
    import numpy as np

    from loraforge.config import load_settings
    from loraforge.dataset.tagger import tag_dataset
    from loraforge.models import gpu_runtime
    from loraforge.models.tagger import TaggerModel, resolve_tagger

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_pictures(work / "master_dataset" / "1_bench", images)
        # the storage root of where the bench runs (forge.toml, LORAFORGE_STORAGE_ROOT): its
        # tagger folders and GPU runtime
        root = load_settings(None).storage_root
        (work / "forge.toml").write_text(f'[storage]\nroot = {json.dumps(str(root))}\n'
                                         f'[models]\ntagger = {json.dumps(tagger)}\n')
        settings = load_settings(work / "forge.toml")
        choice = gpu_runtime.choose(settings.storage_root, device)  # type: ignore[arg-type]
        model = TaggerModel(resolve_tagger(settings), cuda=choice.cuda)
        if model.cuda_problem or choice.note:
            print(f"note: on the CPU: {model.cuda_problem or choice.note}", file=sys.stderr)
        for batch in batches:
            for _ in range(2):  # the first run warms up; the second is timed
                started = time.perf_counter()
                tag_dataset(settings, None, 0.35, 0.85, "overwrite", batch, lambda _: None,
                            io.StringIO(), device=device)  # type: ignore[arg-type]
            whole = images / (time.perf_counter() - started)
            ready = np.full((batch, model.size, model.size, 3), 127.0, np.float32)
            model.predict(ready)
            calls = max(1, images // batch)
            started = time.perf_counter()
            for _ in range(calls):
                model.predict(ready)
            alone = calls * batch / (time.perf_counter() - started)
            rows.append([tagger, model.provider.replace("ExecutionProvider", ""), str(batch),
                         f"{whole:.1f}", f"{alone:.1f}"])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tag", description=__doc__)
    parser.add_argument("--tagger", default="tiny", help="tiny, or a tagger folder")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="as `dataset tag --device` (the GPU needs `models fetch tagger-gpu`)")
    args = parser.parse_args(argv)
    rows = measure(args.tagger, args.images, args.batch, args.device)
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"{args.images} pictures of 512 x 768")
    print("| tagger | device | batch | images/s (dataset tag) | images/s (model alone) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"A real WD14 ViT tagger (wd-vit-tagger-v3, ViT-B/16 at 448 px): "
          f"{vit_gflops():.0f} GFLOP per image.")


if __name__ == "__main__":
    main(sys.argv[1:])
