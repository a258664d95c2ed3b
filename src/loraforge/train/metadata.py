"""The `ss_*` training record and `modelspec.*` header that A1111, ComfyUI and Civitai read."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loraforge.config import Settings
    from loraforge.dataset.scan import Dataset


@dataclass(frozen=True)
class TrainingFacts:
    """What a run knows once it is set up; the parts of the record that change per save are
    passed to `lora_metadata` directly."""

    run_name: str
    session_id: str
    started_at: float
    base_model_name: str
    base_model_sha256: str
    base_model_legacy_hash: str
    optimizer: str
    total_steps: int
    num_epochs: int
    batches_per_epoch: int
    total_batch_size: int  # per process x processes
    lr_factor: float  # train.scale_lr for this many processes
    warmup_steps: int
    mixed_precision: str
    train_text_encoder: bool
    bucket_info: dict[str, Any]


def lora_metadata(settings: Settings, dataset: Dataset, facts: TrainingFacts, step: int,
                  epoch: int, finished_at: float) -> dict[str, Any]:
    train = settings.config.train
    data = settings.config.dataset
    resolution = data.resolution
    images_x_repeats = sum(len(c.images) * c.repeats for c in dataset.concepts)
    network_args = ({"conv_dim": str(train.conv_dim), "conv_alpha": str(train.conv_alpha)}
                    if train.conv_dim > 0 else {})
    concepts = [c.name for c in dataset.concepts]
    record: dict[str, Any] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(train.network_dim),
        "ss_network_alpha": str(train.network_alpha),
        "ss_network_train_unet_only": str(not facts.train_text_encoder),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_output_name": facts.run_name,
        "ss_session_id": facts.session_id,
        "ss_training_started_at": str(facts.started_at),
        "ss_training_finished_at": str(finished_at),
        "ss_steps": str(step),
        "ss_epoch": str(epoch),
        "ss_num_epochs": str(facts.num_epochs),
        "ss_max_train_steps": str(facts.total_steps),
        "ss_num_train_images": str(images_x_repeats),
        "ss_num_batches_per_epoch": str(facts.batches_per_epoch),
        "ss_batch_size_per_device": str(train.batch_size),
        "ss_total_batch_size": str(facts.total_batch_size),
        "ss_learning_rate": str(train.unet_lr * facts.lr_factor),
        "ss_unet_lr": str(train.unet_lr * facts.lr_factor),
        "ss_text_encoder_lr": str(train.text_encoder_lr * facts.lr_factor),
        "ss_lr_scheduler": train.lr_scheduler,
        "ss_lr_warmup_steps": str(facts.warmup_steps),
        "ss_optimizer": facts.optimizer,
        "ss_max_grad_norm": str(train.max_grad_norm),
        "ss_mixed_precision": facts.mixed_precision,
        "ss_gradient_checkpointing": str(train.gradient_checkpointing),
        "ss_gradient_accumulation_steps": str(train.gradient_accumulation_steps),
        "ss_cache_latents": str(train.cache_latents),
        "ss_seed": str(train.seed),
        "ss_clip_skip": str(train.clip_skip),
        "ss_max_token_length": str(train.max_token_length),
        "ss_noise_offset": str(train.noise_offset),
        "ss_min_snr_gamma": str(train.min_snr_gamma),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_enable_bucket": str(data.enable_bucket),
        "ss_min_bucket_reso": str(data.min_bucket if data.enable_bucket else resolution),
        "ss_max_bucket_reso": str(data.max_bucket if data.enable_bucket else resolution),
        "ss_bucket_no_upscale": str(data.bucket_no_upscale),
        "ss_bucket_info": json.dumps(facts.bucket_info),
        "ss_flip_aug": str(data.flip_aug),
        "ss_random_crop": str(data.random_crop),
        "ss_color_aug": str(data.color_aug),
        "ss_shuffle_caption": str(data.shuffle_caption),
        "ss_keep_tokens": str(data.keep_tokens),
        "ss_keep_tokens_separator": data.keep_tokens_separator,
        "ss_caption_dropout_rate": str(data.caption_dropout_rate),
        "ss_caption_tag_dropout_rate": str(data.tag_dropout_rate),
        "ss_prior_loss_weight": str(train.prior_loss_weight),
        "ss_dataset_dirs": json.dumps(dataset.dataset_dirs()),
        "ss_tag_frequency": json.dumps(dataset.tag_frequency()),
        "ss_sd_model_name": facts.base_model_name,
        "ss_sd_model_hash": facts.base_model_legacy_hash,
        "ss_new_sd_model_hash": facts.base_model_sha256,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": facts.run_name,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(finished_at)),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "epsilon",
        "modelspec.encoder_layer": str(train.clip_skip),
        "modelspec.trigger_phrase": ", ".join(c.trigger for c in dataset.concepts),
        "modelspec.description": f"LoRA Forge multi-concept LoRA: {', '.join(concepts)}",
    }
    if network_args:  # kohya leaves the key out for a plain LoRA
        record["ss_network_args"] = json.dumps(network_args)
    return record
