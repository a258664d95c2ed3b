"""Captions as tags: the caption one training example sees in one epoch.

A caption is comma-separated tags (line breaks separate tags too, as in `dataset.scan`). The
kohya options LoRA users know, with the same names:

- `keep_tokens`: the first N tags are kept: never shuffled, never dropped, always in front.
- `keep_tokens_separator` (default `|||`): in a caption that contains it, everything before it is
  kept in front and only what follows is shuffled/dropped; this overrides `keep_tokens` for that
  caption. A second separator closes the shuffled part: what follows it is kept at the end
  (`blake ||| smiling, red hat ||| masterpiece`).
- `shuffle` (kohya's `shuffle_caption`): the other tags in a new order each time.
- `tag_dropout_rate` (kohya's `caption_tag_dropout_rate`): each non-kept tag is left out with
  this probability, independently.
- `caption_dropout_rate`: the whole caption is replaced by "" (unconditional training).
- `caption_prefix` / `caption_suffix`: text put around the result (see `render_caption`).

Every random draw comes from the `random.Random` passed in; `example_rng` derives one from
(seed, epoch, position) so a resumed run reproduces every caption without saved RNG state.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_TAG_SPLIT = re.compile(r"[,\r\n]+")
_EDGE = " \t\r\n,"


@dataclass(frozen=True)
class TagPolicy:
    """How captions are varied during training (kohya's dataset options)."""

    shuffle: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = "|||"
    caption_dropout_rate: float = 0.0
    tag_dropout_rate: float = 0.0
    caption_prefix: str = ""
    caption_suffix: str = ""
    flip_aug: bool = False  # not used here: carried for the trainer (and its cache decisions)

    def __post_init__(self) -> None:
        if self.keep_tokens < 0:
            raise ValueError(f"keep_tokens must be 0 or more, got {self.keep_tokens}")
        for name in ("caption_dropout_rate", "tag_dropout_rate"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {rate}")


def split_caption(text: str) -> list[str]:
    """Comma- (or line-) separated tags, stripped, empty ones dropped."""
    return [tag.strip() for tag in _TAG_SPLIT.split(text) if tag.strip()]


def _as_text(tags_or_text: str | Sequence[str]) -> str:
    return tags_or_text if isinstance(tags_or_text, str) else ", ".join(tags_or_text)


def split_kept(tags_or_text: str | Sequence[str], keep_tokens: int, separator: str = "|||",
               ) -> tuple[list[str], list[str], list[str]]:
    """(kept in front, variable, kept at the end) tags of a caption.

    With `separator` in the caption: the tags before its first occurrence are kept in front, the
    tags after a second occurrence are kept at the end, `keep_tokens` is ignored. Otherwise the
    first `keep_tokens` tags are kept in front. A list of tags is treated as the caption
    `", ".join(tags)`, so a separator inside a tag works the same as in the text.
    """
    text = _as_text(tags_or_text)
    if separator and separator in text:
        head, rest = text.split(separator, 1)
        middle, _, tail = rest.partition(separator)
        tail = tail.replace(separator, ",")
        return split_caption(head), split_caption(middle), split_caption(tail)
    tags = split_caption(text)
    return tags[:keep_tokens], tags[keep_tokens:], []


def _join(*parts: str) -> str:
    return ", ".join(part for part in parts if part)


def render_caption(tags_or_text: str | Sequence[str], policy: TagPolicy,
                   rng: random.Random) -> str:
    """The caption for one training example in one epoch.

    In order: caption dropout (draws one number when the rate is > 0; a dropped caption is "",
    prefix and suffix included), then each variable tag is dropped with `tag_dropout_rate`, then
    the remaining variable tags are shuffled when `shuffle` is on. Kept tags (see `split_kept`)
    are never dropped nor moved. The result is the tags joined with ", ", with `caption_prefix`
    before and `caption_suffix` after, each stripped of surrounding spaces and commas and joined
    with ", " (so "masterpiece," and "masterpiece" both give "masterpiece, blake, ..."); the
    prefix and suffix are not tags: `keep_tokens` counts the caption's own tags only. Draws come
    from `rng` alone, so the same rng state gives the same caption.
    """
    if policy.caption_dropout_rate > 0 and rng.random() < policy.caption_dropout_rate:
        return ""
    front, middle, back = split_kept(tags_or_text, policy.keep_tokens,
                                     policy.keep_tokens_separator)
    if policy.tag_dropout_rate > 0:
        middle = [tag for tag in middle if rng.random() >= policy.tag_dropout_rate]
    if policy.shuffle and len(middle) > 1:
        rng.shuffle(middle)
    body = ", ".join(front + middle + back)
    return _join(policy.caption_prefix.strip(_EDGE), body, policy.caption_suffix.strip(_EDGE))


def example_rng(seed: int, epoch: int, index: int, stream: str = "") -> random.Random:
    """A generator for one example's draws in one epoch, derived from sha256 of the numbers.

    `index` should identify the example's occurrence in the epoch, e.g. its position in the
    epoch's batch order (batch number x batch size + slot), so repeats of an image get different
    draws. `stream` separates independent uses (e.g. "caption", "crop", "flip"): each name gives
    an unrelated sequence. Unlike Python's `hash()`, the derivation is the same in every process.
    """
    material = f"loraforge:{stream}:{int(seed)}:{int(epoch)}:{int(index)}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(material).digest(), "big"))


def tag_count(tags_or_text: str | Sequence[str]) -> int:
    """How many tags a caption has."""
    return len(split_caption(_as_text(tags_or_text)))


def warn_short_captions(concept_name: str, captions: Iterable[str | Sequence[str]],
                        keep_tokens: int, separator: str = "|||") -> str | None:
    """One warning for a concept whose captions have fewer tags than `keep_tokens`, or None.

    Captions that use `separator` are not counted (it overrides `keep_tokens` for them). Such a
    short caption is kept entirely in place: nothing in it is shuffled or dropped.
    """
    if keep_tokens <= 0:
        return None
    counts = [tag_count(c) for c in captions
              if not (separator and separator in _as_text(c))]
    short = [n for n in counts if n < keep_tokens]
    if not short:
        return None
    verb = "has" if len(short) == 1 else "have"
    return (f"concept '{concept_name}': keep_tokens is {keep_tokens} but {len(short)} of "
            f"{len(counts)} captions {verb} fewer tags (the shortest has {min(short)}), so "
            "nothing in them is ever shuffled or dropped; lower keep_tokens or add tags")


def caption_can_change(policy: TagPolicy) -> bool:
    """Whether one caption can render differently between draws (shuffle or any dropout on).

    When False, text-encoder outputs can be computed once and cached. Conservative: shuffling a
    caption whose tags are all kept still counts as a change.
    """
    return policy.shuffle or policy.caption_dropout_rate > 0 or policy.tag_dropout_rate > 0
