"""Casting's cost per image: one two-figure scene through `loraforge generate`, cast and not.

Three scenes on the same random two-figure pose, size, sampler, steps and seeds, with two random
character LoRAs (dim 16, U-Net and text encoder, like a trained one):

- not cast: both LoRAs merged, the whole prompt on the whole image;
- cast, shared LoRA: the same merged LoRAs (a multi-concept run: the characters are triggers of
  one LoRA), each figure's prompt in its own region;
- cast, a LoRA per figure: each figure's LoRA acts in its region only (unmerged, masked).

One `generate` call renders a warm-up image, then each scene for `repeats` seeds, twice over in
turn (one image per batch); a row's seconds per image are the best of its scene's images (from
the images' sidecars, which time the denoising and decoding only).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

SCENES = ("not cast", "cast, shared LoRA", "cast, a LoRA per figure")


@dataclass
class CastingResult:
    scene: str
    seconds_per_image: float


KINDS = ("plain", "shared", "own")
ROUNDS = 2


def _scenes_toml(loras: list[Path], size: str, steps: int, repeats: int) -> str:
    """A warm-up image, then ROUNDS rounds of the three scenes (`<kind>-<round>`), so a drift
    in the machine's speed touches every kind alike."""
    merged = ", ".join(f'"{path}:0.8"' for path in loras)
    common = f'pose = "random"\nfigures = 2\nsize = "{size}"\nsteps = {steps}\nseed = 1\n'
    prompts = ("1girl, red hair, smiling", "1boy, blue jacket, arms crossed")
    tables = [f'[[scene]]\nname = "warm-up"\nprompt = "street"\nloras = [{merged}]\n{common}']
    for number in range(ROUNDS):
        many = f"{common}count = {repeats}\n"
        tables.append(f'[[scene]]\nname = "plain-{number}"\nprompt = "2 characters, street, '
                      f'{", ".join(prompts)}"\nloras = [{merged}]\n{many}')
        tables.append(f'[[scene]]\nname = "shared-{number}"\nprompt = "street, evening"\n'
                      f"loras = [{merged}]\n{many}")
        tables += [f'[[scene.figure]]\nprompt = "{prompt}"\n' for prompt in prompts]
        tables.append(f'[[scene]]\nname = "own-{number}"\nprompt = "street, evening"\n{many}')
        tables += [f'[[scene.figure]]\nlora = "{path}:0.8"\nprompt = "{prompt}"\n'
                   for path, prompt in zip(loras, prompts, strict=True)]
    return "\n".join(tables)


def measure(base: Path, controlnet: Path, loras: list[Path], work: Path, size: str,
            steps: int, repeats: int) -> list[CastingResult]:
    """Render the three scenes with `loraforge generate` (in-process) and time them."""
    from loraforge.config import load_settings
    from loraforge.generate.run import generate
    from loraforge.generate.scenes import Options

    project = work / "casting"
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    (project / "forge.toml").write_text(
        f'[storage]\nroot = "store"\n[models]\nbase = "{base}"\ncontrolnet = "{controlnet}"\n'
        "[generate]\ncfg = 7.0\n", encoding="utf-8")
    (project / "scenes.toml").write_text(_scenes_toml(loras, size, steps, repeats),
                                         encoding="utf-8")
    settings = load_settings(project / "forge.toml")
    generate(settings, Options(scenes=project / "scenes.toml"), lambda _line: None)
    results = []
    for kind, name in zip(KINDS, SCENES, strict=True):
        seconds = [json.loads((settings.images_dir / f"{kind}-{number}-{seed}.json")
                              .read_text())["seconds"]
                   for number in range(ROUNDS) for seed in range(1, repeats + 1)]
        results.append(CastingResult(name, min(seconds)))
    return results
