"""Prompt encoding as A1111 and kohya do it: long prompts in chunks of 75 tokens, and clip skip.

A prompt of up to `max_chunks * 75` tokens is split into chunks of 75; each chunk is wrapped in
<BOS> ... <EOS> and padded to 77 with <EOS>, encoded by the text encoder on its own, and the
chunks' hidden states are concatenated (77 per chunk). Clip skip N takes the hidden states N layers
from the end and applies the final layer norm (clip skip 1 = the last layer); the layers after it
are not run. Training and generation share this, so a LoRA sees the same conditioning in both.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

CHUNK = 75


def chunk_token_ids(tokenizer: CLIPTokenizer, texts: list[str], max_chunks: int,
                    min_chunks: int = 1) -> torch.Tensor:
    """Token ids [batch, chunks * 77]; every row has as many chunks as the longest prompt needs."""
    import torch

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    bodies = [tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"][
        : max_chunks * CHUNK] for text in texts]
    chunks = max(min_chunks, *(max(1, math.ceil(len(b) / CHUNK)) for b in bodies))
    chunks = min(chunks, max_chunks)
    rows = []
    for body in bodies:
        row: list[int] = []
        for index in range(chunks):
            part = body[index * CHUNK:(index + 1) * CHUNK]
            row += [bos, *part, *[eos] * (CHUNK + 1 - len(part))]
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def encode_token_ids(text_encoder: CLIPTextModel, ids: torch.Tensor, clip_skip: int,
                     ) -> torch.Tensor:
    """Hidden states [batch, chunks * 77, width] for ids from `chunk_token_ids`."""
    batch, length = ids.shape
    flat = ids.reshape(batch * (length // (CHUNK + 2)), CHUNK + 2)
    encoder = text_encoder.encoder
    layers = encoder.layers
    if not 1 <= clip_skip <= len(layers):
        raise ValueError(f"clip skip {clip_skip} is outside 1..{len(layers)} for this text "
                         "encoder")
    distinct, rows = _distinct_rows(flat)
    encoder.layers = layers[:len(layers) + 1 - clip_skip]  # the layers after change nothing used
    try:
        hidden = text_encoder(distinct.to(text_encoder.device)).last_hidden_state  # final norm
    finally:
        encoder.layers = layers
    if rows is not None:
        import torch

        parts = hidden.unbind(0)
        hidden = torch.stack([parts[row] for row in rows])
    return hidden.reshape(batch, length, hidden.shape[-1])


def _distinct_rows(flat: torch.Tensor) -> tuple[torch.Tensor, list[int] | None]:
    """Each distinct chunk of `flat` once, and for each chunk the row it became (None: all were
    distinct). A batch often repeats a chunk (one caption drawn twice, the empty chunks that pad
    short prompts beside a long one): the text encoder runs it once. Its copies are stacked back
    from one tensor, so their gradients sum in a fixed order (index_select's backward would sum
    them with atomics on a GPU, in no fixed order, and resume would no longer be exact)."""
    seen: dict[tuple[int, ...], int] = {}
    rows = [seen.setdefault(tuple(chunk), len(seen)) for chunk in flat.tolist()]
    if len(seen) == len(rows):
        return flat, None
    first = [rows.index(row) for row in range(len(seen))]
    return flat[first], rows
