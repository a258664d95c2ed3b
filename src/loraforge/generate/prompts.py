"""Prompts as A1111 reads them: attention weights, BREAK, long prompts, `<lora:...>` tags.

Syntax (the same as A1111's web UI):

- `(text)` multiplies the attention of `text` by 1.1, `((text))` by 1.1², `[text]` divides it by
  1.1, `(text:1.3)` multiplies it by 1.3; brackets nest and multiply; a bracket left open at the
  end applies to the rest of the prompt.
- `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are literal characters.
- `BREAK` (upper case, a word of its own) ends the current 75-token chunk.
- `<lora:NAME:WEIGHT>` adds a LoRA (see `loraforge.generate.loras`); the tag is removed from the
  text the text encoder sees.

Encoding: the prompt's tokens are cut into chunks of 75, each wrapped in <BOS> … <EOS> and padded
with <EOS> to 77 and encoded on its own with clip skip (`loraforge.text`, exactly as training
does). Each token's hidden state is multiplied by its weight, then each chunk is rescaled so its
mean is what it was before weighting (A1111's method: weights change the balance between tokens,
not the overall magnitude; skipped where that mean is ~0 and the ratio would be noise). A chunk
without weights is left bit-identical to training's encoding.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loraforge.text import CHUNK, encode_token_ids

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

log = logging.getLogger("loraforge.generate")

ROUND_FACTOR = 1.1
#: The mean is restored only when it is well defined: both means clearly away from zero (relative
#: to the chunk's mean magnitude) and a ratio in this range. A text encoder whose final layer
#: norm has no bias (the tiny test model) has a chunk mean of ~0, where the ratio is noise.
MEAN_FLOOR = 1e-3
RATIO_RANGE = (0.5, 2.0)
#: A segment with this weight is a BREAK (end of chunk), not text.
BREAK_WEIGHT = -1.0
BREAK_WORD = "BREAK"

_TOKEN_RE = re.compile(r"""
    \\[\\()\[\]]              # an escaped bracket or backslash
  | \\                        # a lone backslash
  | \(                        # open round
  | \[                        # open square
  | :\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)   # ':1.2)' closes a round bracket with a weight
  | \)                        # close round
  | \]                        # close square
  | [^\\()\[\]:]+             # plain text
  | :                         # a colon that is not a weight
""", re.VERBOSE)
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*")
_LORA_TAG_RE = re.compile(r"<lora:([^:<>]+)(?::([^:<>]*))?(?::[^<>]*)?>", re.IGNORECASE)


@dataclass(frozen=True)
class LoraTag:
    """A `<lora:NAME:WEIGHT>` tag found in a prompt."""

    name: str
    weight: float | None
    text: str


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """(the prompt without its `<lora:...>` tags, the tags in order).

    `<lora:name>` has no weight (the caller's default applies); `<lora:name:0.7>` has 0.7. A tag
    whose weight is not a number raises ValueError naming the tag.
    """
    tags: list[LoraTag] = []

    def take(match: re.Match[str]) -> str:
        name, raw = match.group(1).strip(), match.group(2)
        weight = None
        if raw is not None and raw.strip():
            try:
                weight = float(raw)
            except ValueError:
                raise ValueError(f"`{match.group(0)}`: the weight {raw!r} is not a number"
                                 ) from None
        tags.append(LoraTag(name, weight, match.group(0)))
        return ""

    text = _LORA_TAG_RE.sub(take, prompt)
    if tags:
        text = re.sub(r"\s*,(\s*,)+", ",", text)
        text = re.sub(r"[ \t]{2,}", " ", text).strip().strip(",").strip()
    return text, tags


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split an A1111 prompt into (text, weight) segments; a BREAK is ("BREAK", -1).

    E.g. `a (b:1.5) [c]` -> ("a ", 1.0), ("b", 1.5), (" ", 1.0), ("c", 1 / 1.1). Adjacent
    segments of equal weight are merged; an empty prompt is [("", 1.0)].
    """
    result: list[list[str | float]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for segment in result[start:]:
            segment[1] = float(segment[1]) * factor

    for match in _TOKEN_RE.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            result.append([token[1], 1.0])
        elif token == "(":
            round_open.append(len(result))
        elif token == "[":
            square_open.append(len(result))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND_FACTOR)
        elif token == "]" and square_open:
            multiply(square_open.pop(), 1 / ROUND_FACTOR)
        else:
            for index, part in enumerate(_BREAK_RE.split(token)):
                if index > 0:
                    result.append([BREAK_WORD, BREAK_WEIGHT])
                result.append([part, 1.0])
    for start in round_open:
        multiply(start, ROUND_FACTOR)
    for start in square_open:
        multiply(start, 1 / ROUND_FACTOR)

    merged: list[tuple[str, float]] = []
    for segment in result:
        part, weight = str(segment[0]), float(segment[1])
        if part == BREAK_WORD and weight == BREAK_WEIGHT:
            merged.append((part, weight))
            continue
        if not part:
            continue
        if merged and merged[-1][1] == weight and merged[-1][1] != BREAK_WEIGHT:
            merged[-1] = (merged[-1][0] + part, weight)
        else:
            merged.append((part, weight))
    return merged or [("", 1.0)]


@dataclass
class WeightedTokens:
    """Token ids and per-token weights, cut into chunks of 75 (without BOS/EOS)."""

    chunks: list[list[int]]
    weights: list[list[float]]
    truncated: int = 0  # tokens dropped beyond max_chunks

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for chunk in self.weights for w in chunk)


