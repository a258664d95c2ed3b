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


def test_repeated_chunks_are_encoded_once_with_the_same_states_and_gradients(
        tiny_store: Path) -> None:
    """A batch that repeats a caption (or pads short prompts with empty chunks beside a long
    one) runs the text encoder on each distinct chunk once: every row still gets its own
    states, and the text encoder's LoRA gets the gradient of every row that used a chunk."""
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    base = tiny_store / "tiny-sd15"
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    encoder.requires_grad_(False)
    encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                   target_modules=["q_proj", "v_proj", "fc1"]))
    captions = ["red_knight", "blue_mage", "red_knight", "red_knight, solo, " * 30, "blue_mage"]
    ids = chunk_token_ids(tokenizer, captions, 3)  # 15 chunks: 3 long ones, 2 short, 1 empty
    seen: list[int] = []
    encoder.embeddings.register_forward_pre_hook(
        lambda _module, args, kwargs: seen.append((kwargs.get("input_ids") if args == ()
                                                   else args[0]).shape[0]), with_kwargs=True)
    weights = torch.randn((5, ids.shape[1], encoder.config.hidden_size),
                          generator=torch.Generator().manual_seed(0))

    def lora_grads(states: torch.Tensor) -> list[torch.Tensor]:
        (states * weights).sum().backward()
        grads = [p.grad.clone() for p in encoder.parameters() if p.grad is not None]
        encoder.zero_grad(set_to_none=True)
        return grads

    together = encode_token_ids(encoder, ids, 2)
    assert seen == [6]
    grads = lora_grads(together)
    alone = torch.cat([encode_token_ids(encoder, row[None], 2) for row in ids])
    assert seen[1:] == [2, 2, 2, 3, 2]  # a row alone: its chunk and one empty chunk
    assert torch.allclose(together, alone, atol=1e-6)
    assert torch.equal(together[0], together[2])
    expected = lora_grads(alone)
    assert len(grads) == 11 * 3 * 2  # clip skip 2 leaves the last layer's LoRA untouched
    for ours, theirs in zip(grads, expected, strict=True):
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
