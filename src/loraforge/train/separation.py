"""`loraforge eval`: does each concept's trigger call up that concept, and only that one?

For every concept of a finished run, its images are encoded by the VAE, noised with fixed noise
at fixed timesteps, and the U-Net's denoising loss (plain mean squared error on the noise, no
min-SNR weighting) is measured under three conditions:

- its own trigger, with the LoRA (the prompt is the trigger alone: what a scene's region asks for);
- each other concept's trigger, with the LoRA, on the same images, noise and timesteps;
- its own trigger without the LoRA (the base model).

A LoRA that learned the concept lowers the loss below the base model's; one that learned it
*apart* lowers it further under the concept's own trigger than under any other. The margin is
(lowest other-trigger loss - own-trigger loss) / own-trigger loss. Every comparison is paired
(same noise, same timesteps), so small differences are real, not sampling noise.

Held-out images come from a folder in the dataset's layout (`<repeats>_<name>/`); a concept
without held-out images is measured on its training images with fresh noise, and the table says
so. The result is written to `separation.json` in the run folder and shown in its report.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge import runs
from loraforge.errors import ForgeError
from loraforge.fsutil import write_atomic

if TYPE_CHECKING:
    import torch

    from loraforge.config import DatasetConfig, Settings
    from loraforge.dataset.scan import Concept, Dataset

TIMESTEPS = (50, 150, 250, 350, 450, 550, 650, 750, 850, 950)
NOISE_SEED = 20261204  # no training step draws from this seed
NO_LORA = "no LoRA"
BATCH = 16  # noised latents per U-Net call


@dataclass
class ConceptSeparation:
    """One concept's row: loss by trigger (with the LoRA), and without the LoRA."""

    name: str
    trigger: str
    images: int
    held_out: bool
    loss: dict[str, float]  # trigger -> loss with the LoRA
    no_lora: float
    by_timestep: dict[str, list[float]] = field(default_factory=dict)

    @property
    def own(self) -> float:
        return self.loss[self.trigger]

    @property
    def margin(self) -> float | None:
        """(lowest other-trigger loss - own-trigger loss) / own; None with one concept."""
        others = [loss for trigger, loss in self.loss.items() if trigger != self.trigger]
        return (min(others) - self.own) / self.own if others else None

    @property
    def separated(self) -> bool | None:
        margin = self.margin
        return None if margin is None else margin > 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "margin": self.margin, "separated": self.separated}


@dataclass
class Separation:
    run: str
    lora: str
    timesteps: list[int]
    noise_seed: int  # a bucket of h x w latents draws from noise_seed + 1000 h + w
    concepts: list[ConceptSeparation]
    base_model: str = ""
    dataset: str = ""  # the pictures measured: the run's training folder
    held_out: str | None = None
    notes: list[str] = field(default_factory=list)  # what eval warned of

    @property
    def triggers(self) -> list[str]:
        return [c.trigger for c in self.concepts]

    def pairs(self) -> list[tuple[str, str, float]]:
        """(concept a, concept b, separation) for every pair: how much worse each does under
        the other's trigger than under its own, summed, relative to the two own losses. A
        trigger that is a better prompt for every image (a bias, not separation) adds as much
        to one difference as it takes from the other, so it cancels out here."""
        found = []
        for a, b in combinations(self.concepts, 2):
            cross = a.loss[b.trigger] - a.own + b.loss[a.trigger] - b.own
            found.append((a.name, b.name, cross / (a.own + b.own)))
        return found

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "lora": self.lora, "timesteps": self.timesteps,
                "noise_seed": self.noise_seed, "prompt": "the trigger alone",
                "base_model": self.base_model, "dataset": self.dataset,
                "held_out": self.held_out, "notes": self.notes,
                "loss": "mean squared error on the noise, averaged over images and timesteps",
                "concepts": [c.to_dict() for c in self.concepts],
                "pairs": [{"concepts": [a, b], "separation": value}
                          for a, b, value in self.pairs()]}


def distinct_triggers(dataset: Dataset) -> dict[str, str]:
    """Concept -> trigger; ForgeError when two concepts share one (nothing could ask the LoRA
    for one of them alone)."""
    triggers = {c.name: c.trigger for c in dataset.concepts}
    by_trigger: dict[str, list[str]] = {}
    for name, trigger in triggers.items():
        by_trigger.setdefault(trigger, []).append(name)
    shared = next((names for names in by_trigger.values() if len(names) > 1), None)
    if shared:
        trigger = triggers[shared[0]]
        raise ForgeError(f"concepts {' and '.join(shared)} share the trigger `{trigger}` (a "
                         "concept's trigger is its name where its captions hold it, else the "
                         "first tag of most of them), so no prompt can ask for one of them alone",
                         path=dataset.root,
                         fix="put each concept's name in its captions (`loraforge dataset tags "
                             "--add-trigger` puts it first), then train again")
    return triggers


