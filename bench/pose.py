"""`python -m bench.pose [--pictures N] [--threads T ...] [--device cpu|cuda]`: time
`pose extract` per 1024x768 picture with the full-size OpenPose body network, and per hand
with the full-size hand network.

The weights are random (no trained ones can be downloaded here), but the network's work is the
trained one's: the same 52 M parameters and input size (491x368 for a 4:3 picture). Parsing
the maps into people depends on what they hold: random weights give nearly flat maps with few
peaks, so the parsing time here is a lower bound (on the tests' ideal maps of three people
it is about 0.4 s). Prints one markdown row per thread count: the network (with upsampling its
outputs), parsing, and the whole picture (decode, network, parsing), median over the pictures
after one warm-up; the hand column is one hand: its 368 px square through the network and its
peaks.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def _picture(path: Path, seed: int) -> Path:
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(90, 200, (768, 1024, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    for x in (300, 720):
        draw.ellipse((x - 45, 90, x + 45, 180), fill=(230, 190, 160))
        draw.rectangle((x - 75, 195, x + 75, 450), fill=(40, 60, 160))
        draw.rectangle((x - 70, 450, x + 70, 700), fill=(60, 40, 30))
    image.save(path, quality=90)
    return path


def run(pictures: int, threads: list[int], device: str) -> list[str]:
    import torch

    from loraforge.generate.extract import input_size, load_picture, network_maps
    from loraforge.generate.hands import crop_maps, hand_points
    from loraforge.generate.skeletons import people_from_maps
    from loraforge.models import cpm
    from loraforge.models.bodypose import build_network

    torch.manual_seed(0)
    net = build_network().eval().to(device)
    hand_net = cpm.build_network(cpm.HAND_CHANNELS).eval().to(device)
    rows = ["| device | threads | network input | network s | parsing s | per picture s | "
            "per hand s |", "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        paths = [_picture(Path(tmp) / f"p{i}.jpg", i) for i in range(pictures + 1)]
        for count in threads:
            torch.set_num_threads(count)
            times: list[tuple[float, float, float, float]] = []
            for path in paths:
                start = time.perf_counter()
                picture = load_picture(path)
                if device == "cuda":
                    torch.cuda.synchronize()
                net_start = time.perf_counter()
                fields, heatmaps = network_maps(_on(net, device), picture)
                parse_start = time.perf_counter()
                people_from_maps(fields, heatmaps)
                end = time.perf_counter()
                hand_points(crop_maps(_on(hand_net, device), picture.crop((250, 400, 450, 600))))
                hand = time.perf_counter() - end
                times.append((parse_start - net_start, end - parse_start, end - start, hand))
            network, parsing, total, hand = (statistics.median(t[i] for t in times[1:])
                                             for i in range(4))
            w, h = input_size(1024, 768)
            rows.append(f"| {device} | {count} | {w}x{h} | {network:.2f} | {parsing:.2f} | "
                        f"{total:.2f} | {hand:.2f} |")
    return rows


def _on(net: object, device: str) -> object:
    """The network, taking CPU input on `device` (what `network_maps` hands it); a hand
    network's single output comes back the same way."""
    if device == "cpu":
        return net
    import torch

    class OnDevice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> object:
            out = self.net(x.to(device))
            return out.cpu() if isinstance(out, torch.Tensor) else tuple(o.cpu() for o in out)

    return OnDevice()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pictures", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    for row in run(args.pictures, args.threads, args.device):
        print(row)


if __name__ == "__main__":
    main()
