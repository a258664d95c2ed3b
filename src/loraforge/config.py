"""`forge.toml`: the schema, its defaults, command-line overrides and the resolved paths.

Every value has a default (the community defaults for a character LoRA on SD 1.5); relative
paths resolve against the config file's folder; `LORAFORGE_STORAGE_ROOT` overrides `storage.root`.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from loraforge.errors import ForgeError
from loraforge.sample_prompts import MAX_SEED, parse_sample_prompts
from loraforge.samplers import DEFAULT_SAMPLER, check_sampler

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

CONFIG_NAME = "forge.toml"
STORAGE_ENV = "LORAFORGE_STORAGE_ROOT"
_STORAGE_ENV_FIX = (f"set {STORAGE_ENV} to your storage root, or unset it to use storage.root "
                    "of forge.toml")
TINY = "tiny"
TAUGHT = "tiny-taught"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_truth_for_a_number(cls, value: object, info: ValidationInfo) -> object:
        """pydantic reads `true` as 1 for a number: `unet_lr = true` would train at a rate of
        1.0, `max_steps = true` for one step. A number key takes a number."""
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and _counts(field.annotation):
            raise ValueError(f"takes a number, not {str(value).lower()}")
        return value


class StorageConfig(_Section):
    root: str = Field(".", description="Lab storage root: models, runs, images, caches live here.")
    file_mode: str = Field("0644", description="Permissions of written files (octal).")

    @field_validator("root")
    @classmethod
    def _not_blanks(cls, value: str) -> str:
        """Blanks would make (and fill) a folder named with spaces: refused, as they are in
        LORAFORGE_STORAGE_ROOT."""
        if value and not value.strip():
            raise ValueError(f"is blanks ({value!r}), not a folder: name the storage root, or "
                             "\".\" for the config file's folder")
        return value

    @field_validator("file_mode", mode="before")
    @classmethod
    def _quoted(cls, value: object) -> object:
        """A bare TOML number (644, or 0o644 which TOML reads as 420) cannot be told from a
        decimal one: ask for the quotes instead of guessing."""
        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError(f"must be an octal string in quotes, such as \"0644\" (the bare "
                             f"number {value} would be read as decimal)")
        return value

    @field_validator("file_mode")
    @classmethod
    def _octal(cls, value: str) -> str:
        try:
            mode = int(value, 8)
        except ValueError:
            raise ValueError("must be an octal string such as '0644'") from None
        if not 0 <= mode <= 0o777:
            raise ValueError("must be between 0000 and 0777")
        if mode & 0o600 != 0o600:  # the tool rereads what it writes (captions, records, caches)
            raise ValueError(f"{value!r} would leave the files it writes unreadable or "
                             "unwritable to you: the owner needs read and write (6 as the "
                             "first digit, e.g. '0644' or '0640')")
        return value


class ModelsConfig(_Section):
    base: str = Field("AnyLoRA", description="Base model: a folder under the storage root, an "
                      "absolute path, 'tiny' for the embedded test model, or 'tiny-taught' for "
                      "it taught to paint flat colours (a LoRA can learn concepts on it).")
    controlnet: str = Field("controlnet-model", description="OpenPose ControlNet: a folder under "
                            "the storage root, an absolute path, or 'tiny'.")
    tagger: str = Field("wd-tagger", description="Image tagger for `dataset tag` (a WD14 ONNX "
                        "model and selected_tags.csv): a folder under the storage root, an "
                        "absolute path, or 'tiny'.")
    detector: str = Field("controlnet-detector", description="OpenPose body detector (poses "
                          "from pictures): a folder under the storage root, an absolute path, "
                          "or 'tiny' (random weights: finds no real people).")


class ConceptOverrides(_Section):
    shuffle_caption: bool | None = None
    keep_tokens: int | None = Field(None, ge=0)
    keep_tokens_separator: str | None = None
    caption_dropout_rate: float | None = Field(None, ge=0, le=1)
    tag_dropout_rate: float | None = Field(None, ge=0, le=1)
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    flip_aug: bool | None = None
    is_reg: bool = Field(False, description="A regularisation concept (prior preservation).")


#: Extensions of pictures, which a caption file must never take.
_PICTURE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


class DatasetConfig(_Section):
    path: str = Field("master_dataset", description="Folder of <repeats>_<concept>/ folders.")
    resolution: int = Field(512, ge=64, le=2048, description="Training resolution (pixels).")
    caption_extension: str = Field(".txt", description="Caption files beside the images.")
    enable_bucket: bool = Field(True, description="Aspect-ratio buckets instead of square crops.")
    min_bucket: int = Field(256, ge=64, le=4096)
    max_bucket: int = Field(1024, ge=64, le=4096)
    bucket_step: int = Field(64, ge=8, le=512)
    bucket_no_upscale: bool = Field(False, description="Never enlarge a small image to a bucket.")
    random_crop: bool = Field(False, description="Random instead of centred crops (needs "
                              "train.cache_latents = false).")
    color_aug: bool = Field(False, description="Random colour jitter (needs train.cache_latents "
                            "= false).")
    flip_aug: bool = Field(False, description="Also train on mirrored images.")
    shuffle_caption: bool = Field(True, description="Shuffle tags every epoch.")
    keep_tokens: int = Field(1, ge=0, description="Tags kept in front, unshuffled (the "
                             "activation tag).")
    keep_tokens_separator: str = Field("|||", description="In a caption, tags before this stay "
                                       "in front (instead of keep_tokens).")
    caption_dropout_rate: float = Field(0.0, ge=0, le=1, description="Drop the whole caption.")
    tag_dropout_rate: float = Field(0.0, ge=0, le=1, description="Drop each (unkept) tag.")
    caption_prefix: str = ""
    caption_suffix: str = ""
    concepts: dict[str, ConceptOverrides] = Field(
        default_factory=dict, description="Per-concept overrides: [dataset.concepts.<name>] "
        "tables with any of shuffle_caption, keep_tokens, keep_tokens_separator, "
        "caption_dropout_rate, tag_dropout_rate, caption_prefix, caption_suffix, flip_aug, "
        "is_reg.")

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError("must be a multiple of 8")
        return value

    @model_validator(mode="after")
    def _bucket_range(self) -> DatasetConfig:
        """Buckets that can exist: training at `resolution` needs a bucket that large (a larger
        resolution would make buckets above max_bucket and upscale every image to them), and
        some multiple of bucket_step between the smallest and the largest side. A resolution
        below min_bucket lowers the smallest side (tiny models train at 64 px)."""
        if not self.enable_bucket:
            return self
        if self.min_bucket > self.max_bucket:
            raise ValueError(f"min_bucket ({self.min_bucket}) is above max_bucket "
                             f"({self.max_bucket})")
        if self.resolution > self.max_bucket:
            raise ValueError(f"resolution ({self.resolution}) is above max_bucket "
                             f"({self.max_bucket}): lower dataset.resolution, or raise "
                             f"dataset.max_bucket to at least {self.resolution}")
        low, step = min(self.min_bucket, self.resolution), self.bucket_step
        if self.max_bucket // step * step < max(step, -(-low // step) * step):
            raise ValueError(f"no multiple of bucket_step ({step}) lies between "
                             f"{low} and max_bucket ({self.max_bucket}), so there is no bucket: "
                             "lower dataset.bucket_step or widen min_bucket..max_bucket")
        return self

    @field_validator("caption_extension")
    @classmethod
    def _dot(cls, value: str) -> str:
        if not value.startswith(".") or "/" in value:
            raise ValueError("must look like '.txt'")
        if value.lower() in _PICTURE_SUFFIXES:  # captions would be written over the images
            raise ValueError(f"{value!r} is a picture's extension: captions are text files "
                             "beside the images, such as '.txt' or '.caption'")
        return value


#: Optimizers by the names LoRA users know (train.optimizer); any module.Class path works too.
OPTIMIZERS = ("AdamW", "AdamW8bit", "Prodigy", "Lion", "Adafactor")


class TrainConfig(_Section):
    run_name: str = Field("multi_concept", description="Run folder and LoRA file name; "
                          "--run overrides it.")
    epochs: int = Field(10, ge=1, le=10_000)
    max_steps: int | None = Field(None, ge=1,
                                  description="Stop after this many steps (overrides epochs).")
    batch_size: int = Field(2, ge=1, le=1024, description="Images per step on each GPU; the "
                            "global batch is this times the number of training processes.")
    gpus: int = Field(1, ge=1, le=64, description="Training processes `loraforge train` starts "
                      "on this machine, one per GPU (CPU processes where there is no GPU). "
                      "SLURM jobs use slurm.nodes x slurm.gpus_per_node instead.")
    scale_lr: Literal["none", "linear", "sqrt"] = Field(
        "none", description="Multiply the learning rates by the number of training processes "
        "(linear) or its square root (sqrt); none keeps them as written.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    unet_lr: float = Field(5e-4, ge=0, le=1)
    text_encoder_lr: float = Field(1e-4, ge=0, le=1, description="0 trains the U-Net only.")
    network_dim: int = Field(16, ge=1, le=1024)
    network_alpha: float = Field(8, gt=0, le=1024)
    conv_dim: int = Field(0, ge=0, le=1024, description="LoCon rank of the 3x3 convs (0 = off).")
    conv_alpha: float = Field(4, gt=0, le=1024)
    optimizer: str = Field("AdamW8bit", description="AdamW, AdamW8bit, Prodigy, Lion, Adafactor "
                           "or a module.Class path.")
    optimizer_args: dict[str, Any] = Field(default_factory=dict)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine",
                          "cosine_with_restarts", "polynomial"] = "cosine_with_restarts"
    lr_scheduler_cycles: int = Field(3, ge=1)
    lr_scheduler_power: float = Field(1.0, gt=0)
    lr_warmup: float = Field(0.05, ge=0,
                             description="Ratio of all steps if < 1, else a step count.")
    min_snr_gamma: float = Field(5.0, ge=0, description="0 turns min-SNR weighting off.")
    noise_offset: float = Field(0.0, ge=0, le=1)
    clip_skip: int = Field(2, ge=1, le=12)
    max_token_length: Literal[75, 150, 225] = 225
    max_grad_norm: float = Field(1.0, ge=0, description="0 turns clipping off.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "fp16", description="On GPU; CPU always trains in fp32.")
    gradient_checkpointing: bool = False
    compile_unet: bool | Literal["blocks"] = Field(
        False, description='torch.compile the U-Net: true compiles it whole (minutes of '
        'compiling per bucket: over 3 on an H200), "blocks" its transformer blocks only (46 s '
        "on an H200 at batch 16, 1.17x the steps); see BENCHMARKS.md.")
    channels_last: bool | None = Field(None, description="Keep the U-Net's convolutions in "
                                       "channels-last memory order (default: on a GPU, where "
                                       "bf16/fp16 convolutions run faster so; not on the CPU, "
                                       "where it gains nothing); see BENCHMARKS.md.")
    cache_latents: bool = Field(True, description="Encode each image with the VAE once, "
                                "before training.")
    vae_batch_size: int = Field(1, ge=1, description="Images per VAE call while caching "
                                "latents; each 512 px image takes ~0.6 GB of GPU memory "
                                "(fp32), so more than 1 only pays off on large GPUs.")
    cache_latents_to_disk: bool = Field(True, description="Keep the latent cache under "
                                        "<storage>/cache/ for later runs.")
    cache_text_encoder_outputs: bool = Field(True, description="When the text encoder is not "
                                             "trained and captions never change (no shuffle or "
                                             "dropout), encode each caption once.")
    prior_loss_weight: float = Field(1.0, ge=0, description="Loss weight of is_reg concepts.")
    sample_prompts: list[str] = Field(default_factory=list, description="Preview prompts; "
                                      "kohya flags --n --w --h --d --s --l allowed in a line.")
    sample_every_n_epochs: int = Field(1, ge=1)
    sample_steps: int = Field(20, ge=1, le=200)
    sample_sampler: str = Field(DEFAULT_SAMPLER, description="Sampler of the previews (A1111 "
                                "names, as generate.sampler).")
    seed: int = Field(42, ge=0, le=MAX_SEED)
    save_every_n_epochs: int = Field(1, ge=1)
    keep_last_n: int = Field(10, ge=1)
    save_precision: Literal["fp16", "bf16", "fp32"] = "fp16"
    state_every_n_steps: int = Field(200, ge=1, description="Resumable state saved this often.")
    keep_states: int = Field(2, ge=1)
    log_every_seconds: float = Field(30.0, gt=0, description="Progress line interval in log files.")

    @field_validator("sample_sampler")
    @classmethod
    def _known_sample_sampler(cls, value: str) -> str:
        """A typo is caught when the config is read, not as previews missing from every epoch."""
        return _known_sampler(value)

    @field_validator("sample_prompts")
    @classmethod
    def _sample_prompt_flags(cls, value: list[str]) -> list[str]:
        """A bad kohya flag is reported when the config is read, not after a training epoch."""
        try:
            parse_sample_prompts(value)
        except ForgeError as exc:
            raise ValueError(f"{exc.message} (fix: {exc.fix})") from None
        return value

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        """A built-in name or a module.Class path: a typo is caught when the config is read,
        not after the models have loaded."""
        if "." in value or value in OPTIMIZERS:
            return value
        by_lower = {name.lower(): name for name in OPTIMIZERS}
        # a name cut short (`adamw8`) means the one it begins, else the nearest spelling
        close = [name for name in by_lower if name.startswith(value.lower())][:1] or \
            difflib.get_close_matches(value.lower(), list(by_lower), n=1, cutoff=0.5)
        hint = f"did you mean {by_lower[close[0]]}? " if close else ""
        raise ValueError(f"unknown optimizer {value!r}: {hint}use one of "
                         f"{', '.join(OPTIMIZERS)} or a module.Class path such as "
                         "torch.optim.SGD")


def _known_sampler(value: str) -> str:
    """`value` as written when check_sampler knows it (case and spaces free), else a ValueError
    saying why."""
    try:
        check_sampler(value)
    except ForgeError as exc:
        raise ValueError(f"{exc.message} ({exc.fix})") from None
    return value


class GenerateConfig(_Section):
    prompt: str = Field("masterpiece, best quality, 2 characters standing side by side",
                        description="Default prompt (A1111 syntax).")
    negative: str = Field("lowres, bad anatomy, bad hands, worst quality, low quality",
                          description="Default negative prompt.")
    pose_map: str = Field("pose_map.png", description="Pose map; generated when missing.")
    pose_from_photo: Literal["extract", "refuse"] = Field(
        "extract", description="A pose picture that is not a pose map (a photo, a drawing): "
        "extract its people with models.detector, or refuse it.")
    width: int = Field(768, ge=64, le=4096)
    height: int = Field(576, ge=64, le=4096)
    steps: int = Field(25, ge=1, le=500)
    cfg: float = Field(7.0, ge=0, le=50)
    sampler: str = DEFAULT_SAMPLER
    seed: int = Field(42, ge=-1, le=MAX_SEED, description="First seed of a scene "
                      "(seed, seed+1, ...); -1 draws a random one each time.")
    lora_weight: float = Field(1.0, ge=-5, le=5)
    control_scale: float = Field(1.0, ge=0, le=5)
    figures: int = Field(2, ge=1, le=16, description="People in a generated pose map.")
    count: int = Field(1, ge=1, le=1000, description="Images per prompt (seed, seed+1, ...).")
    background_weight: float = Field(0.2, ge=0, le=1, description="Casting: how much the "
                                     "scene's prompt still acts inside a figure's region.")
    region_pad: float = Field(0.15, ge=0, le=1, description="Casting: a figure's region is its "
                              "keypoints' box grown by this fraction of its longer side.")
    region_soften: float = Field(0.0, ge=0, le=0.25, description="Casting: blur region edges "
                                 "over this fraction of the image's shorter side.")
    batch_size: int = Field(4, ge=1, le=64, description="Seeds of a scene denoised together "
                            "(faster; each image matches its single render up to rounding). "
                            "Lower it when a GPU runs out of memory.")
    compile: bool | Literal["blocks"] = Field(
        False, description='torch.compile the U-Net and ControlNet: true compiles them whole, '
        '"blocks" their transformer blocks only; the first batch of each size waits for the '
        "compiler. See BENCHMARKS.md.")
    vae_tiling: bool | None = Field(None, description="Decode in tiles (default: above 1024 "
                                    "px on a side).")
    offload: bool = Field(False, description="Keep idle models in CPU memory (small GPUs).")

    @field_validator("sampler")
    @classmethod
    def _known_default_sampler(cls, value: str) -> str:
        """Caught when the config is read: before a job is queued, not when it runs."""
        return _known_sampler(value)


class SlurmConfig(_Section):
    partition: str = "c3_accel"
    gpus: int = Field(1, ge=0, le=64)
    cpus: int = Field(8, ge=1, le=1024, description="CPUs per training process (per GPU).")
    mem: str = "32G"
    time: str = "04:00:00"
    account: str | None = None
    qos: str | None = None
    nodes: int = Field(1, ge=1, le=256, description="Nodes of a training job; training runs "
                       "one process per GPU on each (one per node without GPUs).")
    gpus_per_node: int | None = Field(None, ge=0, le=64, description="Default: slurm.gpus.")
    grace_seconds: int = Field(300, ge=30, le=3600, description="SIGUSR1 this long before the "
                               "time limit: state is saved, the job requeued.")
    max_requeues: int = Field(20, ge=0, le=1000, description="Give up (run marked failed) "
                              "after this many requeues.")
    env_activate: str = Field("lora_env/bin/activate", description="Activated by job scripts.")
    extra: list[str] = Field(default_factory=list, description="Extra #SBATCH lines.")

    @field_validator("time", "mem", mode="before")
    @classmethod
    def _number_as_text(cls, value: object) -> object:
        """`time = 90` (minutes) and `mem = 64000` (MB) are numbers in TOML; SLURM reads text."""
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class ForgeConfig(_Section):
    storage: StorageConfig = Field(default_factory=StorageConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)


class Settings:
    """A validated config plus where it came from, with every path resolved."""

    def __init__(self, config: ForgeConfig, base_dir: Path, source: Path | None,
                 given: dict[str, str] | None = None) -> None:
        self.config = config
        self.base_dir = base_dir
        self.source = source
        #: The keys set on the command line, each with the option that set it
        #: (`--set train.epochs=5`, or a sweep's `--param train.epochs=5`).
        self.given = given or {}

    def origin(self, key: str) -> str | None:
        """Where `key`'s value came from, for a message about it: its `--set` (or `--param`),
        else the config file (None: neither, a default)."""
        if key in self.given:
            return self.given[key]
        return str(self.source) if self.source is not None else None

    def _resolve(self, value: str, against: Path) -> Path:
        path = Path(os.path.expandvars(value)).expanduser()
        if path.is_absolute():
            return path
        try:
            return (against / path).resolve()
        except (RuntimeError, OSError):  # a loop of symbolic links (RuntimeError before 3.13)
            raise ForgeError("is a loop of symbolic links", path=against / path,
                             fix="point the link at a real folder, or name another path in "
                                 "the config") from None

    @property
    def storage_root(self) -> Path:
        env = os.environ.get(STORAGE_ENV)
        if env and not env.strip():  # would make (and fill) a folder named with spaces
            raise ForgeError(f"{STORAGE_ENV} is set to blanks ({env!r}), not a folder",
                             fix=_STORAGE_ENV_FIX)
        if env:
            return self._resolve(env, Path.cwd())
        return self._resolve(self.config.storage.root, self.base_dir)

    def listed_storage_root(self, what: str) -> Path:
        """The storage root for a command that lists `what` in it: a root that is not a folder
        means none yet in a new project, but a mistake when LORAFORGE_STORAGE_ROOT names it."""
        root = self.storage_root
        if os.environ.get(STORAGE_ENV) and not root.is_dir():
            raise ForgeError(f"is not a folder, so there are no {what} to list ({STORAGE_ENV} "
                             "points there)", path=root, fix=_STORAGE_ENV_FIX)
        return root

    @property
    def dataset_dir(self) -> Path:
        return self._resolve(self.config.dataset.path, self.base_dir)

    @property
    def runs_dir(self) -> Path:
        return self.storage_root / "Multi_Concept_Output"

    @property
    def images_dir(self) -> Path:
        return self.storage_root / "Final_Images"

    @property
    def cache_dir(self) -> Path:
        return self.storage_root / "cache"

    @property
    def file_mode(self) -> int:
        return int(self.config.storage.file_mode, 8)

    def model_dir(self, name: str) -> Path:
        """A model named in the config: a folder under the storage root, or an absolute path."""
        return self._resolve(name, self.storage_root)

    def to_dict(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _parent_model(loc: list[str]) -> type[BaseModel] | None:
    """The config model holding the key at `loc` (a table's key, such as the concept name in
    dataset.concepts.<name>.<key>, is stepped over)."""
    model: Any = ForgeConfig
    index = 0
    while index < len(loc) - 1:
        field = model.model_fields.get(loc[index]) if isinstance(model, type) else None
        if field is None:
            return None
        model = field.annotation
        index += 1
        if get_origin(model) is dict:
            model = get_args(model)[1]
            index += 1
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


#: A key users write from a command-line option or a scene's key (`--size`, a scene's `size`)
#: that the config spells as other keys.
_SPELLED_OTHERWISE = {"size": ("width", "height")}


def _suggest(key: str, choices: list[str], prefix: str) -> str:
    instead = _SPELLED_OTHERWISE.get(key, ())
    if instead and all(k in choices for k in instead):
        return "did you mean " + " and ".join(f"`{prefix}{k}`" for k in instead) + "?"
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    if close:
        return f"did you mean `{prefix}{close[0]}`?"
    return f"valid keys: {', '.join(prefix + c for c in choices)}"


def _counts(annotation: object) -> bool:
    """Whether a key of this type takes a number but not true/false (`compile_unet` takes
    true, false or text)."""
    parts = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return any(part in (int, float) for part in parts) and bool not in parts


def _explain(error: ValidationError, where: str, given: dict[str, str]) -> ForgeError:
    """Turn pydantic's report into one message naming the key and the fix. `given`: the
    command-line options by the key they set (`--set k=v`), named instead of the file for
    those keys."""
    problems = []
    from_file = False
    for item in error.errors():
        loc = [str(p) for p in item["loc"]]
        key = ".".join(loc)
        override = given.get(".".join(loc[:2]))
        if override is None and len(loc) == 1:  # a whole section: what --set put into it
            into = [text for name, text in given.items() if name.split(".")[0] == loc[0]]
            override = " ".join(into) or None
        from_file = from_file or override is None
        origin = f" ({override})" if override is not None else ""
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            parent = _parent_model(loc)
            choices = _field_names(parent) if parent is not None else []
            prefix = "".join(f"{part}." for part in loc[:-1])
            problems.append(f"unknown key `{key}`{origin}: "
                            f"{_suggest(loc[-1], choices, prefix)}")
        elif override is not None:
            problems.append(f"`{override}`: {message}")
        else:
            got = item.get("input")
            shown = f" (got {got!r})" if not isinstance(got, dict) else ""
            problems.append(f"`{key}`: {message}{shown}")
    message = problems[0] if len(problems) == 1 else "\n  - ".join(["invalid:", *problems])
    what = ("edit the value(s) named above" if from_file else
            "correct the value(s) named above on the command line")
    return ForgeError(message, path=where if from_file else None,
                      fix=f"{what}; `loraforge config show` prints every key with its current "
                          "value")


def parse_override(item: str, option: str = "--set") -> tuple[list[str], Any]:
    """`train.unet_lr=1e-4` -> (["train", "unet_lr"], 0.0001). Values read as TOML, else text.
    `option`: the command-line option that gave `item`, for the messages."""
    if "=" not in item:
        raise ForgeError(f"{option} `{item}` is not key=value",
                         fix=f"write it as {option} section.key=value, e.g. "
                             f"{option} train.epochs=5")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) != 2:
        raise ForgeError(f"{option} key `{key}` must be section.key",
                         fix=f"e.g. {option} train.unet_lr=1e-4")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if not isinstance(value, str) and _takes_text(*parts):  # an account 1234, a run 2024
        value = raw.strip()
    return parts, value


def _takes_text(section: str, key: str) -> bool:
    """Whether `section.key` takes text only (`str`, or `str | None`): a number or a truth
    given to it on the command line is the text as typed."""
    model = _parent_model([section, key])
    field = model.model_fields.get(key) if model is not None else None
    if field is None:
        return False
    annotation = field.annotation
    parts = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return str in parts and set(parts) <= {str, type(None)}


def apply_overrides(data: dict[str, Any], overrides: list[tuple[str, str]]) -> dict[str, str]:
    """Set each (option, "section.key=value") into `data`; returns each key set with the
    option that set it (`--set train.epochs=5`), for messages about it."""
    given = {}
    for option, item in overrides:
        (section, key), value = parse_override(item, option)
        if not isinstance(data.get(section, {}), dict):
            raise ForgeError(f"{option} {item}: the config file sets `{section}` to a value, "
                             f"not a [{section}] section",
                             fix=f"write its keys under a `[{section}]` line instead")
        data.setdefault(section, {})[key] = value
        given[f"{section}.{key}"] = f"{option} {item.strip()}"
    return given


def read_toml(path: Path) -> dict[str, Any]:
    return parse_toml(read_config(path), path)


def read_config(path: Path) -> bytes:
    """A config file's bytes, as `parse_toml` takes them."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ForgeError(f"cannot be read ({exc.strerror})", path=path) from None