def tokenize_weighted(tokenizer: CLIPTokenizer, prompt: str, max_chunks: int) -> WeightedTokens:
    """The prompt's tokens with their weights, in chunks of at most 75 (BREAK ends a chunk)."""
    chunks: list[list[int]] = [[]]
    weights: list[list[float]] = [[]]
    for text, weight in parse_attention(prompt):
        if weight == BREAK_WEIGHT and text == BREAK_WORD:
            chunks.append([])
            weights.append([])
            continue
        ids = tokenizer(text, add_special_tokens=False, truncation=False,
                        verbose=False)["input_ids"]
        for token in ids:
            if len(chunks[-1]) == CHUNK:
                chunks.append([])
                weights.append([])
            chunks[-1].append(token)
            weights[-1].append(weight)
    if len(chunks) > 1 and not chunks[-1]:
        chunks.pop()
        weights.pop()
    truncated = sum(len(c) for c in chunks[max_chunks:])
    return WeightedTokens(chunks[:max_chunks], weights[:max_chunks], truncated)


def _rows(tokenizer: CLIPTokenizer, tokens: WeightedTokens, num_chunks: int,
          ) -> tuple[list[int], list[float]]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids: list[int] = []
    weights: list[float] = []
    for index in range(num_chunks):
        part = tokens.chunks[index] if index < len(tokens.chunks) else []
        part_w = tokens.weights[index] if index < len(tokens.weights) else []
        pad = CHUNK + 1 - len(part)
        ids += [bos, *part, *[eos] * pad]
        weights += [1.0, *part_w, *[1.0] * pad]
    return ids, weights


def _apply_weights(hidden: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Multiply each token's hidden state by its weight; restore each chunk's mean (A1111)."""
    import torch

    length = CHUNK + 2
    out = hidden.clone()
    for start in range(0, hidden.shape[1], length):
        w = weights[start:start + length]
        if all(x == 1.0 for x in w):
            continue
        z = hidden[:, start:start + length].float()
        before = z.mean()
        z = z * torch.tensor(w, dtype=torch.float32, device=z.device)[None, :, None]
        after = z.mean()
        floor = MEAN_FLOOR * float(z.abs().mean())
        if abs(float(before)) > floor and abs(float(after)) > floor:
            ratio = float(before / after)
            if RATIO_RANGE[0] <= ratio <= RATIO_RANGE[1]:
                z = z * ratio
        out[:, start:start + length] = z.to(hidden.dtype)
    return out


def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str],
                   clip_skip: int, max_chunks: int = 3) -> list[torch.Tensor]:
    """Hidden states [1, chunks * 77, width] per prompt, all with the same number of chunks
    (shorter prompts are padded with empty chunks, as A1111 pads the negative prompt)."""
    import torch

    if max_chunks < 1:
        raise ValueError("max_chunks must be at least 1")
    tokens = [tokenize_weighted(tokenizer, prompt, max_chunks) for prompt in prompts]
    for prompt, item in zip(prompts, tokens, strict=True):
        if item.truncated:
            log.warning("prompt longer than %d tokens: the last %d tokens are ignored (%r...)",
                        max_chunks * CHUNK, item.truncated, prompt[:60])
    num_chunks = max(len(item.chunks) for item in tokens)
    rows = [_rows(tokenizer, item, num_chunks) for item in tokens]
    ids = torch.tensor([row[0] for row in rows], dtype=torch.long)
    with torch.no_grad():
        hidden = encode_token_ids(text_encoder, ids, clip_skip)
    return [_apply_weights(hidden[i:i + 1], rows[i][1]) if tokens[i].weighted
            else hidden[i:i + 1] for i in range(len(prompts))]


def encode_prompt_pair(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompt: str,
                       negative: str, clip_skip: int, max_chunks: int = 3,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, negative_prompt_embeds), each [1, chunks * 77, width], same chunk count.

    `prompt` and `negative` use A1111's syntax (weights, BREAK); `<lora:...>` tags must already be
    removed (`extract_lora_tags`). The text encoder's active LoRA adapters apply.
    """
    embeds, negative_embeds = encode_prompts(tokenizer, text_encoder, [prompt, negative],
                                             clip_skip, max_chunks)
    return embeds, negative_embeds