def finished_lora(run_dir: Path) -> Path:
    """The final LoRA of a finished run, or a ForgeError saying what to do (for a run.json that
    cannot be read: what is wrong with it, and what `train` advises)."""
    record = runs.read_record(run_dir)
    if record is None and (why := runs.damage(run_dir)) is not None:
        from loraforge.train.run import refuse_damaged

        refuse_damaged(run_dir, why)
    record = record or {}
    final = runs.final_lora(run_dir)
    if record.get("status") != "finished":
        status = runs.status(record)
        raise ForgeError(f"run `{run_dir.name}` has not finished (status: {status}), so it has "
                         "no final LoRA to measure", path=run_dir,
                         fix=f"finish it first: rerun `loraforge train --run {run_dir.name}` "
                             "(it resumes), then `loraforge eval` again")
    if not final.is_file():
        _refuse_missing_final(run_dir, record, final)
    return final


def _refuse_missing_final(run_dir: Path, record: dict[str, Any], final: Path) -> None:
    """A finished run without its final file: a copied or renamed run folder (its files keep
    the original's name), or a file that was moved or deleted."""
    from loraforge.dataset.scan import shell_path

    recorded = record.get("name")
    original = run_dir / f"{recorded}.safetensors"
    if recorded and recorded != run_dir.name and original.is_file():
        raise ForgeError(f"run folder `{run_dir.name}` is a copy (or a renaming) of run "
                         f"`{recorded}`: its final LoRA is {original.name}, named after the "
                         "original", path=run_dir,
                         fix=f"measure the original (`loraforge eval {recorded}`), or name the "
                             f"copy's file after its folder (mv {shell_path(original)} "
                             f"{shell_path(final)}) and eval it again")
    raise ForgeError(f"run `{run_dir.name}` finished, but its final LoRA {final.name} is "
                     "missing", path=final,
                     fix="copy it back from where you keep a copy, or train the run again "
                         f"(`loraforge train --run {run_dir.name} --restart`)")


def _refuse_untrained(dataset: Dataset, record: dict[str, Any], run: str) -> None:
    """A concept of the dataset that the run was not trained on would be measured with a
    trigger the LoRA never learnt (the dataset folder changed, or is another project's)."""
    from loraforge.dataset.scan import parse_folder_name

    folders = (record.get("dataset") or {}).get("concepts")
    if not isinstance(folders, dict):
        return  # a record from before the dataset summary: nothing to compare with
    trained = {parsed[1] for parsed in map(parse_folder_name, folders) if parsed is not None}
    unknown = sorted(c.name for c in dataset.concepts if c.name not in trained)
    if unknown:
        raise ForgeError(f"run `{run}` was not trained on the concept(s) {', '.join(unknown)} "
                         f"of {dataset.root} (it learnt: {', '.join(sorted(trained))})",
                         path=dataset.root,
                         fix="measure it with the dataset it was trained on: point "
                             "dataset.path (or --set dataset.path=...) at that folder")


def _refuse_unseen_pictures(dataset: Dataset, record: dict[str, Any], run: str) -> None:
    """Pictures the run never trained on (another dataset.path with the same concepts, pictures
    added or replaced since) would be measured as its training pictures."""
    from loraforge.dataset.scan import display_path
    from loraforge.train.latent_cache import file_sha256

    content = (record.get("images") or {}).get("content")
    if not isinstance(content, dict):
        return  # a record from before the pictures' hashes: nothing to compare with
    trained = set(content.values())
    unseen = [image.path for concept in dataset.concepts for image in concept.images
              if file_sha256(image.path)[:16] not in trained]
    if unseen:
        where = ((record.get("config") or {}).get("dataset") or {}).get("path")
        raise ForgeError(f"{len(unseen)} picture(s) of {dataset.root} are not among the pictures "
                         f"run `{run}` was trained on (e.g. {display_path(unseen[0])}): measured "
                         "as its training pictures, the separation would be wrong",
                         path=dataset.root,
                         fix="measure it with the dataset it was trained on"
                             + (f" (its run.json says dataset.path = {where})" if where else "")
                             + ": point dataset.path (or --set dataset.path=...) at that folder; "
                             "pictures it never saw go in --held-out DIR")


