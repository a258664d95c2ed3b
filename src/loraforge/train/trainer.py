"""The training of one run: one multi-concept LoRA over every concept folder, resumable at any
step. Models are loaded, the loop runs epoch by epoch and step by step, states and LoRA files
are saved on the way (`run.py` decides whether and what to train, and keeps the record).

The run folder `<storage>/Multi_Concept_Output/<run>/` holds the epoch files, the final file,
`state/` (resumable training state), `run.json`, `train.log` and `events/` (TensorBoard).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext, suppress
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge import runs
from loraforge.errors import ForgeError
from loraforge.fsutil import DISK_FULL
from loraforge.hashing import env_time
from loraforge.train.distributed import (
    World,
    any_rank,
    from_main,
    replica_spread,
    shard,
    sum_gradients,
)
from loraforge.train.inputs import StepInputs
from loraforge.train.journal import LOSS_SMOOTHING, Journal
from loraforge.train.plan import lr_factor, make_plan
from loraforge.train.resume import (
    check_resumable,
    semantic_config,
    trained_images,
)
from loraforge.train.signals import Interrupted, StopRequest
from loraforge.train.state import Position

if TYPE_CHECKING:
    import torch

    from loraforge.config import Settings
    from loraforge.dataset.scan import Dataset
    from loraforge.train.loading import Models

#: Largest difference between the processes' weights (norm of any tensor) that is not an error.
REPLICA_TOLERANCE = 1e-6

log = logging.getLogger("loraforge.train")
#: Rebuilds a run's report from its folder (run_dir, file_mode): report.html.write_report.
ReportWriter = Callable[[Path, int], object]


def _disk_error(exc: OSError, what: Path, run_dir: Path) -> ForgeError:
    full = ("(the disk, or your quota on it, is full)" if exc.errno in DISK_FULL
            else "(the disk or your quota is full?)")
    return ForgeError(f"could not write {what.name}: {exc.strerror or exc} {full}", path=what,
                      fix="free space (or raise the quota) and rerun the same command: "
                          f"{runs.rerun_goes_on(run_dir)}")


class Trainer:
    """One training process. With several (`world`), rank 0 alone writes files and logs."""

    def __init__(self, settings: Settings, dataset: Dataset, run_dir: Path, world: World,
                 device: torch.device, report: ReportWriter | None = None) -> None:
        import torch

        from loraforge.dataset.examples import batches_per_epoch, build_examples, repeated_indices

        self.settings = settings
        self.world = world
        self.cfg = settings.config.train
        self.data_cfg = settings.config.dataset
        self.dataset = dataset
        self.run_dir = run_dir
        self.examples = build_examples(dataset, self.data_cfg, log.warning)
        self.indices = repeated_indices(dataset)
        self.plan = make_plan(settings, batches_per_epoch(
            self.examples, self.indices, self.cfg.batch_size * world.size), world)
        uncachable = [k for k in ("random_crop", "color_aug") if getattr(self.data_cfg, k)]
        if uncachable and self.cfg.cache_latents:
            key = f"dataset.{uncachable[0]}"
            option = settings.given.get(key)  # a --set is named, else the config file
            raise ForgeError(f"{key}{f' ({option})' if option else ''} changes the pixels every "
                             "epoch, so the VAE latents cannot be cached (train.cache_latents = "
                             "true)", path=None if option else settings.source,
                             fix=f"set train.cache_latents = false to train with "
                                 f"{' and '.join(uncachable)} (slower: the VAE runs every "
                                 f"step), or turn {' and '.join(uncachable)} off")
        from loraforge.train.previews import defaults_from_config, parse_sample_prompts

        self.sample_prompts = parse_sample_prompts(self.cfg.sample_prompts,
                                                   defaults_from_config(settings.to_dict()))
        self.device = device
        on_gpu = self.device.type == "cuda"
        precision = self.cfg.mixed_precision if on_gpu else "no"
        self.precision = precision
        self.dtype = {"no": torch.float32, "fp16": torch.float16,
                      "bf16": torch.bfloat16}[precision]
        self.train_text = self.cfg.text_encoder_lr > 0
        self.channels_last = on_gpu if self.cfg.channels_last is None else self.cfg.channels_last
        from loraforge.train.optim import build_optimizer

        # the optimizer, its arguments and rates checked on a stand-in weight: a mistake is
        # said before minutes of model loading (and before --restart removes anything)
        trial = [{"params": [torch.nn.Parameter(torch.zeros(1, device=device))], "lr": lr}
                 for lr in (self.cfg.unet_lr, self.cfg.text_encoder_lr)[:1 + self.train_text]]
        build_optimizer(self.cfg.optimizer, trial, self.cfg.optimizer_args, device)
        self.mode = settings.file_mode
        self.report = report
        self.record = runs.RunRecord(run_dir, self.mode, write=world.is_main)
        self.inputs = StepInputs(settings, self.examples, world, device, self.dtype,
                                 self.train_text, self.record)

    # --- setup -------------------------------------------------------------------------
    def load_models(self, base: Path) -> Models:
        from loraforge.train.loading import load_for_training

        log.info("loading base model %s", base)
        return load_for_training(base, self.cfg, self.device, self.dtype,
                                 autocast=self.precision != "no", train_text=self.train_text,
                                 channels_last=self.channels_last,
                                 progress_bars=self.world.is_main and sys.stderr.isatty())

    def compiled(self, unet: Any) -> Any:
        """What the training step calls for the U-Net, as train.compile_unet asks."""
        import torch

        if self.cfg.compile_unet == "blocks":  # one graph per block shape, shared by like blocks
            unet.compile_repeated_blocks()
            return unet
        if self.cfg.compile_unet:
            # One graph per bucket shape: fewer kernel launches, which bound small batches.
            return torch.compile(unet)
        return unet

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

        summary = summarize(self.dataset, self.plan.batch_size, self.plan.epochs,
                            self.cfg.max_steps, self.examples, self.world.size)
        write_atomic(self.run_dir / "dataset.json", json.dumps(summary, indent=1), self.mode)

    # --- the loop ----------------------------------------------------------------------
    @cached_property
    def trained_with(self) -> dict[str, Any]:
        """What decides this training's weights (`semantic_config`: the settings, the base
        model's hash, the images), taken once, before it resumes or starts: each state it saves
        records that, whatever changes on disk while it trains (a base model folder moved away
        no longer fails a save)."""
        return semantic_config(self.settings, self.examples, self.world)

    def saved_state(self, restart: bool) -> Any:
        """The newest saved state to resume from (None: start afresh), checked to fit this
        config and dataset: a state from another one is refused (ForgeError) before minutes of
        model loading. Rank 0 reads it and sends it: on shared storage another node may still
        see an older listing. Every process must call it."""
        from loraforge.train.state import check_position, load_state, saved_states

        current = self.trained_with  # taken before the training, as every state records it
        states = [] if restart or not self.world.is_main else saved_states(self.run_dir)
        state = from_main(load_state(states[-1]) if states else None, self.world)
        if state is not None:
            check_resumable(state.config, state.path, self.settings, self.examples, self.world,
                            self.run_dir, current)
            check_position(state, self.plan)
        return state

    def run(self, base: Path, state: Any, facts_for: Any, stop: StopRequest) -> Path:
        """Train to the end from `state` (see `saved_state`); raises Interrupted when `stop`
        is requested. The run from loading to the final file: the loop reads top to bottom
        here, each part in its own method below."""
        from loraforge.train.optim import warmup_steps

        cfg, plan, world = self.cfg, self.plan, self.world
        models = self.models = self.load_models(base)
        self.unet_forward = self.compiled(models.unet)
        named = self.build_optimizer(models)
        position = self.restore(state, named)
        self.cache(models, base)
        facts = facts_for(self, self.optimizer, warmup_steps(cfg.lr_warmup, plan.total_steps))
        if world.is_main:
            self.write_dataset_summary()
        self.record.update(status="running", step=position.step, total_steps=plan.total_steps)
        warm_up = "compiling" if cfg.compile_unet and position.step < plan.total_steps else ""
        if warm_up:
            log.info("train.compile_unet = %s: the first step compiles the U-Net (minutes with "
                     "an empty compile cache; later steps of the same shape are faster)",
                     json.dumps(cfg.compile_unet))
        journal = Journal(self.run_dir, position, plan.total_steps, cfg.log_every_seconds,
                          world.is_main, self.device.type == "cuda", warm_up)
        try:
            # A signal that came while models loaded or latents were cached (to any process).
            if any_rank(stop.requested, world):
                raise Interrupted(saved=position.step > 0)
            for epoch in range(position.epoch, plan.epochs):
                if not self.train_epoch(models, epoch, position, journal, stop, named):
                    break  # max_steps reached inside the epoch
                position.epoch, position.batch_in_epoch = epoch + 1, 0
                journal.flush()
                if world.is_main:
                    self.end_of_epoch(models, facts, position, epoch + 1)
                    self.record.update(step=position.step)
                if any_rank(stop.requested, world):
                    self.save(position, named, journal, stop.reason)
                    raise Interrupted
        except BaseException:
            # the error that stopped the training is the one to tell: a disk too full for the
            # journal's last lines must not replace it
            with suppress(Exception):
                journal.close()
            raise
        journal.close()
        return self.finish(models, facts, position)

    def train_epoch(self, models: Models, epoch: int, position: Position, journal: Journal,
                    stop: StopRequest, named: dict[str, torch.Tensor]) -> bool:
        """The optimizer steps of `epoch` from `position` on; False when train.max_steps ended
        the run inside it (its last previews rendered)."""
        from loraforge.dataset.examples import epoch_batches

        plan, world = self.plan, self.world
        batches = epoch_batches(self.examples, self.indices, plan.batch_size, self.cfg.seed,
                                epoch)
        for first in range(position.batch_in_epoch, len(batches), plan.accumulation):
            if position.step >= plan.total_steps:
                break
            group = batches[first:first + plan.accumulation]
            loss, stopping = self.optimizer_step(models, batches, first, epoch, position.step,
                                                 stop.requested)
            position.step += 1
            position.batch_in_epoch = first + len(group)
            spread = replica_spread(self.trainable, world)
            journal.step(epoch + 1, loss, self.scheduler.get_last_lr(),
                         sum(len(b) for b in group),
                         {"replica_spread": spread} if world.distributed else {})
            if spread > REPLICA_TOLERANCE:
                raise ForgeError(f"the {world.size} training processes hold different weights "
                                 f"after step {position.step} (largest difference "
                                 f"{spread:.3g})", fix="report this as a bug; rerun the same "
                                 "command to resume from the last saved state")
            if stopping:
                self.save(position, named, journal, stop.reason)
                raise Interrupted
            if position.step % self.cfg.state_every_n_steps == 0:
                self.save(position, named, journal, "periodic")
        if position.batch_in_epoch < len(batches):  # max_steps reached mid-epoch:
            if world.is_main:  # the last previews show the final weights
                self.render_previews(models, epoch + 1)
            return False
        return True

    def build_optimizer(self, models: Models) -> dict[str, torch.Tensor]:
        """The optimizer, schedule and loss scaler over the LoRA weights; returns the LoRA
        weights by their kohya names (what a state saves)."""
        import torch

        from loraforge.train.optim import build_optimizer, build_scheduler

        cfg = self.cfg
        params_unet = [p for p in models.unet.parameters() if p.requires_grad]
        params_text = [p for p in models.text_encoder.parameters() if p.requires_grad]
        factor = lr_factor(self.settings, self.world)
        groups = [{"params": params_unet, "lr": cfg.unet_lr * factor}]
        if self.train_text:
            groups.append({"params": params_text, "lr": cfg.text_encoder_lr * factor})
        self.trainable = params_unet + params_text
        self.optimizer = build_optimizer(cfg.optimizer, groups, cfg.optimizer_args, self.device)
        self.scheduler = build_scheduler(cfg.lr_scheduler, self.optimizer,
                                         self.plan.total_steps, cfg.lr_warmup,
                                         cfg.lr_scheduler_cycles, cfg.lr_scheduler_power)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        return self.named_lora(models)

    def restore(self, state: Any, named: dict[str, torch.Tensor]) -> Position:
        """Where training starts: the saved state's weights, optimizer, schedule and position
        (see `saved_state`), or the beginning."""
        import torch

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
                     self.plan.total_steps)
        if self.scaler.is_enabled():
            # Set the loss scale now: a process whose share of the first batch is empty would
            # reach `unscale_` without ever having scaled a loss.
            self.scaler.scale(torch.zeros((), device=self.device))
        if self.world.distributed:
            log.info("%d training processes, %d images per process and step, global batch %d",
                     self.world.size, self.cfg.batch_size, self.plan.batch_size)
        return position

    def cache(self, models: Models, base: Path) -> None:
        """Latents and text-encoder outputs computed once, where the config allows; the VAE
        and the text encoder are freed when nothing else needs them."""
        import torch

        if self.cfg.cache_latents:
            self.inputs.cache_latents(models.vae, base)
            if not self.sample_prompts:
                models.vae = None
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        cached_text = self.inputs.cache_text(models.tokenizer, models.text_encoder)
        if cached_text and not self.sample_prompts:  # the step no longer needs the encoder
            models.text_encoder = None

    def save(self, position: Position, named: dict[str, torch.Tensor], journal: Journal,
             reason: str) -> None:
        """A resumable state of the run as it is now (rank 0 writes it)."""
        journal.flush(durable=True)  # the state holds the loss's moving average
        if not self.world.is_main:
            return
        trainer_state = {"optimizer": self.optimizer.state_dict(),
                         "scheduler": self.scheduler.state_dict(),
                         "scaler": self.scaler.state_dict()}
        try:
            path = self.save_state(position, named, trainer_state)
        except OSError as exc:
            raise _disk_error(exc, self.run_dir / "state", self.run_dir) from None
        self.record.update(step=position.step)  # what `runs` shows: where a rerun resumes
        log.info("state saved (%s): %s", reason, path)

    def finish(self, models: Models, facts: Any, position: Position) -> Path:
        """The final LoRA file and the run marked finished (its states are no longer needed)."""
        final = runs.final_lora(self.run_dir)
        if self.world.is_main:
            self.save_lora(final, models, facts, position, self.plan.epochs)
            self.record.update(status="finished", step=position.step,
                               final_loss=position.smoothed_loss(LOSS_SMOOTHING),
                               final_lora=str(final),
                               images=trained_images(self.settings, self.examples),
                               finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            shutil.rmtree(self.run_dir / "state", ignore_errors=True)
            self.write_report()
        return final

    def end_of_epoch(self, models: Models, facts: Any, position: Position, done: int) -> None:
        """The epoch's LoRA file (unless it is the last: the final file follows), previews and
        the report."""
        cfg = self.cfg
        if done % cfg.save_every_n_epochs == 0 and done < self.plan.epochs:
            self.save_lora(runs.epoch_lora(self.run_dir, done), models, facts, position, done)
            self.prune_epochs()
        if done % cfg.sample_every_n_epochs == 0 or done == self.plan.epochs:
            self.render_previews(models, done)
        self.write_report()

    def render_previews(self, models: Models, epoch: int) -> None:
        from loraforge.train.previews import render_previews

        if self.sample_prompts:
            render_previews(self.run_dir, epoch, self.sample_prompts, models, self.cfg,
                            self.autocast(), self.mode)

    def autocast(self) -> Any:
        """The mixed precision every forward runs under (none on the CPU)."""
        import torch

        return (torch.autocast("cuda", dtype=self.dtype) if self.precision != "no"
                else nullcontext())

    def write_report(self) -> None:
        """The run's report, rebuilt: a report that cannot be written (a full disk, a name it
        cannot show) is one warning line in the log, never the end of the training."""
        if self.report is None:
            return
        try:
            self.report(self.run_dir, self.mode)
        except Exception as exc:
            log.warning("report.html not written (training goes on): %s: %s",
                        type(exc).__name__, exc)

    def optimizer_step(self, models: Models, batches: list[list[int]], first: int, epoch: int,
                       step: int, stop: bool) -> tuple[torch.Tensor, bool]:
        """Forward and backward over this process's share of batches[first:first +
        accumulation], gradients summed over the processes, then one optimizer step. Returns
        the mean loss over the global batch (on the device: reading it waits for the GPU), and
        whether any process was asked to stop."""
        import torch

        from loraforge.dataset.examples import draw_example
        from loraforge.train import objective

        cfg = self.cfg
        group = batches[first:first + self.plan.accumulation]
        generator = objective.step_generator(cfg.seed, step, self.device)
        autocast = self.autocast()
        text_grad = nullcontext() if self.train_text else torch.no_grad()
        total = torch.zeros((), device=self.device)
        for number, whole in enumerate(group, start=first):
            width, height = self.examples[whole[0]].bucket
            scale = models.vae_scale
            full_draw = objective.draw((len(whole), models.latent_channels, height // scale,
                                        width // scale), models.num_timesteps,
                                       cfg.noise_offset, generator, self.device, self.dtype)
            start, batch = shard(whole, self.world)
            if not batch:
                continue
            noise_draw = full_draw.rows(start, start + len(batch))
            positions = [number * self.plan.batch_size + start + slot
                         for slot in range(len(batch))]
            draws = [draw_example(self.examples[i], cfg.seed, epoch, p)
                     for i, p in zip(batch, positions, strict=True)]
            latents = self.inputs.batch_latents(models.vae, batch, draws, epoch, positions)
            with autocast:
                with text_grad:
                    hidden = self.inputs.text_states(models.tokenizer, models.text_encoder,
                                                     [d.caption for d in draws], batch)
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
            if len(batch) < len(whole):  # this process's share of the global batch's mean
                loss = loss * (len(batch) / len(whole))
            loss = loss / len(group)
            self.scaler.scale(loss).backward()
            total += loss.detach()
        if self.world.distributed:  # every process must learn of a stop at the same step
            summed = sum_gradients(self.trainable, [total, float(stop)], self.world)
            total, stop = summed[0], bool(summed[1] > 0)
        self.scaler.unscale_(self.optimizer)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, stop

    def add_noise(self, models: Models, latents: torch.Tensor, draw: Any) -> torch.Tensor:
        alpha_bar = models.alphas_cumprod[draw.timesteps].to(latents.dtype)
        alpha_bar = alpha_bar.view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * draw.noise
        if self.channels_last:
            import torch

            return noisy.contiguous(memory_format=torch.channels_last)
        return noisy

    # --- files -------------------------------------------------------------------------
    def named_lora(self, models: Models) -> dict[str, torch.Tensor]:
        from loraforge.train.network import lora_weights

        return lora_weights({"unet": models.unet, "text_encoder": models.text_encoder},
                            models.targets)

    def save_state(self, position: Position, named: dict[str, torch.Tensor],
                   trainer_state: dict[str, Any]) -> Path:
        from loraforge.train.state import save_state

        return save_state(self.run_dir, position, named, trainer_state, self.trained_with,
                          self.cfg.keep_states,
                          self.mode)

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
            raise _disk_error(exc, path, self.run_dir) from None
        log.info("saved %s", path)

    def prune_epochs(self) -> None:
        files = sorted(self.run_dir.glob(f"{self.run_dir.name}-[0-9][0-9][0-9][0-9][0-9][0-9]"
                                         ".safetensors"))
        for old in files[:-self.cfg.keep_last_n]:
            old.unlink(missing_ok=True)
