"""Preview images during training: the sample prompts rendered with the LoRA as it is, their
file names, and a grid of every prompt (rows) at every sampled epoch (columns). The prompt lines
themselves (kohya's flags) are parsed by `loraforge.sample_prompts`, whose names are re-exported
here for the trainer and the report.

Files: `samples/epoch-NNN/<index>-<slug>.png`, and `samples/grid-epoch-NNN.png` (all epochs up to
NNN side by side).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.fsutil import DEFAULT_FILE_MODE, save_atomic
from loraforge.sample_prompts import SamplePrompt as SamplePrompt
from loraforge.sample_prompts import SamplePromptDefaults as SamplePromptDefaults
from loraforge.sample_prompts import defaults_from_config as defaults_from_config
from loraforge.sample_prompts import parse_sample_prompt as parse_sample_prompt
from loraforge.sample_prompts import parse_sample_prompts as parse_sample_prompts

if TYPE_CHECKING:
    from PIL import Image

    from loraforge.config import TrainConfig

log = logging.getLogger("loraforge.train")

SAMPLES_DIR = "samples"
SLUG_MAX = 40
#: Longest side of one grid cell, and the widest a grid may get before cells shrink (to MIN_CELL).
MAX_CELL = 256
MIN_CELL = 64
MAX_GRID_WIDTH = 4096
LABEL_TOP = 18
LABEL_LEFT = 32
GAP = 2
BACKGROUND = (255, 255, 255)
MISSING = (200, 200, 200)
TEXT = (40, 40, 40)

_EPOCH_DIR = re.compile(r"^epoch-(\d{3,})$")
_PREVIEW = re.compile(r"^(\d+)-.*\.png$")


def slug(text: str) -> str:
    """The prompt's first words as a safe file name part: `[a-z0-9-]`, at most 40 characters."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    words = re.findall(r"[a-z0-9]+", ascii_text.lower())
    out = ""
    for word in words:
        candidate = f"{out}-{word}" if out else word
        if len(candidate) > SLUG_MAX:
            if not out:
                out = word[:SLUG_MAX]
            break
        out = candidate
    return out or "prompt"


