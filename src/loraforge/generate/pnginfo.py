"""The A1111 `parameters` PNG text chunk: what "PNG Info" in A1111, ComfyUI and Civitai reads.

Layout (three parts, as A1111 writes it):

    <prompt, one or more lines>
    Negative prompt: <negative prompt, one or more lines>     (left out when empty)
    Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 42, ...

The last line is `Key: value` pairs separated by ", "; a value holding a comma, a colon or a
newline is written as a JSON string in double quotes (A1111's quoting). The prompt carries a
`<lora:NAME:WEIGHT>` tag for each LoRA used, so that pasted into A1111 it applies them.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.fsutil import DEFAULT_FILE_MODE, save_atomic
from loraforge.generate.prompts import extract_lora_tags

if TYPE_CHECKING:
    from PIL import Image

PARAMETERS_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt:"
#: `Key: value` where value is a JSON string in quotes or runs to the next comma.
_PAIR_RE = re.compile(r'\s*(\w[\w \-/+.()]*?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_INT_KEYS = ("Steps", "Seed", "Clip skip")
_FLOAT_KEYS = ("CFG scale",)


def quote(value: object) -> str:
    """A value as A1111 writes it: bare, or a JSON string when it holds `,` `:` or a newline."""
    text = str(value)
    if not any(ch in text for ch in ",:\n") and not text.startswith('"'):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return str(json.loads(text))
        except ValueError:
            return text
    return text


def prompt_with_loras(prompt: str, loras: Sequence[tuple[str, float]]) -> str:
    """`prompt` (without `<lora:...>` tags) followed by one `<lora:NAME:WEIGHT>` tag for each
    LoRA used, in order: what A1111 needs to apply them."""
    tags = " ".join(f"<lora:{name}:{weight:g}>" for name, weight in loras)
    return f"{prompt.strip()} {tags}".strip()


def format_parameters(prompt: str, negative: str, fields: Mapping[str, object]) -> str:
    """The `parameters` text. `fields` in order (Steps, Sampler, CFG scale, Seed, Size, ...);
    None values are left out."""
    pairs = ", ".join(f"{key}: {quote(value)}" for key, value in fields.items()
                      if value is not None)
    lines = [prompt.strip()]
    if negative.strip():
        lines.append(f"{NEGATIVE_PREFIX} {negative.strip()}")
    lines.append(pairs)
    return "\n".join(lines)


def _pairs(line: str) -> list[tuple[str, str]]:
    return [(m.group(1).strip(), m.group(2)) for m in _PAIR_RE.finditer(line)
            if m.group(0).strip()]


def parse_parameters(text: str) -> dict[str, Any]:
    """Read a `parameters` text back: `prompt`, `negative_prompt`, then every `Key` of the last
    line with its value unquoted. Steps, Seed and Clip skip are ints, CFG scale a float; Size
    also gives `width` and `height`, Lora hashes gives `lora_hashes` ([(name, hash), ...]), and
    Sampler with Schedule type gives `sampler`, our name for it (`DPM++ 2M Karras`)."""
    lines = text.strip().split("\n")
    last = lines[-1]
    pairs = _pairs(last)
    if len(pairs) >= 3:
        lines = lines[:-1]
    else:
        pairs = []
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for raw in lines:
        line = raw.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX):].strip()
        (negative if in_negative else prompt).append(line)
    result: dict[str, Any] = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    for key, value in pairs:
        result[key] = unquote(value)
    for keys, kind in ((_INT_KEYS, int), (_FLOAT_KEYS, float)):
        for key in keys:
            if key in result:
                with contextlib.suppress(ValueError):
                    result[key] = kind(result[key])
    size = re.match(r"^(\d+)x(\d+)$", str(result.get("Size", "")))
    if size:
        result["width"], result["height"] = int(size.group(1)), int(size.group(2))
    sampler = result.get("Sampler")
    if sampler is not None:
        schedule = result.get("Schedule type")
        result["sampler"] = f"{sampler} {schedule}" if schedule == "Karras" else sampler
    if "Lora hashes" in result:
        result["lora_hashes"] = parse_lora_hashes(str(result["Lora hashes"]))
    return result


def format_lora_hashes(hashes: Sequence[tuple[str, str]]) -> str:
    """`Lora hashes` as A1111 writes it, `name: hash, name: hash`: each (name, hash) once, in
    order; two files of one name keep an entry each."""
    return ", ".join(f"{name}: {value}" for name, value in dict.fromkeys(hashes))


def parse_lora_hashes(text: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for item in text.split(","):
        name, sep, value = item.rpartition(":")
        if sep:
            found.append((name.strip(), value.strip()))
    return found


def save_png(image: Image.Image, path: Path, parameters: str | None,
             mode: int = DEFAULT_FILE_MODE) -> None:
    """Write `image` as PNG with the `parameters` text chunk, atomically."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters is not None:
        info.add_text(PARAMETERS_KEY, parameters)
    save_atomic(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), mode)


def read_parameters(path: Path) -> str | None:
    """The `parameters` text of a PNG, or None."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        value = getattr(image, "text", {}).get(PARAMETERS_KEY) or image.info.get(PARAMETERS_KEY)
    return value if isinstance(value, str) else None


#: Our own text chunk: the whole scene as JSON (what `loraforge generate --from` reads).
SCENE_KEY = "loraforge"


def save_png_with_scene(image: Image.Image, path: Path, parameters: str | None,
                        scene: Mapping[str, Any], mode: int = DEFAULT_FILE_MODE) -> None:
    """`save_png`, plus the `loraforge` chunk holding `scene` as JSON."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters is not None:
        info.add_text(PARAMETERS_KEY, parameters)
    info.add_text(SCENE_KEY, json.dumps(scene, ensure_ascii=False, sort_keys=True))
    save_atomic(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), mode)


def scene_chunk(path: Path) -> str | None:
    """The text of a PNG's `loraforge` chunk, or None when it has none."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        value = getattr(image, "text", {}).get(SCENE_KEY) or image.info.get(SCENE_KEY)
    return value if isinstance(value, str) else None


def read_scene(path: Path) -> dict[str, Any] | None:
    """The `loraforge` chunk of a PNG as a dict, or None when it has none (or it is not JSON)."""
    return parse_scene(scene_chunk(path))


def without_lora_tags(table: dict[str, Any]) -> dict[str, Any]:
    """A `[[scene]]` record with its prompts as `generate` writes them now: the `<lora:...>`
    tags that records made before kept in them taken out (their `loras` names the files those
    tags resolved to, at the weights they gave)."""
    for key in ("prompt", "negative"):
        if isinstance(table.get(key), str):
            with contextlib.suppress(ValueError):
                table[key] = extract_lora_tags(table[key])[0]
    return table


def parse_scene(value: str | None) -> dict[str, Any] | None:
    """A `loraforge` chunk's text as a dict, or None when there is none or it is not JSON."""
    try:
        scene = json.loads(value) if isinstance(value, str) else None
    except ValueError:
        return None
    return scene if isinstance(scene, dict) else None
