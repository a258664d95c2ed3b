"""kohya-style sample prompt lines (`train.sample_prompts`): a prompt followed by optional flags.

A flag's value runs until the next ` --x` flag:

    masterpiece, blake, standing --n lowres, bad hands --w 512 --h 768 --d 42 --s 20 --l 7.5

`--n` negative prompt, `--w`/`--h` size (rounded to multiples of 8, at least 64), `--d` seed,
`--s` sampling steps, `--l` CFG scale. Without `--d` a prompt's seed is the base seed plus its
index, so the same prompt is rendered from the same noise at every epoch.

Plain Python, no imports from the features: the config checks every line when it is read, the
trainer renders them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from loraforge.errors import ForgeError

MIN_SIZE = 64
MAX_SIZE = 4096
MAX_STEPS = 500
MAX_CFG = 50.0
MAX_SEED = 2**63 - 1

FLAGS: dict[str, str] = {
    "n": "negative prompt",
    "w": "width",
    "h": "height",
    "d": "seed",
    "s": "steps",
    "l": "CFG scale",
}
_FLAG = re.compile(r"(?:^|(?<=\s))--(\S+)")


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
    """Parse one `train.sample_prompts` line. `index` (its position) picks the default seed
    (the base seed + index, wrapping past MAX_SEED);
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
        seed=int(number("d", (base.seed + index) % (MAX_SEED + 1), integer=True, low=0,
                        high=MAX_SEED)),
        steps=int(number("s", base.steps, integer=True, low=1, high=MAX_STEPS)),
        cfg=float(number("l", base.cfg, integer=False, low=0, high=MAX_CFG)),
    )


def parse_sample_prompts(lines: list[str], defaults: SamplePromptDefaults | None = None,
                         ) -> list[SamplePrompt]:
    """Every non-blank line that is not a `#` comment; index k = position in the result."""
    kept = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [parse_sample_prompt(line, defaults, index=k) for k, line in enumerate(kept)]
