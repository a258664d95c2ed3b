"""`loraforge train`: one multi-concept LoRA over every concept folder, resumable at any step.

The run folder `<storage>/Multi_Concept_Output/<run>/` holds the epoch files, the final file,
`state/` (resumable training state), `run.json`, `train.log` and `events/` (TensorBoard).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge import runs
from loraforge.errors import ForgeError
from loraforge.hashing import env_time
from loraforge.train.state import Position

if TYPE_CHECKING:
    import torch

    from loraforge.config import Settings
    from loraforge.dataset.scan import Dataset

#: Exit code after a signal: state saved, rerun the same command to resume (EX_TEMPFAIL).
RESUMABLE_EXIT = 75
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
#: Keys that may change between an interruption and its resume without changing the result.
RESUME_SAFE = {
    "train.run_name", "train.save_every_n_epochs", "train.keep_last_n", "train.save_precision",
    "train.state_every_n_steps", "train.keep_states", "train.log_every_seconds",
}
#: Sections of the config that decide the trained weights.
SEMANTIC_SECTIONS = ("models", "dataset", "train")
LOSS_SMOOTHING = 0.98
#: One JSON line per optimizer step; after a resume the last line for a step wins.
HISTORY = "history.jsonl"

log = logging.getLogger("loraforge.train")


class StopRequest:
    """Turns SIGTERM/SIGINT/SIGUSR1 into a flag the loop checks between optimizer steps."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for name in STOP_SIGNALS:
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, _frame: Any) -> None:
        self.signal_name = signal.Signals(number).name
        log.warning("%s received: saving state at the end of this step", self.signal_name)

    def __exit__(self, *_exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


class Interrupted(Exception):
    """Training stopped on a signal after saving its state; the run can be resumed."""


@dataclass
class Plan:
    """How many steps, how batches group into optimizer steps."""

    batch_size: int
    accumulation: int
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int


def make_plan(settings: Settings, batches: int) -> Plan:
    """`batches`: batches per epoch (single-bucket batches, so more than items / batch size)."""
    train = settings.config.train
    steps_per_epoch = math.ceil(batches / train.gradient_accumulation_steps)
    if train.max_steps:
        total = train.max_steps
        epochs = math.ceil(total / steps_per_epoch)
    else:
        epochs = train.epochs
        total = epochs * steps_per_epoch
    return Plan(train.batch_size, train.gradient_accumulation_steps, batches, steps_per_epoch,
                total, epochs)


def semantic_config(settings: Settings, examples: list[Any]) -> dict[str, Any]:
    """What decides the trained weights: the config's sections, and the images themselves."""
    data = settings.to_dict()
    images = hashlib.sha256(json.dumps([(str(e.path), e.concept, e.bucket)
                                        for e in examples]).encode()).hexdigest()[:16]
    return {**{section: data[section] for section in SEMANTIC_SECTIONS},
            "images": {"dataset": images}}


def _setup_logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("loraforge")
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in root.handlers):
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(stream)
    return handler


def _disk_error(exc: OSError, what: Path) -> ForgeError:
    return ForgeError(f"could not write {what.name}: {exc.strerror or exc} (the disk or your "
                      "quota is full?)", path=what,
                      fix="free space (or raise the quota) and rerun the same command: training "
                          "resumes from the last state that was saved completely")


@dataclass
class Models:
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    alphas_cumprod: Any
    num_timesteps: int
    scheduler_config: Any
    targets: list[Any] = field(default_factory=list)


