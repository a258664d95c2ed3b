"""Prompt encoding's clip skip: what A1111 and kohya read, computed without the unused layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraforge.text import chunk_token_ids, encode_token_ids


@pytest.mark.parametrize("clip_skip", [1, 2, 12])
def test_clip_skip_gives_the_normed_states_that_many_layers_from_the_end(
        tiny_store: Path, clip_skip: int) -> None:
    from transformers import CLIPTextModel, CLIPTokenizer

    base = tiny_store / "tiny-sd15"
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    ids = chunk_token_ids(tokenizer, ["red_knight, solo, " * 30, "blue_mage"], 3)
    with torch.no_grad():
        every = encoder(ids.reshape(-1, 77), output_hidden_states=True).hidden_states
        expected = encoder.final_layer_norm(every[-clip_skip]).reshape(2, ids.shape[1], -1)
        ours = encode_token_ids(encoder, ids, clip_skip)
    assert torch.equal(ours, expected)
    assert len(encoder.encoder.layers) == 12  # the model is whole again afterwards


def test_a_clip_skip_beyond_the_layers_is_refused_and_a_failed_encode_restores_them(
        tiny_store: Path) -> None:
    from transformers import CLIPTextModel, CLIPTokenizer

    base = tiny_store / "tiny-sd15"
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    layers = encoder.encoder.layers
    ids = chunk_token_ids(tokenizer, ["red_knight"], 1)
    for clip_skip in (0, 13):
        with pytest.raises(ValueError, match=f"clip skip {clip_skip} is outside 1..12"):
            encode_token_ids(encoder, ids, clip_skip)
    with pytest.raises(IndexError):  # a token id the vocabulary does not have
        encode_token_ids(encoder, ids + 10**6, 2)
    assert encoder.encoder.layers is layers
