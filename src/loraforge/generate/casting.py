"""Casting inside the U-Net: each figure's prompt and LoRA act in its region only.

How (all during the one denoising pass; nothing is composited afterwards):

- Prompts. The background prompt and each figure's prompt are encoded separately (a figure's own
  LoRA acting on the text encoder for its prompt only) and laid side by side along the token
  axis: `[background | figure 1 | figure 2 ...]`, each `L` tokens. The negative prompt fills
  every slot, so classifier-free guidance works unchanged.
- Cross-attention. `RegionalAttnProcessor` replaces every `attn2` processor of the U-Net and the
  ControlNet: a pixel's query attends to each slot's keys separately (one fused attention call
  with the slots side by side in the batch), and the slot outputs are blended per pixel by the
  region weights resized to the layer: inside figure i, `w * background + (1 - w) * figure i`
  (`w`: the background weight); outside every figure, the background alone. Weights sum to 1,
  so the output projection is shared.
- LoRAs. The scene's LoRAs are merged into the weights as usual. A figure's own LoRA stays
  unmerged (a peft adapter loaded by `LoraStack`) and a forward hook on each layer it adapts adds
  `scale * B(A(x))` times the figure's region at that layer's resolution; on `attn2.to_k/to_v`
  (which see text tokens, not pixels) the delta is added to the figure's own token slot. A
  layer without pixels (a resnet's time-embedding projection in a LoCon file) keeps its base
  weights for a figure's own LoRA.
  peft applies an adapter to whole tensors only, hence the hook; the adapter's own modules do the
  arithmetic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from loraforge.generate.regions import Regions

#: One adapted layer of a figure's LoRA: (the model's module, lora_A, lora_B, scale).
Delta = tuple[Any, Any, Any, float]


def layer_sizes(height: int, width: int, levels: int = 5) -> list[tuple[int, int]]:
    """The feature-map sizes of a U-Net on a `height` x `width` latent (stride-2 convolutions
    round up)."""
    sizes = [(height, width)]
    for _ in range(levels - 1):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


class RegionWeights:
    """The regions of a batch of images at every layer resolution, as tensors."""

    def __init__(self, regions: Sequence[Regions], background_weight: float, latent_h: int,
                 latent_w: int, device: torch.device, dtype: torch.dtype) -> None:
        import numpy as np
        import torch
        import torch.nn.functional as F

        figures = torch.from_numpy(np.stack([r.figures for r in regions]))  # [B, F, H, W]
        figures = F.adaptive_avg_pool2d(figures, (latent_h, latent_w))
        self.count = figures.shape[1]
        self.images = figures.shape[0]
        self.figure_maps: dict[tuple[int, int], torch.Tensor] = {}
        self.slot_weights: dict[int, torch.Tensor] = {}  # n -> [B, R, n]
        self.by_tokens: dict[int, tuple[int, int]] = {}
        self.rows: dict[tuple[int, int], torch.Tensor] = {}
        for h, w in layer_sizes(latent_h, latent_w):
            pooled = F.adaptive_avg_pool2d(figures, (h, w))
            self.figure_maps[(h, w)] = pooled.to(device, dtype)
            inside = pooled.sum(dim=1, keepdim=True).clamp(max=1.0)
            slots = torch.cat([1.0 - inside + background_weight * inside,
                               (1.0 - background_weight) * pooled], dim=1)
            self.slot_weights[h * w] = slots.flatten(2).to(device, dtype)
            self.by_tokens[h * w] = (h, w)

    def _rows(self, tensor: torch.Tensor, batch: int) -> torch.Tensor:
        if batch % self.images:
            raise ValueError(f"a batch of {batch} rows for {self.images} images")
        return tensor.repeat(batch // self.images, *([1] * (tensor.ndim - 1)))

    def slots(self, pixels: int, batch: int) -> torch.Tensor:
        """[batch, R, pixels, 1]: each slot's weight at each pixel of a layer."""
        key = (pixels, batch)
        if key not in self.rows:
            self.rows[key] = self._rows(self.slot_weights[pixels], batch)[..., None]
        return self.rows[key]

    def figure(self, index: int, output: torch.Tensor) -> torch.Tensor:
        """Figure `index`'s region shaped to multiply a layer's `output` ([B, C, h, w] or
        [B, h*w, C])."""
        if output.ndim == 4:
            maps = self.figure_maps[(output.shape[2], output.shape[3])]
            return self._rows(maps[:, index:index + 1], output.shape[0])
        h, w = self.by_tokens[output.shape[1]]
        flat = self.figure_maps[(h, w)][:, index].flatten(1).unsqueeze(-1)
        return self._rows(flat, output.shape[0])