def epoch_dir(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / SAMPLES_DIR / f"epoch-{epoch:03d}"


def preview_path(run_dir: Path, epoch: int, index: int, prompt: str | SamplePrompt) -> Path:
    """`samples/epoch-{epoch:03d}/{index}-{slug}.png`."""
    text = prompt.prompt if isinstance(prompt, SamplePrompt) else prompt
    return epoch_dir(run_dir, epoch) / f"{index}-{slug(text)}.png"


def grid_path(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / SAMPLES_DIR / f"grid-epoch-{epoch:03d}.png"


def sample_epochs(run_dir: Path) -> list[int]:
    """Epochs with at least one preview image on disk, ascending."""
    root = Path(run_dir) / SAMPLES_DIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _EPOCH_DIR.match(child.name)
        if match and child.is_dir() and any(_PREVIEW.match(p.name) for p in child.iterdir()):
            found.append(int(match.group(1)))
    return sorted(found)


def epoch_previews(run_dir: Path, epoch: int) -> list[tuple[int, Path]]:
    """(prompt index, file) of every preview image of `epoch`, by index."""
    folder = epoch_dir(run_dir, epoch)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _PREVIEW.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found, key=lambda item: (item[0], item[1].name))


def _open_rgb(path: Path) -> Image.Image | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def _cell_size(prompts: list[SamplePrompt], columns: int) -> tuple[int, int]:
    """A common cell size: the largest prompt size, scaled so its longest side fits."""
    width = max(p.width for p in prompts)
    height = max(p.height for p in prompts)
    usable = (MAX_GRID_WIDTH - LABEL_LEFT) // max(columns, 1) - GAP
    longest = max(MIN_CELL, min(MAX_CELL, usable))
    scale = longest / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def grid_image(run_dir: Path, prompts: list[SamplePrompt], epochs: list[int]) -> Image.Image:
    """Rows = prompts, columns = those of `epochs` that have previews on disk. Each image is
    fitted into a common cell; a missing or unreadable one is a grey cell."""
    from PIL import Image, ImageDraw, ImageFont

    present = set(sample_epochs(run_dir))
    columns = sorted({e for e in epochs if e in present})
    cell_w, cell_h = (_cell_size(prompts, len(columns)) if prompts
                      else (MIN_CELL, MIN_CELL))
    width = LABEL_LEFT + len(columns) * (cell_w + GAP)
    height = LABEL_TOP + len(prompts) * (cell_h + GAP)
    grid = Image.new("RGB", (max(width, 1), max(height, 1)), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for col, epoch in enumerate(columns):
        x = LABEL_LEFT + col * (cell_w + GAP)
        draw.text((x + 2, 3), f"epoch {epoch}", fill=TEXT, font=font)
    for row, prompt in enumerate(prompts):
        y = LABEL_TOP + row * (cell_h + GAP)
        draw.text((4, y + 2), str(row), fill=TEXT, font=font)
        for col, epoch in enumerate(columns):
            x = LABEL_LEFT + col * (cell_w + GAP)
            image = _open_rgb(preview_path(run_dir, epoch, row, prompt))
            if image is None:
                draw.rectangle((x, y, x + cell_w - 1, y + cell_h - 1), fill=MISSING)
                continue
            image.thumbnail((cell_w, cell_h), Image.Resampling.LANCZOS)
            grid.paste(image, (x + (cell_w - image.width) // 2, y + (cell_h - image.height) // 2))
    return grid


def write_grid(run_dir: Path, prompts: list[SamplePrompt], epoch: int,
               mode: int = DEFAULT_FILE_MODE) -> Path | None:
    """Save `samples/grid-epoch-{epoch:03d}.png` atomically: every sampled epoch up to `epoch`.
    Returns its path, or None when there are no prompts or no previews yet."""
    epochs = [e for e in sample_epochs(run_dir) if e <= epoch]
    if not prompts or not epochs:
        return None
    image = grid_image(run_dir, prompts, epochs)
    dest = grid_path(run_dir, epoch)
    save_atomic(dest, lambda tmp: image.save(tmp, format="PNG"), mode)
    return dest


def render_previews(run_dir: Path, epoch: int, prompts: list[SamplePrompt], models: Any,
                    cfg: TrainConfig, autocast: AbstractContextManager[Any],
                    mode: int = DEFAULT_FILE_MODE) -> None:
    """The sample prompts rendered with the training's `models` (tokenizer, text encoder, VAE,
    U-Net, scheduler config) as they are now, each from its own fixed seed: the training's
    random stream is untouched (every draw there is seeded per step). A preview is a courtesy:
    a failure is logged and training goes on."""
    import torch

    from loraforge.generate.pipeline import build_pipeline, render
    from loraforge.generate.prompts import encode_prompt_pair
    from loraforge.samplers import make_scheduler

    try:
        scheduler = make_scheduler(cfg.sample_sampler, models.scheduler_config)
        pipe = build_pipeline(models.tokenizer, models.text_encoder, models.vae, models.unet,
                              scheduler)
        models.unet.eval()
        with torch.no_grad(), autocast:
            for index, sample in enumerate(prompts):
                embeds, negative = encode_prompt_pair(
                    models.tokenizer, models.text_encoder, sample.prompt, sample.negative,
                    cfg.clip_skip, cfg.max_token_length // 75)
                image = render(pipe, embeds, negative, sample.width, sample.height,
                               sample.steps, sample.cfg, sample.seed)
                save_atomic(preview_path(run_dir, epoch, index, sample),
                            lambda tmp, im=image: im.save(tmp, format="PNG"), mode)
        write_grid(run_dir, prompts, epoch, mode)
        log.info("previews of epoch %d: %s", epoch, Path(run_dir) / SAMPLES_DIR)
    except Exception as exc:
        log.warning("previews of epoch %d not made: %s", epoch, exc)
    finally:
        models.unet.train()