def parse_toml(raw: bytes, path: Path) -> dict[str, Any]:
    """The TOML in `raw`, read from `path` (which its errors name)."""
    try:
        text = raw.decode("utf-8-sig")  # Windows editors start it with a BOM
    except UnicodeDecodeError:
        raise ForgeError("is not UTF-8 text", path=path, fix="save it as UTF-8") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # as reading it as text does
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ForgeError(f"is not valid TOML: {exc}", path=path,
                         fix="correct the line and column named; strings need quotes") from None


def outside_project_note() -> str:
    """What to tell a user whose command found no forge.toml (so the defaults were used)."""
    return (f"note: there is no {CONFIG_NAME} in {Path.cwd()}, so the built-in defaults were "
            "used: run this in your project folder, pass --config FILE, or create a project "
            "with `loraforge init`")


def find_config(explicit: Path | None) -> Path | None:
    """The config to use: the one given, else ./forge.toml if present, else none (defaults)."""
    if explicit is not None:
        if explicit.is_dir():
            inside = explicit / CONFIG_NAME
            raise ForgeError("is a folder, not a config file", path=explicit,
                             fix=f"pass the config inside it: --config {inside}" if
                             inside.is_file() else "pass the path of a forge.toml file")
        if not explicit.is_file():
            raise ForgeError("config file not found", path=explicit,
                             fix="check the path, or create one with `loraforge init`")
        return explicit
    try:
        local = Path.cwd() / CONFIG_NAME
    except FileNotFoundError:  # the shell's folder was deleted (or moved) under it
        raise ForgeError("the current folder no longer exists (deleted or moved while this "
                         "shell was in it)", fix="cd to your project folder again") from None
    if local.is_dir():  # not "no config here": the user's settings would be silently unused
        raise ForgeError(f"is a folder, so it cannot be this project's {CONFIG_NAME}", path=local,
                         fix="move the folder away and put the config file there (`loraforge "
                             "init` writes one)")
    return local if local.is_file() else None


