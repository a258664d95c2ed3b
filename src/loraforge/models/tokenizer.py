"""The real CLIP BPE tokenizer (SD 1.x's), built offline from OpenAI's published merges file.

The vocabulary is fully determined by the merges file: 256 byte symbols, the same 256 with the
end-of-word marker, one token per merge (the first 48,894), then the two special tokens, giving
49,408 ids in the order OpenAI's CLIP and Stable Diffusion 1.x use.
"""

from __future__ import annotations

import functools
import gzip
import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

MERGES_RESOURCE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49408 - 256 - 256 - 2  # 48,894
VOCAB_SIZE = 49408
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77


def byte_symbols() -> list[str]:
    """The 256 printable symbols that stand for bytes, in CLIP's vocabulary order.

    Bytes that are already visible characters stand for themselves and come first, in byte order;
    every other byte (controls, space, a few Latin-1 gaps) is given the next free code point from
    256 upwards and follows them, again in byte order.
    """
    visible = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    visible_set = set(visible)
    symbols = [chr(b) for b in visible]
    extra = 0
    for b in range(256):
        if b not in visible_set:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def read_merges() -> list[tuple[str, str]]:
    """The first 48,894 merges of the packaged BPE file, as (left, right) pairs."""
    data = resources.files("loraforge").joinpath("data", MERGES_RESOURCE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges: list[tuple[str, str]] = []
    for line in lines[1 : NUM_MERGES + 1]:  # line 0 is the "#version" header
        left, right = line.split()
        merges.append((left, right))
    if len(merges) != NUM_MERGES:
        raise RuntimeError(f"{MERGES_RESOURCE} holds {len(merges)} merges, need {NUM_MERGES}")
    return merges


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """token -> id, in CLIP's order."""
    symbols = byte_symbols()
    tokens = [*symbols, *(s + END_OF_WORD for s in symbols)]
    tokens.extend(left + right for left, right in merges)
    tokens.extend([BOS, EOS])
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"CLIP vocabulary has {len(vocab)} distinct tokens, need {VOCAB_SIZE}")
    return vocab


@functools.cache
def build_clip_tokenizer() -> CLIPTokenizer:
    """SD 1.5's CLIP tokenizer (49,408 tokens, 77 positions), built without any download.

    Cached per process: treat the returned object as read-only (copy it before changing it).
    Calling it with padding or truncation changes its backend's saved state: to write one into
    a model folder, use `new_clip_tokenizer()`.
    """
    return new_clip_tokenizer()


def new_clip_tokenizer() -> CLIPTokenizer:
    """A fresh, never-called SD 1.5 CLIP tokenizer (what model folders are saved with)."""
    from transformers import CLIPTokenizer

    merges = read_merges()
    return CLIPTokenizer(
        vocab=clip_vocab(merges),
        merges=merges,
        unk_token=EOS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=MODEL_MAX_LENGTH,
    )


def write_vocab_files(folder: Path) -> None:
    """Write vocab.json and merges.txt (the slow-tokenizer files older tools read) into `folder`."""
    merges = read_merges()
    vocab = clip_vocab(merges)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
    lines = ["#version: 0.2", *(f"{left} {right}" for left, right in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
