"""What each training step feeds the U-Net besides noise: the images' latents and the captions'
text states, computed once before the first step where the config allows, else every step.

- Latents (`train.cache_latents`): the VAE's mean for every (image, flip), from the disk cache
  (`latent_cache.py`) when `train.cache_latents_to_disk`, else encoded once in batches of
  `train.vae_batch_size`. With several processes each encodes its share, then all exchange them:
  no process waits for one encoding everything (a collective would time out on a large dataset).
  Without the cache (random crop, colour augmentation) each step encodes its own pixels.
- Text states (`train.cache_text_encoder_outputs`): cached only when they cannot change, that is
  with the text encoder frozen and no caption shuffled or dropped; prompts longer than one chunk
  are padded with the empty chunk's states, as the encoder would pad them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.train.distributed import World, from_main, gather_objects

if TYPE_CHECKING:
    import torch

    from loraforge.config import Settings
    from loraforge.dataset.examples import Draw, Example
    from loraforge.runs import RunRecord

log = logging.getLogger("loraforge.train")


class StepInputs:
    """The latents and text states of a batch of examples (indices into `examples`)."""

    def __init__(self, settings: Settings, examples: list[Example], world: World,
                 device: torch.device, dtype: torch.dtype, train_text: bool,
                 record: RunRecord) -> None:
        self.settings = settings
        self.cfg = settings.config.train
        self.data_cfg = settings.config.dataset
        self.examples = examples
        self.world = world
        self.device = device
        self.dtype = dtype
        self.train_text = train_text
        self.record = record
        #: (example index, flipped) -> latents [channels, h, w], when cached.
        self.latents: dict[tuple[int, bool], torch.Tensor] | None = None
        #: example index -> text states [chunks * 77, width], when cached.
        self.text_cache: dict[int, torch.Tensor] | None = None
        self.empty_chunk: torch.Tensor | None = None

    # --- latents -----------------------------------------------------------------------
    def encode_pixels(self, vae: Any, pixels: list[torch.Tensor]) -> torch.Tensor:
        """The VAE's mean latents, scaled, of images [3, h, w] of one size."""
        import torch

        with torch.no_grad():
            batch = torch.stack(pixels).to(self.device, torch.float32)
            dist = vae.encode(batch).latent_dist
        return dist.mean * vae.config.scaling_factor

    def vae_identity(self, base: Path) -> str:
        """The latent cache's VAE key; rank 0 hashes the weights, once for every process."""
        from loraforge.hashing import sha256_file

        weights = sorted((base / "vae").glob("*.safetensors"))
        digest = None
        if self.world.is_main:
            digest = sha256_file(weights[0], self.settings.cache_dir) if weights else str(base)
        return f"{from_main(digest, self.world)}|fp32|mean"

    def cache_latents(self, vae: Any, base: Path) -> None:
        """Every (image, flip) latent, from the disk cache or encoded once (see the module)."""
        from loraforge.dataset.examples import pixel_tensor
        from loraforge.train.latent_cache import LatentCache, file_sha256

        disk = self.settings.cache_dir if self.cfg.cache_latents_to_disk else None
        cache = LatentCache(disk, self.vae_identity(base))
        requests = []
        for example in self.examples:
            digest = file_sha256(example.path)
            for flip in (False, True) if example.policy.flip_aug else (False,):
                requests.append(cache.request(digest, example.bucket, flip,
                                              (example.index, flip)))
        keys = list(dict.fromkeys(r.key for r in requests))
        mine = set(keys[self.world.rank::self.world.size])
        found = cache.fill([r for r in requests if r.key in mine], lambda reqs: self.encode_pixels(
            vae, [pixel_tensor(self.examples[r.data[0]], r.data[1]) for r in reqs]),
            self.cfg.vae_batch_size)
        if self.world.distributed:
            found = {k: v.cpu() for k, v in found.items()}
        shares = gather_objects((found, cache.encoded, cache.warnings), self.world)
        everything = {k: v for share, _, _ in shares for k, v in share.items()}
        encoded = sum(count for _, count, _ in shares)
        for _, _, warnings in shares:
            for warning in warnings:
                log.warning(warning)
        log.info("latents: %d encoded, %d from the cache", encoded, len(requests) - encoded)
        self.record.update(latent_cache={"encoded": encoded, "reused": len(requests) - encoded,
                                         "disk": str(cache.directory) if disk else None})
        self.latents = {r.data: everything[r.key].to(self.device, self.dtype) for r in requests}

    def batch_latents(self, vae: Any, batch: list[int], draws: list[Draw], epoch: int,
                      positions: list[int]) -> torch.Tensor:
        """Latents [batch, channels, h, w] of one bucket's examples as drawn at `positions`."""
        import torch

        from loraforge.dataset.examples import pixel_tensor

        if self.latents is not None:
            return torch.stack([self.latents[(i, d.flip)]
                                for i, d in zip(batch, draws, strict=True)])
        seed = self.cfg.seed
        return self.encode_pixels(vae, [
            pixel_tensor(self.examples[i], d.flip, self.data_cfg.random_crop,
                         self.data_cfg.color_aug, (seed, epoch, p))
            for i, d, p in zip(batch, draws, positions, strict=True)]).to(self.dtype)

    # --- text states -------------------------------------------------------------------
    def cache_text(self, tokenizer: Any, text_encoder: Any) -> bool:
        """Every caption's text states, when they cannot change (see the module); whether
        they were cached (then the step no longer needs the text encoder)."""
        import torch

        from loraforge.dataset.examples import draw_example
        from loraforge.dataset.tags import caption_can_change
        from loraforge.text import chunk_token_ids, encode_token_ids

        if (not self.cfg.cache_text_encoder_outputs or self.train_text
                or any(caption_can_change(e.policy) for e in self.examples)):
            return False
        max_chunks, clip_skip = self.cfg.max_token_length // 75, self.cfg.clip_skip
        with torch.no_grad():
            self.text_cache = {
                e.index: encode_token_ids(text_encoder, chunk_token_ids(
                    tokenizer, [draw_example(e, 0, 0, 0).caption], max_chunks), clip_skip)[0]
                for e in self.examples}
            self.empty_chunk = encode_token_ids(text_encoder, chunk_token_ids(
                tokenizer, [""], 1), clip_skip)[0]
        log.info("text encoder outputs cached for %d captions", len(self.text_cache))
        self.record.update(text_cache=True)
        return True

    def text_states(self, tokenizer: Any, text_encoder: Any, captions: list[str],
                    batch: list[int]) -> torch.Tensor:
        """Text states [batch, chunks * 77, width] of the examples `batch`, captioned so."""
        import torch

        from loraforge.text import chunk_token_ids, encode_token_ids

        if self.text_cache is not None and self.empty_chunk is not None:
            rows = [self.text_cache[i] for i in batch]
            longest = max(row.shape[0] for row in rows)
            pad = self.empty_chunk
            return torch.stack([torch.cat([row, *[pad] * ((longest - row.shape[0])
                                                         // pad.shape[0])]) for row in rows])
        ids = chunk_token_ids(tokenizer, captions, self.cfg.max_token_length // 75)
        return encode_token_ids(text_encoder, ids, self.cfg.clip_skip)