def load_settings(path: Path | None = None, overrides: list[str] | None = None,
                  params: list[str] | None = None) -> Settings:
    """The config at `path` (else ./forge.toml, else the defaults), with the `--set`
    `overrides`, then a sweep's `--param` values (one value per key) applied."""
    return load_settings_and_bytes(path, overrides, params)[0]


def load_settings_and_bytes(path: Path | None = None, overrides: list[str] | None = None,
                            params: list[str] | None = None) -> tuple[Settings, bytes | None]:
    """`load_settings`, and the bytes of the config file the settings were read from (None: no
    file, the defaults): what a submission keeps for its job is what it validated."""
    source = find_config(path)
    raw = read_config(source) if source is not None else None
    return settings_from(raw, source, overrides, params), raw


def settings_from(raw: bytes | None, source: Path | None, overrides: list[str] | None = None,
                  params: list[str] | None = None, read_from: Path | None = None) -> Settings:
    """The settings in the config file bytes `raw` (None: the defaults) of the file `source`:
    relative paths resolve against its folder and messages name it. `read_from`: where `raw`
    was read, when not from `source` (a job's copy of the config it was submitted with): the
    errors of its text name that file."""
    named = read_from or source
    data = parse_toml(raw, named) if raw is not None and named is not None else {}
    options = [*(("--set", item) for item in overrides or []),
               *(("--param", item) for item in params or [])]
    given = apply_overrides(data, options)
    try:
        config = ForgeConfig.model_validate(data)
    except ValidationError as exc:
        where = str(named) if named is not None else "--set"
        raise _explain(exc, where, given) from None
    base_dir = source.resolve().parent if source is not None else Path.cwd()
    return Settings(config, base_dir, source.resolve() if source is not None else None, given)