class Trainer:
    def __init__(self, settings: Settings, dataset: Dataset, run_dir: Path) -> None:
        import torch

        from loraforge.dataset.examples import batches_per_epoch, build_examples, repeated_indices
        from loraforge.runtime import pick_device

        self.settings = settings
        self.cfg = settings.config.train
        self.data_cfg = settings.config.dataset
        self.dataset = dataset
        self.run_dir = run_dir
        self.examples = build_examples(dataset, self.data_cfg, log.warning)
        self.indices = repeated_indices(dataset)
        self.plan = make_plan(settings, batches_per_epoch(self.examples, self.indices,
                                                          self.cfg.batch_size))
        uncachable = [k for k in ("random_crop", "color_aug") if getattr(self.data_cfg, k)]
        if uncachable and self.cfg.cache_latents:
            raise ForgeError(f"dataset.{uncachable[0]} changes the pixels every epoch, so the "
                             "VAE latents cannot be cached (train.cache_latents = true)",
                             path=settings.source,
                             fix=f"set train.cache_latents = false to train with "
                                 f"{' and '.join(uncachable)} (slower: the VAE runs every "
                                 f"step), or turn {' and '.join(uncachable)} off")
        from loraforge.train.previews import defaults_from_config, parse_sample_prompts

        self.sample_prompts = parse_sample_prompts(self.cfg.sample_prompts,
                                                   defaults_from_config(settings.to_dict()))
        self.latents: dict[tuple[int, bool], torch.Tensor] | None = None
        self.text_cache: dict[int, torch.Tensor] | None = None
        self.device = pick_device()
        on_gpu = self.device.type == "cuda"
        precision = self.cfg.mixed_precision if on_gpu else "no"
        self.precision = precision
        self.dtype = {"no": torch.float32, "fp16": torch.float16,
                      "bf16": torch.bfloat16}[precision]
        self.train_text = self.cfg.text_encoder_lr > 0
        from loraforge.train.optim import optimizer_class

        optimizer_class(self.cfg.optimizer, self.device)  # fail before minutes of model loading
        self.mode = settings.file_mode
        self.record = runs.RunRecord(run_dir, self.mode)

    # --- setup -------------------------------------------------------------------------
    def load_models(self, base: Path) -> Models:
        import torch
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from loraforge.train import network

        log.info("loading base model %s", base)
        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer",
                                                  local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder",
                                                     local_files_only=True,
                                                     torch_dtype=torch.float32)
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", local_files_only=True,
                                            torch_dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet",
                                                    local_files_only=True,
                                                    torch_dtype=torch.float32)
        scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler",
                                                  local_files_only=True)
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        targets = network.unet_targets(unet, cfg.network_dim, cfg.network_alpha, cfg.conv_dim,
                                       cfg.conv_alpha)
        network.inject(unet, targets)
        text_encoder.requires_grad_(False)
        if self.train_text:
            text = network.text_targets(text_encoder, cfg.network_dim, cfg.network_alpha)
            network.inject(text_encoder, text)
            targets += text
        vae.requires_grad_(False)
        for model in (unet, text_encoder):
            for name, param in model.named_parameters():
                if "lora_" not in name:
                    param.data = param.data.to(self.dtype)
            model.to(self.device)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if self.train_text:
                text_encoder.gradient_checkpointing_enable()
        unet.train()
        text_encoder.train(self.train_text)
        vae.to(self.device).eval()
        return Models(tokenizer, text_encoder, vae, unet, scheduler.alphas_cumprod.to(self.device),
                      scheduler.config.num_train_timesteps, scheduler.config, targets)

    def encode_pixels(self, models: Models, pixels: list[torch.Tensor]) -> torch.Tensor:
        import torch

        with torch.no_grad():
            batch = torch.stack(pixels).to(self.device, torch.float32)
            dist = models.vae.encode(batch).latent_dist
        return dist.mean * models.vae.config.scaling_factor

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        from loraforge.dataset.buckets import bucket_counts

        return dict(bucket_counts(self.indices, [e.bucket for e in self.examples]))

    def bucket_info(self) -> dict[str, Any]:
        from loraforge.dataset.buckets import aspect_error, bucket_info

        errors = [aspect_error(r.width, r.height, e.bucket) for e, (_, r)
                  in zip(self.examples, self.dataset.images(), strict=True)]
        return bucket_info(self.bucket_counts(), errors)

    def write_dataset_summary(self) -> None:
        """dataset.json: the check's table plus each concept's buckets (the report shows it)."""
        from loraforge.dataset.check import summarize
        from loraforge.fsutil import write_atomic

        summary = summarize(self.dataset, self.cfg.batch_size, self.plan.epochs,
                            self.cfg.max_steps, self.examples)
        write_atomic(self.run_dir / "dataset.json", json.dumps(summary, indent=1), self.mode)

    def vae_identity(self, base: Path) -> str:
        from loraforge.hashing import sha256_file

        weights = sorted((base / "vae").glob("*.safetensors"))
        digest = sha256_file(weights[0], self.settings.cache_dir) if weights else str(base)
        return f"{digest}|fp32|mean"

    def cache_latents(self, models: Models, base: Path) -> None:
        """Every (image, flip) latent, from the disk cache or encoded once in batches."""
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
        found = cache.fill(requests, lambda reqs: self.encode_pixels(
            models, [pixel_tensor(self.examples[r.data[0]], r.data[1]) for r in reqs]), 8)
        for warning in cache.warnings:
            log.warning(warning)
        log.info("latents: %d encoded, %d from the cache", cache.encoded,
                 len(requests) - cache.encoded)
        self.record.update(latent_cache={"encoded": cache.encoded,
                                         "reused": len(requests) - cache.encoded,
                                         "disk": str(cache.directory) if disk else None})
        self.latents = {r.data: found[r.key].to(self.device, self.dtype) for r in requests}

    def cache_text(self, models: Models) -> None:
        """Text-encoder outputs of every caption, computed once, when they cannot change (no
        text-encoder training, no shuffle or dropout); the text encoder is then freed."""
        import torch

        from loraforge.dataset.examples import draw_example
        from loraforge.dataset.tags import caption_can_change
        from loraforge.text import chunk_token_ids, encode_token_ids

        if (not self.cfg.cache_text_encoder_outputs or self.train_text
                or any(caption_can_change(e.policy) for e in self.examples)):
            return
        max_chunks = self.cfg.max_token_length // 75
        with torch.no_grad():
            self.text_cache = {
                e.index: encode_token_ids(models.text_encoder, chunk_token_ids(
                    models.tokenizer, [draw_example(e, 0, 0, 0).caption], max_chunks),
                    self.cfg.clip_skip)[0] for e in self.examples}
            self.empty_chunk = encode_token_ids(models.text_encoder, chunk_token_ids(
                models.tokenizer, [""], 1), self.cfg.clip_skip)[0]
        if not self.sample_prompts:
            models.text_encoder = None
        log.info("text encoder outputs cached for %d captions", len(self.text_cache))
        self.record.update(text_cache=True)

    def text_states(self, models: Models, captions: list[str], indices: list[int],
                    ) -> torch.Tensor:
        import torch

        from loraforge.text import chunk_token_ids, encode_token_ids

        if self.text_cache is not None:
            rows = [self.text_cache[i] for i in indices]
            longest = max(row.shape[0] for row in rows)
            return torch.stack([torch.cat([row, *[self.empty_chunk] * (
                (longest - row.shape[0]) // self.empty_chunk.shape[0])]) for row in rows])
        ids = chunk_token_ids(models.tokenizer, captions, self.cfg.max_token_length // 75)
        return encode_token_ids(models.text_encoder, ids, self.cfg.clip_skip)

    # --- the loop ----------------------------------------------------------------------
    def run(self, base: Path, restart: bool, facts_for: Any) -> Path:
        """Train to the end; raises Interrupted (state saved) on SIGTERM/SIGINT/SIGUSR1, which
        are caught from the very start, model loading and latent caching included."""
        with StopRequest() as stop:
            return self._run(base, restart, facts_for, stop)

    def _run(self, base: Path, restart: bool, facts_for: Any, stop: StopRequest) -> Path:
        import torch
        from torch.utils.tensorboard import SummaryWriter

        from loraforge.dataset.examples import epoch_batches
        from loraforge.train.optim import build_optimizer, build_scheduler, warmup_steps
        from loraforge.train.progress import TrainingProgress
        from loraforge.train.state import load_state, saved_states

        cfg, plan = self.cfg, self.plan
        # A state from another config is refused before minutes of model loading.
        states = [] if restart else saved_states(self.run_dir)
        state = load_state(states[-1]) if states else None
        if state is not None:
            self.check_resumable(state.config, state.path)
        models = self.models = self.load_models(base)
        self.unet_forward = models.unet
        if cfg.compile_unet and self.device.type == "cuda":
            # One graph per bucket shape: fewer kernel launches, which bound small batches.
            self.unet_forward = torch.compile(models.unet)
        params_unet = [p for p in models.unet.parameters() if p.requires_grad]
        params_text = [p for p in models.text_encoder.parameters() if p.requires_grad]
        groups = [{"params": params_unet, "lr": cfg.unet_lr}]
        if self.train_text:
            groups.append({"params": params_text, "lr": cfg.text_encoder_lr})
        self.trainable = params_unet + params_text
        self.optimizer = build_optimizer(cfg.optimizer, groups, cfg.optimizer_args, self.device)
        self.scheduler = build_scheduler(cfg.lr_scheduler, self.optimizer, plan.total_steps,
                                         cfg.lr_warmup, cfg.lr_scheduler_cycles,
                                         cfg.lr_scheduler_power)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        named = self.named_lora(models)

        position = Position()
        if state is not None:
            with torch.no_grad():
                for key, tensor in state.weights.items():
                    named[key].copy_(tensor)
            self.optimizer.load_state_dict(state.trainer_state["optimizer"])
            self.scheduler.load_state_dict(state.trainer_state["scheduler"])
            self.scaler.load_state_dict(state.trainer_state["scaler"])
            position = state.position
            log.info("resuming from %s (step %d of %d)", state.path, position.step,
                     plan.total_steps)

        if cfg.cache_latents:
            self.cache_latents(models, base)
            if not self.sample_prompts:
                models.vae = None
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        self.cache_text(models)
        facts = facts_for(self, self.optimizer, warmup_steps(cfg.lr_warmup, plan.total_steps))
        writer = SummaryWriter(str(self.run_dir / "events"), purge_step=position.step + 1)
        history = open(self.run_dir / HISTORY, "a", encoding="utf-8")  # noqa: SIM115
        self.write_dataset_summary()
        progress = TrainingProgress(plan.total_steps, position.step, cfg.log_every_seconds)
        self.record.update(status="running", step=position.step, total_steps=plan.total_steps)

        def save(reason: str) -> None:
            trainer_state = {"optimizer": self.optimizer.state_dict(),
                             "scheduler": self.scheduler.state_dict(),
                             "scaler": self.scaler.state_dict()}
            try:
                path = self.save_state(position, named, trainer_state)
            except OSError as exc:
                raise _disk_error(exc, self.run_dir / "state") from None
            log.info("state saved (%s): %s", reason, path)

        try:
            if stop.requested:  # a signal came while models loaded or latents were cached
                raise Interrupted
            for epoch in range(position.epoch, plan.epochs):
                batches = epoch_batches(self.examples, self.indices, plan.batch_size,
                                        cfg.seed, epoch)
                for first in range(position.batch_in_epoch, len(batches), plan.accumulation):
                    if position.step >= plan.total_steps:
                        break
                    group = batches[first:first + plan.accumulation]
                    loss_value = self.optimizer_step(models, batches, first, epoch,
                                                     position.step)
                    position.step += 1
                    position.batch_in_epoch = first + len(group)
                    position.loss_ema = (LOSS_SMOOTHING * position.loss_ema
                                         + (1 - LOSS_SMOOTHING) * loss_value)
                    smoothed = position.smoothed_loss(LOSS_SMOOTHING)
                    lrs = self.scheduler.get_last_lr()
                    writer.add_scalar("loss/step", loss_value, position.step)
                    writer.add_scalar("loss/smoothed", smoothed, position.step)
                    for group_name, lr in zip(("unet", "text_encoder"), lrs, strict=False):
                        writer.add_scalar(f"lr/{group_name}", lr, position.step)
                    history.write(json.dumps({
                        "step": position.step, "epoch": epoch + 1, "loss": loss_value,
                        "loss_smoothed": smoothed, "lr": lrs,
                        "seconds": round(time.monotonic() - progress.started, 4)}) + "\n")
                    progress.update(position.step, epoch + 1, smoothed, lrs[0],
                                    sum(len(b) for b in group))
                    if stop.requested:
                        save(f"signal {stop.signal_name}")
                        raise Interrupted
                    if position.step % cfg.state_every_n_steps == 0:
                        save("periodic")
                if position.batch_in_epoch < len(batches):
                    break  # max_steps reached inside this epoch
                position.epoch, position.batch_in_epoch = epoch + 1, 0
                if (epoch + 1) % cfg.save_every_n_epochs == 0 and epoch + 1 < plan.epochs:
                    self.save_lora(runs.epoch_lora(self.run_dir, epoch + 1), models, facts,
                                   position, epoch + 1)
                    self.prune_epochs()
                last = epoch + 1 == plan.epochs
                if (epoch + 1) % cfg.sample_every_n_epochs == 0 or last:
                    self.render_previews(models, epoch + 1)
                self.write_report()
                if stop.requested:
                    save(f"signal {stop.signal_name}")
                    raise Interrupted
        finally:
            progress.close()
            writer.close()
            history.close()

        final = runs.final_lora(self.run_dir)
        self.save_lora(final, models, facts, position, plan.epochs)
        self.record.update(status="finished", step=position.step,
                           final_loss=position.smoothed_loss(LOSS_SMOOTHING),
                           final_lora=str(final),
                           finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        shutil.rmtree(self.run_dir / "state", ignore_errors=True)
        self.write_report()
        return final

    def render_previews(self, models: Models, epoch: int) -> None:
        """Sample prompts rendered with the LoRA as it is now, each from its own fixed seed:
        the training's random stream is untouched (every draw there is seeded per step)."""
        import torch

        from loraforge.fsutil import save_atomic
        from loraforge.generate.pipeline import build_pipeline, render
        from loraforge.generate.prompts import encode_prompt_pair
        from loraforge.generate.samplers import make_scheduler
        from loraforge.train.previews import preview_path, write_grid

        if not self.sample_prompts:
            return
        scheduler = make_scheduler(self.cfg.sample_sampler, models.scheduler_config)
        pipe = build_pipeline(models.tokenizer, models.text_encoder, models.vae, models.unet,
                              scheduler)
        autocast = (torch.autocast("cuda", dtype=self.dtype) if self.precision != "no"
                    else nullcontext())
        models.unet.eval()
        try:
            with torch.no_grad(), autocast:
                for index, sample in enumerate(self.sample_prompts):
                    embeds, negative = encode_prompt_pair(
                        models.tokenizer, models.text_encoder, sample.prompt, sample.negative,
                        self.cfg.clip_skip, self.cfg.max_token_length // 75)
                    image = render(pipe, embeds, negative, sample.width, sample.height,
                                   sample.steps, sample.cfg, sample.seed)
                    save_atomic(preview_path(self.run_dir, epoch, index, sample),
                                lambda tmp, im=image: im.save(tmp, format="PNG"), self.mode)
            write_grid(self.run_dir, self.sample_prompts, epoch, self.mode)
            log.info("previews of epoch %d: %s", epoch, self.run_dir / "samples")
        except Exception as exc:  # a preview is a courtesy: training goes on without it
            log.warning("previews of epoch %d not made: %s", epoch, exc)
        finally:
            models.unet.train()

    def write_report(self) -> None:
        from loraforge.report.html import write_report

        try:
            write_report(self.run_dir, self.mode)
        except OSError as exc:
            log.warning("report.html not written: %s", exc)

    def optimizer_step(self, models: Models, batches: list[list[int]], first: int, epoch: int,
                       step: int) -> float:
        """Forward and backward over batches[first:first + accumulation], then one optimizer
        step. Returns the mean loss."""
        import torch

        from loraforge.dataset.examples import draw_example, pixel_tensor
        from loraforge.train import objective

        cfg = self.cfg
        group = batches[first:first + self.plan.accumulation]
        generator = objective.step_generator(cfg.seed, step, self.device)
        autocast = (torch.autocast("cuda", dtype=self.dtype) if self.precision != "no"
                    else nullcontext())
        text_grad = nullcontext() if self.train_text else torch.no_grad()
        total = 0.0
        for number, batch in enumerate(group, start=first):
            positions = [number * self.plan.batch_size + slot for slot in range(len(batch))]
            draws = [draw_example(self.examples[i], cfg.seed, epoch, p)
                     for i, p in zip(batch, positions, strict=True)]
            if self.latents is not None:
                latents = torch.stack([self.latents[(i, d.flip)]
                                       for i, d in zip(batch, draws, strict=True)])
            else:
                latents = self.encode_pixels(models, [
                    pixel_tensor(self.examples[i], d.flip, self.data_cfg.random_crop,
                                 self.data_cfg.color_aug, (cfg.seed, epoch, p))
                    for i, d, p in zip(batch, draws, positions, strict=True)]).to(self.dtype)
            noise_draw = objective.draw(latents, models.num_timesteps, cfg.noise_offset,
                                        generator)
            with autocast:
                with text_grad:
                    hidden = self.text_states(models, [d.caption for d in draws], batch)
                noisy = self.add_noise(models, latents, noise_draw)
                prediction = self.unet_forward(noisy, noise_draw.timesteps,
                                         encoder_hidden_states=hidden).sample
            weights = objective.loss_weights(models.alphas_cumprod, noise_draw.timesteps,
                                             cfg.min_snr_gamma)
            if any(self.examples[i].is_reg for i in batch):
                prior = torch.tensor([cfg.prior_loss_weight if self.examples[i].is_reg else 1.0
                                      for i in batch], device=self.device)
                weights = prior if weights is None else weights * prior
            loss = objective.denoising_loss(prediction, noise_draw.noise, weights)
            self.scaler.scale(loss / len(group)).backward()
            total += loss.item() / len(group)
        self.scaler.unscale_(self.optimizer)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def add_noise(self, models: Models, latents: torch.Tensor, draw: Any) -> torch.Tensor:
        alpha_bar = models.alphas_cumprod[draw.timesteps].to(latents.dtype)
        alpha_bar = alpha_bar.view(-1, 1, 1, 1)
        return alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * draw.noise

    # --- files -------------------------------------------------------------------------
    def named_lora(self, models: Models) -> dict[str, torch.Tensor]:
        from loraforge.train.network import lora_weights

        return lora_weights({"unet": models.unet, "text_encoder": models.text_encoder},
                            models.targets)

    def save_state(self, position: Position, named: dict[str, torch.Tensor],
                   trainer_state: dict[str, Any]) -> Path:
        from loraforge.train.state import save_state

        return save_state(self.run_dir, position, named, trainer_state,
                          semantic_config(self.settings, self.examples), self.cfg.keep_states,
                          self.mode)

    def check_resumable(self, saved: dict[str, Any], path: Path) -> None:
        from loraforge.train.state import config_differences

        diffs = config_differences(saved, semantic_config(self.settings, self.examples),
                                   RESUME_SAFE)
        if diffs:
            shown = "\n  ".join(diffs)
            raise ForgeError(f"cannot resume run `{self.run_dir.name}`: its saved state was "
                             f"written with a different config or dataset (images.dataset: "
                             f"the list of images):\n  {shown}",
                             path=path,
                             fix=f"undo those changes to resume, pass --restart to start "
                                 f"`{self.run_dir.name}` over, or train under a new --run name")

    def save_lora(self, path: Path, models: Models, facts: Any, position: Position,
                  epoch: int) -> None:
        from loraforge.train.export import kohya_state_dict, save_lora
        from loraforge.train.metadata import lora_metadata

        components = {"unet": models.unet, "text_encoder": models.text_encoder}
        tensors = kohya_state_dict(components, models.targets, self.cfg.save_precision)
        finished = env_time() or time.time()
        meta = lora_metadata(self.settings, self.dataset, facts, position.step, epoch, finished)
        try:
            save_lora(path, tensors, meta, self.mode)
        except OSError as exc:
            raise _disk_error(exc, path) from None
        log.info("saved %s", path)

    def prune_epochs(self) -> None:
        files = sorted(self.run_dir.glob(f"{self.run_dir.name}-[0-9][0-9][0-9][0-9][0-9][0-9]"
                                         ".safetensors"))
        for old in files[:-self.cfg.keep_last_n]:
            old.unlink(missing_ok=True)


SLURM_FIELDS = {"job_id": "SLURM_JOB_ID", "node": "SLURMD_NODENAME",
                "restart_count": "SLURM_RESTART_COUNT", "array_job_id": "SLURM_ARRAY_JOB_ID",
                "array_task_id": "SLURM_ARRAY_TASK_ID", "job_name": "SLURM_JOB_NAME"}


def slurm_job() -> dict[str, str] | None:
    """The SLURM job this process runs in, as recorded in run.json (None outside SLURM)."""
    found = {key: os.environ[var] for key, var in SLURM_FIELDS.items() if var in os.environ}
    return found or None


def _optimizer_description(optimizer: Any, args: dict[str, Any]) -> str:
    cls = type(optimizer)
    shown = ",".join(f"{k}={v}" for k, v in sorted(args.items()))
    return f"{cls.__module__}.{cls.__name__}({shown})"


@dataclass
class TrainResult:
    final: Path
    trainer: Trainer | None  # None when the run had already finished


def train(settings: Settings, run_name: str | None, restart: bool) -> TrainResult:
    """Train (or resume) one run; returns the final LoRA file and the trainer that made it."""
    from loraforge.dataset.scan import scan_dataset
    from loraforge.runtime import go_offline

    name = runs.check_run_name(run_name or settings.config.train.run_name)
    dataset = scan_dataset(settings.dataset_dir, settings.config.dataset.caption_extension)
    run_dir = settings.runs_dir / name
    record = runs.read_record(run_dir)
    if record and record.get("status") == "finished" and not restart:
        final = runs.final_lora(run_dir)
        if final.is_file():
            log.info("run `%s` already finished: %s (pass --restart to train it again)", name,
                     final)
            return TrainResult(final, None)
    go_offline(settings)
    from loraforge.models.store import resolve_base_model

    base = resolve_base_model(settings)
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = _setup_logging(run_dir)
    try:
        return _train_in(settings, dataset, run_dir, base, restart)
    finally:
        logging.getLogger("loraforge").removeHandler(handler)
        handler.close()


def _train_in(settings: Settings, dataset: Dataset, run_dir: Path, base: Path,
              restart: bool) -> TrainResult:
    from loraforge.hashing import legacy_hash, sha256_file
    from loraforge.train.metadata import TrainingFacts

    if restart:  # what the old attempt made must not mix with the new one
        for folder in ("state", "events", "samples"):
            shutil.rmtree(run_dir / folder, ignore_errors=True)
        for old in [run_dir / HISTORY, *run_dir.glob(f"{run_dir.name}*.safetensors")]:
            old.unlink(missing_ok=True)
    try:
        trainer = Trainer(settings, dataset, run_dir)
    except ForgeError as exc:
        runs.RunRecord(run_dir, settings.file_mode).update(status="failed", error=str(exc))
        raise
    previous = trainer.record.data
    started = (previous.get("started_at_unix") if not restart else None) or env_time() \
        or time.time()
    session = hashlib.sha256(f"{run_dir.name}|{started}|{settings.config.train.seed}".encode()
                             ).hexdigest()[:16]
    weights_file = base / "unet" / "diffusion_pytorch_model.safetensors"
    model_sha = sha256_file(weights_file, settings.cache_dir) if weights_file.is_file() else ""
    model_legacy = legacy_hash(weights_file) if weights_file.is_file() else ""
    trainer.record.update(
        name=run_dir.name, status="running", config=settings.to_dict(),
        dataset={"concepts": dataset.dataset_dirs(), "images": dataset.num_images,
                 "images_x_repeats": dataset.images_x_repeats},
        started_at_unix=started, base_model=str(base), device=str(trainer.device),
        steps_per_epoch=trainer.plan.steps_per_epoch, epochs=trainer.plan.epochs,
        slurm=slurm_job())

    def facts_for(t: Trainer, optimizer: Any, warmup: int) -> TrainingFacts:
        return TrainingFacts(
            run_name=run_dir.name, session_id=session, started_at=started,
            base_model_name=base.name, base_model_sha256=model_sha,
            base_model_legacy_hash=model_legacy,
            optimizer=_optimizer_description(optimizer, settings.config.train.optimizer_args),
            total_steps=t.plan.total_steps, num_epochs=t.plan.epochs,
            batches_per_epoch=t.plan.batches_per_epoch, warmup_steps=warmup,
            mixed_precision=t.precision, train_text_encoder=t.train_text,
            bucket_info=t.bucket_info())

    try:
        return TrainResult(trainer.run(base, restart, facts_for), trainer)
    except Interrupted:
        trainer.record.update(status="interrupted")
        raise
    except ForgeError as exc:
        trainer.record.update(status="failed", error=str(exc))
        raise
    except OSError as exc:  # an image removed mid-run, a folder made read-only, a full disk
        error = ForgeError(f"{exc.strerror or exc} while training", path=exc.filename or run_dir,
                           fix="fix the file or free the space, then rerun the same command: "
                               "training resumes from the last state saved completely")
        trainer.record.update(status="failed", error=str(error))
        raise error from None
    except BaseException as exc:
        trainer.record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