class RegionalAttnProcessor:
    """Cross-attention per token slot, blended by region (see the module's docstring).

    `uniform_rows`: a batch row whose slots all hold the same tokens (the negative prompt's,
    under classifier-free guidance) attends to one slot only, which is the blend's value; only
    allowed when no figure LoRA changes a slot's keys or values."""

    def __init__(self, weights: RegionWeights, uniform_rows: bool) -> None:
        self.weights = weights
        self.uniform_rows = uniform_rows
        self.uniform: dict[tuple[int, int, tuple[int, ...]], torch.Tensor] = {}

    def _uniform(self, states: torch.Tensor, slots: int) -> torch.Tensor | None:
        """Which rows of `states` hold one prompt in every slot (None: all rows differ)."""
        if not self.uniform_rows:
            return None
        key = (states.data_ptr(), states._version, tuple(states.shape))
        if key not in self.uniform:
            split = states.view(states.shape[0], slots, -1, states.shape[-1])
            self.uniform[key] = (split == split[:, :1]).flatten(1).all(dim=1)
        found = self.uniform[key]
        return found if bool(found.any()) else None

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        import torch.nn.functional as F

        if encoder_hidden_states is None or hidden_states.ndim != 3 or attention_mask is not None:
            raise ValueError("regional attention serves the cross-attention of SD 1.x "
                             "transformer blocks only")
        slots = 1 + self.weights.count
        batch, pixels, _ = hidden_states.shape
        tokens = encoder_hidden_states.shape[1]
        if tokens % slots:
            raise ValueError(f"{tokens} prompt tokens do not split into {slots} regions")
        heads = attn.heads
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        dim = key.shape[-1] // heads
        weights = self.weights.slots(pixels, batch)
        uniform = self._uniform(encoder_hidden_states, slots)
        if uniform is None:
            out = _blend(query, key, value, weights, heads)
        else:
            out = query.new_empty(batch, pixels, heads * dim)
            one = uniform.nonzero().squeeze(1)
            width = tokens // slots
            q = query[one].view(len(one), pixels, heads, dim).transpose(1, 2)
            k = key[one, :width].view(len(one), width, heads, dim).transpose(1, 2)
            v = value[one, :width].view(len(one), width, heads, dim).transpose(1, 2)
            out[one] = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(
                len(one), pixels, heads * dim).to(out.dtype)
            rest = (~uniform).nonzero().squeeze(1)
            if len(rest):
                out[rest] = _blend(query[rest], key[rest], value[rest], weights[rest], heads)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def _blend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, weights: torch.Tensor,
           heads: int) -> torch.Tensor:
    """Attention of each pixel to each slot, blended by the slots' weights: the slots side by
    side in the batch, one fused attention call for all of them."""
    import torch.nn.functional as F

    batch, pixels, inner = query.shape
    slots = weights.shape[1]
    tokens = key.shape[1] // slots
    dim = inner // heads
    query = query.view(batch, 1, pixels, heads, dim).expand(batch, slots, pixels, heads, dim)
    query = query.reshape(batch * slots, pixels, heads, dim).transpose(1, 2)
    key = key.reshape(batch * slots, tokens, heads, dim).transpose(1, 2)
    value = value.reshape(batch * slots, tokens, heads, dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(query, key, value)  # [B * R, heads, pixels, dim]
    out = out.transpose(1, 2).reshape(batch, slots, pixels, inner)
    return (out * weights).sum(dim=1).to(query.dtype)


def _is_text_slot_layer(key: tuple[str, str]) -> bool:
    return key[1].endswith(("attn2.to_k", "attn2.to_v"))


class _RegionalDelta:
    """Every figure's own LoRA on one layer as one low-rank product: the figures' down weights
    stacked, each figure's rows of the low-rank activation scaled by its region, then their up
    weights side by side (an up weight is 1x1, so masking before it equals masking after)."""

    def __init__(self, weights: RegionWeights, items: list[tuple[int, Delta]],
                 text_slots: bool) -> None:
        import torch

        self.weights = weights
        self.text_slots = text_slots
        downs = [delta[1] for _, delta in items]
        self.conv = downs[0] if isinstance(downs[0], torch.nn.Conv2d) else None
        self.down = torch.cat([down.weight for down in downs]).detach()
        self.up = torch.cat([delta[2].weight * delta[3] for _, delta in items], dim=1).detach()
        # (figure, its rows of the low-rank activation), in the order of those rows
        self.spans = [(figure, delta[1].weight.shape[0]) for figure, delta in items]
        self.masks: dict[tuple[int, ...], torch.Tensor] = {}

    def _mask(self, figure: int, output: torch.Tensor) -> torch.Tensor:
        if not self.text_slots:
            return self.weights.figure(figure, output)
        slot = output.shape[1] // (1 + self.weights.count)
        own = output.new_zeros((1, output.shape[1], 1))
        own[:, (1 + figure) * slot:(2 + figure) * slot] = 1
        return own

    def _low_rank_mask(self, output: torch.Tensor) -> torch.Tensor:
        """Each figure's region repeated over its rows of the low-rank activation: one tensor
        to multiply by, made once per layer shape and batch."""
        import torch

        key = (*output.shape[:-1],) if output.ndim == 3 else (output.shape[0],
                                                                 *output.shape[2:])
        if key not in self.masks:
            dim = 1 if output.ndim == 4 else -1
            parts = []
            for figure, rows in self.spans:
                mask = self._mask(figure, output)
                size = list(mask.shape)
                size[dim] = rows
                parts.append(mask.expand(size))
            self.masks[key] = torch.cat(parts, dim=dim).to(self.down.dtype)
        return self.masks[key]

    def __call__(self, module: Any, args: tuple[Any, ...], output: torch.Tensor,
                 ) -> torch.Tensor:
        import torch.nn.functional as F

        if output.ndim not in (3, 4):  # no pixels to mask (a time-embedding projection)
            return output
        if self.down.device != args[0].device:  # model offload moves the layers at run time
            self.down, self.up = self.down.to(args[0].device), self.up.to(args[0].device)
            self.masks.clear()
        x = args[0].to(self.down.dtype)
        if self.conv is not None:
            low = F.conv2d(x, self.down, None, self.conv.stride, self.conv.padding,
                           self.conv.dilation)
        else:
            low = F.linear(x, self.down)
        low = low * self._low_rank_mask(output)
        delta = F.conv2d(low, self.up) if self.conv is not None else F.linear(low, self.up)
        return output + delta.to(output.dtype)


def _whole_hook(deltas: list[Delta]) -> Any:
    def hook(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        for _, down, up, scale in deltas:
            output = output + up(down(args[0])) * scale
        return output

    return hook


def figure_deltas(layers: dict[tuple[str, str], Delta], weight: float, component: str,
                  ) -> dict[tuple[str, str], Delta]:
    """A figure's LoRA layers of one component, with its weight folded into the scale."""
    return {key: (module, down, up, scale * weight) for key, (module, down, up, scale)
            in layers.items() if key[0] == component}


@contextlib.contextmanager
def text_lora(deltas: dict[tuple[str, str], Delta]) -> Iterator[None]:
    """A figure's LoRA acting on the whole text encoder while its prompt is encoded."""
    handles = [delta[0].register_forward_hook(_whole_hook([delta])) for delta in deltas.values()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _attn2_processors(model: Any, processor: RegionalAttnProcessor) -> dict[str, Any]:
    return {name: processor if name.endswith("attn2.processor") else current
            for name, current in model.attn_processors.items()}


@contextlib.contextmanager
def regional(pipe: Any, regions: Sequence[Regions], background_weight: float, width: int,
             height: int, unet_deltas: Sequence[dict[tuple[str, str], Delta]],
             ) -> Iterator[None]:
    """Casting on for the denoising inside the block: `regions[i]` for image i of the batch,
    `unet_deltas[f]` figure f's own LoRA layers (empty: none).

    Models compiled by generate.compile run eagerly inside the block: compiled, with the
    processors and hooks put in place around each batch, a two-image cast batch came out
    wrong (up to 163 levels off the eager images on the tiny model)."""
    import torch

    unet = pipe.unet
    weights = RegionWeights(regions, background_weight, height // 8, width // 8,
                            pipe._execution_device,  # the GPU, also with model offload
                            unet.dtype)
    models = [m for m in (unet, getattr(pipe, "controlnet", None)) if m is not None]
    saved = [dict(m.attn_processors) for m in models]
    by_layer: dict[tuple[str, str], list[tuple[int, Delta]]] = {}
    for figure, deltas in enumerate(unet_deltas):
        for key, delta in deltas.items():
            by_layer.setdefault(key, []).append((figure, delta))
    processor = RegionalAttnProcessor(weights, not any(map(_is_text_slot_layer, by_layer)))
    handles = []
    with torch.compiler.set_stance("force_eager"):
        try:
            for model in models:
                model.set_attn_processor(_attn2_processors(model, processor))
            for key, items in by_layer.items():
                hook = _RegionalDelta(weights, items, _is_text_slot_layer(key))
                handles.append(items[0][1][0].register_forward_hook(hook))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for model, processors in zip(models, saved, strict=True):
                model.set_attn_processor(processors)


@dataclass(frozen=True)
class CastPrompts:
    """The prompt embeddings of a cast scene: slots side by side along the tokens."""

    embeds: torch.Tensor  # [1, (1 + F) * L, C]
    negative: torch.Tensor  # the same shape: the negative prompt in every slot


def encode_cast(pipe: Any, background: str, negative: str, figures: Sequence[str],
                text_deltas: Sequence[dict[tuple[str, str], Delta]], clip_skip: int,
                max_chunks: int) -> CastPrompts:
    """Encode the background, the negative and each figure's prompt (figure f with its own
    text-encoder LoRA `text_deltas[f]`), all to the same number of 77-token chunks."""
    import torch

    from loraforge.generate.prompts import encode_prompts

    texts = [background, negative, *figures]
    encoded = encode_prompts(pipe.tokenizer, pipe.text_encoder, texts, clip_skip, max_chunks)
    slots = [encoded[0]]
    for index, deltas in enumerate(text_deltas):
        if deltas:
            with text_lora(deltas):
                own = encode_prompts(pipe.tokenizer, pipe.text_encoder, texts, clip_skip,
                                     max_chunks)
            slots.append(own[2 + index])
        else:
            slots.append(encoded[2 + index])
    return CastPrompts(torch.cat(slots, dim=1), torch.cat([encoded[1]] * len(slots), dim=1))