def _base_model(record: dict[str, Any], settings: Settings, run: str) -> tuple[Path, list[str]]:
    """The base model the run was trained on, and a note when it is measured with another
    folder of that name (the recorded one is gone); ForgeError when models.base names another
    model."""
    from loraforge.models.store import resolve_base_model

    recorded = Path(str(record.get("base_model") or ""))
    if record.get("base_model") and (recorded / "unet").is_dir():
        return recorded, []
    current = resolve_base_model(settings)
    if not record.get("base_model"):
        return current, [f"run.json does not say which base model the run was trained on: "
                         f"measured with {current} (models.base)"]
    if current.name != recorded.name:
        raise ForgeError(f"run `{run}` was trained on the base model {recorded}, which is not "
                         f"there, and models.base names another one ({current})",
                         path=recorded,
                         fix="put that model back, or point models.base (or --set "
                             "models.base=...) at a copy of it, then eval again")
    return current, [f"the run's base model {recorded} is not there: measured with {current} "
                     "(models.base), a model of the same name"]


def newest_finished_run(runs_dir: Path, project: Path) -> runs.Chosen:
    """This project's newest run that finished with its final LoRA (`runs.newest_finished`:
    another project's on a shared storage root is refused, named), or a ForgeError."""
    chosen = runs.newest_finished(runs_dir, project, "`loraforge eval {name}`")
    if chosen is None:
        raise ForgeError("no finished training run to measure", path=runs_dir,
                         fix="train one first (`loraforge train`), or name a run: "
                             "`loraforge eval RUN`")
    return chosen


def _recorded(record: dict[str, Any], settings: Settings) -> tuple[DatasetConfig, int, int]:
    """The run's own dataset config, clip skip and token chunks (the current config's when the
    record lacks them)."""
    from loraforge.config import DatasetConfig

    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    try:
        dataset = DatasetConfig.model_validate(config["dataset"])
    except (KeyError, ValueError, TypeError):
        dataset = settings.config.dataset
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    clip_skip = int(train.get("clip_skip", settings.config.train.clip_skip))
    tokens = int(train.get("max_token_length", settings.config.train.max_token_length))
    return dataset, clip_skip, max(1, tokens // 75)


def _held_out(folder: Path | None, dataset: Dataset, config: DatasetConfig) -> Dataset | None:
    """The held-out images, scanned like a dataset; ForgeError for a concept the run lacks."""
    if folder is None:
        return None
    from loraforge.dataset.scan import scan_dataset

    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "held-out folder not found"
        raise ForgeError(what, path=folder,
                         fix="give --held-out a folder of <repeats>_<concept>/ folders of "
                             "images kept out of training, or leave --held-out out")
    held = scan_dataset(folder, config.caption_extension,
                        rerun="then run `loraforge eval --held-out` again")
    known = {c.name for c in dataset.concepts}
    unknown = sorted(c.name for c in held.concepts if c.name not in known)
    if unknown:
        raise ForgeError(f"held-out concept folder(s) {', '.join(unknown)} match no concept of "
                         "the run", path=folder,
                         fix=f"name them like the training folders (<repeats>_<name>, the "
                             f"names are: {', '.join(sorted(known))})")
    _refuse_trained_pictures(folder, held, dataset)
    return held


def _refuse_trained_pictures(folder: Path, held: Dataset, dataset: Dataset) -> None:
    """Held-out pictures that are training pictures (same bytes, whatever their names) would
    label a measure on training pictures held-out."""
    from loraforge.dataset.scan import display_path
    from loraforge.train.latent_cache import file_sha256

    trained = {file_sha256(image.path): image.path
               for concept in dataset.concepts for image in concept.images}
    same = [(image.path, trained[digest]) for concept in held.concepts
            for image in concept.images if (digest := file_sha256(image.path)) in trained]
    if same:
        picture, original = same[0]
        raise ForgeError(f"holds {len(same)} of the training pictures (e.g. "
                         f"{display_path(picture)} is {display_path(original)}): measured on "
                         "them, the separation would not be a held-out one", path=folder,
                         fix="give --held-out pictures kept out of training (move those out of "
                             "it), or leave --held-out out to measure on the training pictures "
                             "with fresh noise")


def _latents(vae: Any, concept: Concept, dataset: Dataset, config: DatasetConfig,
             device: torch.device) -> list[torch.Tensor]:
    """VAE latents of a concept's images, each fitted to its bucket: one tensor per bucket (one
    batch shape each), the most common bucket first."""
    import torch

    from loraforge.dataset.examples import build_examples, pixel_tensor

    single = type(dataset)(dataset.root, [concept])
    examples = build_examples(single, config.model_copy(update={"concepts": {}}),
                              lambda _message: None)
    groups = []
    for bucket, _count in Counter(e.bucket for e in examples).most_common():
        pixels = torch.stack([pixel_tensor(e, False) for e in examples if e.bucket == bucket])
        with torch.no_grad():
            encoded = vae.encode(pixels.to(device)).latent_dist.mean
        groups.append(encoded * vae.config.scaling_factor)
    return groups


def bucket_seed(latents: torch.Tensor) -> int:
    """The noise seed of a bucket of latents: NOISE_SEED + 1000 x height + width (latent px)."""
    return NOISE_SEED + 1000 * latents.shape[-2] + latents.shape[-1]


def _noised(latents: torch.Tensor, alphas_cumprod: torch.Tensor, seed: int) -> Noised:
    """Every image at every timestep of TIMESTEPS, with noise from `seed`: images x timesteps
    rows, timestep-major."""
    import torch

    count = latents.shape[0]
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(TIMESTEPS), *latents.shape), generator=generator)
    noise = noise.to(latents.device).flatten(0, 1)
    timesteps = torch.tensor(TIMESTEPS, device=latents.device).repeat_interleave(count)
    alpha_bar = alphas_cumprod.to(latents.device)[timesteps].view(-1, 1, 1, 1)
    clean = latents.repeat(len(TIMESTEPS), 1, 1, 1)
    return Noised(alpha_bar.sqrt() * clean + (1 - alpha_bar).sqrt() * noise, timesteps, noise)


