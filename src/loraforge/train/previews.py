"""Preview images during training: kohya-style sample prompt lines, their file names, and a grid
of every prompt (rows) at every sampled epoch (columns).

A sample prompt line is a prompt followed by optional flags (kohya's syntax), anywhere after the
prompt text; a flag's value runs until the next ` --x` flag:

    masterpiece, blake, standing --n lowres, bad hands --w 512 --h 768 --d 42 --s 20 --l 7.5

`--n` negative prompt, `--w`/`--h` size (rounded to multiples of 8, at least 64), `--d` seed,
`--s` sampling steps, `--l` CFG scale. Without `--d` a prompt's seed is the base seed plus its
index, so the same prompt is rendered from the same noise at every epoch.

Files: `samples/epoch-NNN/<index>-<slug>.png`, and `samples/grid-epoch-NNN.png` (all epochs up to
NNN side by side).
"""

from __future__ import annotations

import dataclasses
import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.errors import ForgeError
from loraforge.fsutil import DEFAULT_FILE_MODE, save_atomic

if TYPE_CHECKING:
    from PIL import Image

SAMPLES_DIR = "samples"
SLUG_MAX = 40
MIN_SIZE = 64
MAX_SIZE = 4096
MAX_STEPS = 500
MAX_CFG = 50.0
MAX_SEED = 2**63 - 1
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

FLAGS: dict[str, str] = {
    "n": "negative prompt",
    "w": "width",
    "h": "height",
    "d": "seed",
    "s": "steps",
    "l": "CFG scale",
}
_FLAG = re.compile(r"(?:^|(?<=\s))--(\S+)")
_EPOCH_DIR = re.compile(r"^epoch-(\d{3,})$")
_PREVIEW = re.compile(r"^(\d+)-.*\.png$")


@dataclass(frozen=True)
class SamplePrompt:
    """One preview: what to render and how."""

    prompt: str
    negative: str
    width: int
    height: int
    seed: int
    steps: int
    cfg: float


@dataclass(frozen=True)
class SamplePromptDefaults:
    """Values for the flags a line leaves out. `seed` is the base: prompt k gets `seed + k`."""

    negative: str = ""
    width: int = 512
    height: int = 512
    seed: int = 42
    steps: int = 20
    cfg: float = 7.0


def defaults_from_config(config: dict[str, Any]) -> SamplePromptDefaults:
    """Defaults from a resolved config dict (`Settings.to_dict()` or run.json's `config`):
    the training resolution, `train.sample_steps`, `train.seed`, `generate.cfg`, no negative."""
    base = SamplePromptDefaults()
    dataset = config.get("dataset") or {}
    train = config.get("train") or {}
    generate = config.get("generate") or {}
    size = _size(dataset.get("resolution", base.width))
    return SamplePromptDefaults(negative="", width=size, height=size,
                                seed=int(train.get("seed", base.seed)),
                                steps=int(train.get("sample_steps", base.steps)),
                                cfg=float(generate.get("cfg", base.cfg)))


def _known_flags() -> str:
    return ", ".join(f"--{flag} ({what})" for flag, what in FLAGS.items())


def _size(value: float) -> int:
    return max(MIN_SIZE, min(MAX_SIZE, int(value / 8 + 0.5) * 8))


def _number(flag: str, raw: str, line: str, *, integer: bool, low: float, high: float,
            ) -> float:
    kind = "a whole number" if integer else "a number"
    try:
        value: float = int(raw) if integer else float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not low <= value <= high:
        raise ForgeError(f"sample prompt flag --{flag} ({FLAGS[flag]}) needs {kind} from "
                         f"{low:g} to {high:g}, got `{raw}` in: {line}",
                         fix=f"write it like `--{flag} {int(low) if integer else low:g}` in "
                             "train.sample_prompts")
    return value


def parse_sample_prompt(line: str, defaults: SamplePromptDefaults | None = None, *,
                        index: int = 0, **overrides: Any) -> SamplePrompt:
    """Parse one `train.sample_prompts` line. `index` (its position) picks the default seed;
    keyword `overrides` replace fields of `defaults` (e.g. `width=768`)."""
    base = dataclasses.replace(defaults or SamplePromptDefaults(), **overrides)
    matches = list(_FLAG.finditer(line))
    prompt = (line[:matches[0].start()] if matches else line).strip()
    if not prompt:
        raise ForgeError(f"sample prompt has no prompt text before its flags: {line!r}",
                         fix="start the line with the prompt, then the flags, e.g. "
                             "`blake, standing --w 512 --h 768`")
    values: dict[str, str] = {}
    for i, match in enumerate(matches):
        flag = match.group(1).lower()
        end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
        if flag not in FLAGS:
            raise ForgeError(f"unknown flag `--{match.group(1)}` in sample prompt: {line}",
                             fix=f"known flags (each followed by a space and its value): "
                                 f"{_known_flags()}")
        if flag in values:
            raise ForgeError(f"flag --{flag} ({FLAGS[flag]}) is given twice in sample prompt: "
                             f"{line}", fix="keep one of them")
        value = line[match.end():end].strip()
        if not value and flag != "n":
            raise ForgeError(f"flag --{flag} ({FLAGS[flag]}) has no value in sample prompt: "
                             f"{line}", fix=f"write a value after it, e.g. `--{flag} 512`")
        values[flag] = value

    def number(flag: str, default: float, *, integer: bool, low: float, high: float) -> float:
        if flag not in values:
            return default
        return _number(flag, values[flag], line, integer=integer, low=low, high=high)

    return SamplePrompt(
        prompt=prompt,
        negative=values.get("n", base.negative),
        width=_size(number("w", base.width, integer=True, low=1, high=MAX_SIZE)),
        height=_size(number("h", base.height, integer=True, low=1, high=MAX_SIZE)),
        seed=int(number("d", base.seed + index, integer=True, low=0, high=MAX_SEED)),
        steps=int(number("s", base.steps, integer=True, low=1, high=MAX_STEPS)),
        cfg=float(number("l", base.cfg, integer=False, low=0, high=MAX_CFG)),
    )


def parse_sample_prompts(lines: list[str], defaults: SamplePromptDefaults | None = None,
                         ) -> list[SamplePrompt]:
    """Every non-blank line that is not a `#` comment; index k = position in the result."""
    kept = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [parse_sample_prompt(line, defaults, index=k) for k, line in enumerate(kept)]


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