def _loss_by_timestep(unet: Any, groups: list[Noised], hidden: torch.Tensor) -> list[float]:
    """The mean loss over every image at each timestep (all groups together)."""
    import torch

    totals = torch.zeros(len(TIMESTEPS), dtype=torch.float64)
    with torch.no_grad():
        for group in groups:
            errors = []
            for start in range(0, group.noisy.shape[0], BATCH):
                rows = slice(start, start + BATCH)
                states = hidden.expand(group.noisy[rows].shape[0], -1, -1)
                prediction = unet(group.noisy[rows], group.timesteps[rows],
                                  encoder_hidden_states=states).sample
                errors.append((prediction.float() - group.noise[rows].float()).pow(2)
                              .mean(dim=(1, 2, 3)))
            totals += torch.cat(errors).view(len(TIMESTEPS), -1).double().sum(dim=1).cpu()
    per_timestep = totals / sum(group.images for group in groups)
    return [round(float(v), 6) for v in per_timestep]


@dataclass
class Noised:
    """Images of one batch shape, each noised at every timestep of TIMESTEPS."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor

    @property
    def images(self) -> int:
        return self.noisy.shape[0] // len(TIMESTEPS)


@dataclass
class Sample:
    """A concept's images, noised at every timestep of TIMESTEPS with fixed noise: one group
    per bucket (batch shape)."""

    concept: str
    trigger: str
    held_out: bool
    images: int
    groups: list[Noised]


def concept_samples(vae: Any, alphas_cumprod: torch.Tensor, dataset: Dataset,
                    config: DatasetConfig, held: Dataset | None, device: torch.device,
                    ) -> list[Sample]:
    """One Sample per concept of `dataset`: its held-out images when `held` has the concept,
    else its training images (fresh noise: NOISE_SEED is no training step's)."""
    samples = []
    for concept in dataset.concepts:
        own = next((c for c in held.concepts if c.name == concept.name), None) if held else None
        source, images = (held, own) if own is not None else (dataset, concept)
        # each bucket's noise is drawn from its own seed, whatever other buckets there are
        groups = [_noised(latents, alphas_cumprod, bucket_seed(latents))
                  for latents in _latents(vae, images, source, config, device)]
        samples.append(Sample(concept.name, concept.trigger, own is not None,
                              sum(group.images for group in groups), groups))
    return samples


def trigger_losses(unet: Any, encode: Any, samples: list[Sample], triggers: list[str],
                   ) -> dict[str, dict[str, list[float]]]:
    """Concept -> trigger -> loss at each timestep; `encode(prompt)` gives hidden states."""
    hidden = {trigger: encode(trigger) for trigger in triggers}
    return {s.concept: {t: _loss_by_timestep(unet, s.groups, hidden[t])
                        for t in triggers} for s in samples}


def separation_table(run: str, lora: str, samples: list[Sample],
                     with_lora: dict[str, dict[str, list[float]]],
                     without: dict[str, dict[str, list[float]]]) -> Separation:
    """The table from `trigger_losses` with the LoRA (every trigger) and without it (at least
    each concept's own trigger)."""
    rows = []
    for s in samples:
        by_timestep = {**with_lora[s.concept], NO_LORA: without[s.concept][s.trigger]}
        rows.append(ConceptSeparation(
            s.concept, s.trigger, s.images, s.held_out,
            {t: _mean(v) for t, v in with_lora[s.concept].items()},
            _mean(by_timestep[NO_LORA]), by_timestep))
    return Separation(run, lora, list(TIMESTEPS), NOISE_SEED, rows)


def measure(settings: Settings, run_dir: Path, held_out: Path | None = None) -> Separation:
    """The separation table of a finished run (loads the base model and its final LoRA)."""
    import torch

    from loraforge.dataset.scan import scan_dataset
    from loraforge.generate.loras import read_header
    from loraforge.runtime import go_offline, pick_device, quiet_loading
    from loraforge.text import chunk_token_ids, encode_token_ids

    lora = finished_lora(run_dir)
    read_header(lora)  # a cut or damaged file is named before the models load
    record = runs.read_record(run_dir) or {}
    config, clip_skip, chunks = _recorded(record, settings)
    dataset = scan_dataset(settings.dataset_dir, config.caption_extension)
    _refuse_untrained(dataset, record, run_dir.name)
    _refuse_unseen_pictures(dataset, record, run_dir.name)
    distinct_triggers(dataset)
    held = _held_out(held_out, dataset, config)
    go_offline(settings)
    base, notes = _base_model(record, settings, run_dir.name)
    device = pick_device()
    with quiet_loading():
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            base, safety_checker=None, requires_safety_checker=False, local_files_only=True,
            dtype=torch.float32).to(device)

    def encode(prompt: str) -> torch.Tensor:
        with torch.no_grad():
            ids = chunk_token_ids(pipe.tokenizer, [prompt], chunks)
            return encode_token_ids(pipe.text_encoder, ids, clip_skip)

    samples = concept_samples(pipe.vae, pipe.scheduler.alphas_cumprod, dataset, config, held,
                              device)
    triggers = list(dict.fromkeys(s.trigger for s in samples))
    without = {s.concept: trigger_losses(pipe.unet, encode, [s], [s.trigger])[s.concept]
               for s in samples}
    with quiet_loading():
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    with_lora = trigger_losses(pipe.unet, encode, samples, triggers)
    result = separation_table(run_dir.name, lora.name, samples, with_lora, without)
    result.base_model, result.dataset, result.notes = str(base), str(dataset.root), notes
    result.held_out = None if held is None else str(held.root)
    return result


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 6)


def signed_percent(value: float) -> str:
    """A margin or separation as eval and the report show it: `+1.25%`, and `0.00%` (not
    `-0.00%`) for a value that rounds to zero."""
    shown = f"{value:+.2%}"
    return "0.00%" if float(shown.rstrip("%")) == 0 else shown


def write_separation(run_dir: Path, result: Separation, mode: int) -> Path:
    """`separation.json` in the run folder (the run's report shows it)."""
    path = run_dir / runs.SEPARATION
    write_atomic(path, json.dumps(result.to_dict(), indent=1), mode)
    return path


def print_table(result: Separation, console: Any) -> None:
    """The table `loraforge eval` prints: one row per concept, one column per trigger (names
    and triggers as written, `[wip] mira` too: never read as markup)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"concept separation of run {result.run} ({result.lora})"))
    table.add_column("concept")
    table.add_column("images")
    for trigger in result.triggers:
        table.add_column(escape(f'"{trigger}"'), justify="right")
    table.add_column(NO_LORA, justify="right")
    table.add_column("margin", justify="right")
    for row in result.concepts:
        cells = []
        for trigger in result.triggers:
            text = f"{row.loss[trigger]:.4f}"
            cells.append(f"[bold]{text}[/bold]" if trigger == row.trigger else text)
        margin = row.margin
        shown = "—" if margin is None else signed_percent(margin)
        if row.separated is False:
            shown = f"[red]{shown}[/red]"
        source = "held-out" if row.held_out else "training, fresh noise"
        table.add_row(escape(row.name), f"{row.images} ({source})", *cells,
                      f"{row.no_lora:.4f}", shown)
    console.print(table)
    for note in result.notes:
        console.print(f"note: {note}", markup=False)
    for a, b, value in result.pairs():
        console.print(f"pair {a} / {b}: separation {signed_percent(value)}", markup=False)
    console.print("denoising loss at fixed noise and timesteps (lower is better); bold: the "
                  "concept's own trigger. margin: how much lower its own trigger is than the "
                  "best other one; negative or ~0: the LoRA does not tell the concepts apart. pair "
                  "separation: both concepts' losses under each other's trigger minus under "
                  "their own, relative to their own; a prompt that suits every image cancels "
                  "out of it.")
