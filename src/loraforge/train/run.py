"""One training run, from the command's checks to its record: the inputs checked before
anything is written, a finished run handed back (only for the same settings and pictures), one
training of a run at a time, `--restart`, and run.json's account of the attempt (started,
interrupted, failed and why). The training itself is `trainer.Trainer`'s.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from loraforge import runs
from loraforge.errors import ForgeError
from loraforge.fsutil import disk_full, full_disk_error
from loraforge.hashing import env_time
from loraforge.models.folders import exclusive
from loraforge.train import distributed
from loraforge.train.distributed import World, from_main, gather_objects
from loraforge.train.journal import HISTORY, LOG, setup_logging
from loraforge.train.plan import lr_factor
from loraforge.train.resume import RESUME_SAFE, check_finished_with
from loraforge.train.signals import Interrupted, StopRequest
from loraforge.train.trainer import ReportWriter, Trainer

if TYPE_CHECKING:
    import torch

    from loraforge.config import Settings
    from loraforge.dataset.scan import Dataset

#: Held by the process training the run.
LOCK = ".train.lock"
#: The statuses run.json keeps for an attempt that stopped before the end (a killed one's
#: still says running).
UNFINISHED = ("running", "interrupted", "failed")

log = logging.getLogger("loraforge.train")


SLURM_FIELDS = {"job_id": "SLURM_JOB_ID", "node": "SLURMD_NODENAME",
                "restart_count": "SLURM_RESTART_COUNT", "array_job_id": "SLURM_ARRAY_JOB_ID",
                "array_task_id": "SLURM_ARRAY_TASK_ID", "job_name": "SLURM_JOB_NAME",
                # job ids are per cluster: two clusters may mount one storage root
                "cluster": "SLURM_CLUSTER_NAME"}


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
    #: For a finished run handed back: how its file differs from what these settings ask for.
    note: str | None = None


def check_inputs(settings: Settings, run_name: str | None) -> tuple[str, Dataset, Path]:
    """The run name, the dataset (and what training makes of it) and the base model's folder,
    checked (ForgeError names what is wrong) before anything is written; switches the process
    offline. A launch of several processes calls it first, so a mistake is reported once, not
    once per process, and the tiny model is built once."""
    from loraforge.dataset.examples import build_examples
    from loraforge.dataset.scan import scan_dataset
    from loraforge.models.store import resolve_base_model
    from loraforge.runtime import go_offline

    name = check_run(settings, run_name)
    dataset = scan_dataset(settings.dataset_dir, settings.config.dataset.caption_extension)
    build_examples(dataset, settings.config.dataset, lambda _warning: None)  # the trainer warns
    go_offline(settings)
    return name, dataset, resolve_base_model(settings)


def check_run(settings: Settings, run_name: str | None) -> str:
    """The run's name (`--run`, else train.run_name), checked: a valid name, and not another
    project's run (`_refuse_others`)."""
    name = runs.check_run_name(run_name if run_name is not None else settings.config.train.run_name)
    _refuse_others(settings.runs_dir / name, settings)
    return name


def _refuse_others(run_dir: Path, settings: Settings) -> None:
    """A run folder of another project on a shared storage root (two projects that kept the
    default run name): resuming it, handing it back or `--restart` would take over or delete
    that project's run. What counts as another project's: `runs.another_project` (the same
    folder by another path, or a project moved away, goes on with its runs)."""
    from loraforge.dataset.scan import shell_path

    record = runs.read_record(run_dir)
    owner = (runs.another_project(record, settings.base_dir, settings.runs_dir)
             if record else None)
    if owner is None:
        return
    raise ForgeError(f"run `{run_dir.name}` is another project's ({owner}): training it from "
                     f"{settings.base_dir} would resume, hand back or replace (--restart) that "
                     "project's run", path=run_dir,
                     fix="give this project's run its own name: --run NAME, or train.run_name "
                         "in forge.toml (every project on a storage root shares the default "
                         f"name); if {shell_path(Path(owner))} is an old copy of this project "
                         "that you no longer use, move it away first")


def _check_final(final: Path) -> None:
    """A finished run's LoRA, before it is handed back: a cut or damaged file is named."""
    from loraforge.generate.loras import read_header

    try:
        read_header(final)
    except ForgeError as exc:
        raise ForgeError(f"the run finished, but its LoRA {exc.message}", path=final,
                         fix="pass --restart to train it again (or copy the file back from "
                             "where you keep a copy)") from None


def refuse_damaged(run_dir: Path, why: str) -> None:
    """A run whose record cannot be read may have finished: guessing would train over its
    LoRA, or mix a new training into its files."""
    from loraforge.dataset.scan import shell_path

    record = run_dir / runs.RECORD
    final = runs.final_lora(run_dir)
    kept = (f"its LoRA {final.name} is untouched (`loraforge generate --lora "
            f"{shell_path(final)}` uses it); " if final.is_file() else "")
    raise ForgeError(f"the run's record cannot be read ({why}), so whether and how far it "
                     "trained is unknown", path=record,
                     fix=f"{kept}restore {runs.RECORD} from a copy and rerun, or move it away "
                         f"(mv {shell_path(record)} {shell_path(record)}.damaged) and rerun: a "
                         "run with a saved state resumes from it; one without asks for "
                         "--restart, which replaces its LoRA files")


def _finished(settings: Settings, dataset: Dataset, run_dir: Path, world: World,
              ) -> TrainResult | None:
    """The run's final LoRA when it finished with these settings, images and captions (None:
    it did not finish, and trains). ForgeError for a damaged record, for other settings or
    pictures (they ask for another training), and for a final file cut short."""
    from loraforge.dataset.examples import build_examples

    record = runs.read_record(run_dir)
    if record is None and (why := runs.damage(run_dir)) is not None:
        refuse_damaged(run_dir, why)
    final = runs.final_lora(run_dir)
    if not record or record.get("status") != "finished" or not final.is_file():
        return None
    if not record["config"]:  # hand-edited: nothing to compare with
        refuse_damaged(run_dir, "it records no settings")
    examples = build_examples(dataset, settings.config.dataset, lambda _warning: None)
    check_finished_with(record, settings, run_dir, examples, world)
    _check_final(final)
    saved = record["config"].get("train", {}).get("save_precision")
    wanted = settings.config.train.save_precision
    note = None
    if saved is not None and saved != wanted:  # the same weights, rounded otherwise
        note = (f"its LoRA was saved in {saved}, not in the {wanted} that train.save_precision "
                f"asks for now; pass --restart to train it again and save it in {wanted}")
    return TrainResult(final, None, note)


def train(settings: Settings, run_name: str | None, restart: bool,
          world: World | None = None, report: ReportWriter | None = None,
          stop: StopRequest | None = None) -> TrainResult:
    """Train (or resume) one run as one of `world`'s processes (default: the one torchrun or
    srun describe, else a single process); returns the final LoRA file and the trainer.
    `report(run_dir, file_mode)` rebuilds the run's report after each epoch and at the end.
    `stop`: the command's stop request (default: one for this call); a stop ends the training
    as Interrupted."""
    with nullcontext(stop) if stop is not None else StopRequest() as request:
        return _train(settings, run_name, restart, world or distributed.world_from_env(),
                      report, request)


def _train(settings: Settings, run_name: str | None, restart: bool, world: World,
           report: ReportWriter | None, stop: StopRequest) -> TrainResult:
    name, dataset, base = check_inputs(settings, run_name)
    run_dir = settings.runs_dir / name
    if not restart:
        finished = _finished(settings, dataset, run_dir, world)
        if finished is not None:
            return finished
    if run_dir.exists() and not run_dir.is_dir():
        raise ForgeError("is a file where the run's folder goes", path=run_dir,
                         fix="move that file away, or name another run with --run")
    # Rank 0 alone makes the folder (the others use it only after they meet it, in
    # distributed.join), so that it alone knows whether this attempt made it.
    created = world.is_main and not run_dir.exists()
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    return _train_locked(settings, dataset, run_dir, base, restart, world, report, created,
                         stop)


def _remove_if_unstarted(run_dir: Path) -> None:
    """A new run refused (its optimizer needs a GPU, say) or stopped by a signal before it
    recorded anything: the folder made for it goes too, else an empty run is left that
    `generate` takes for a run."""
    if {p.name for p in run_dir.iterdir()} <= {LOCK, LOG}:
        shutil.rmtree(run_dir, ignore_errors=True)


def _train_locked(settings: Settings, dataset: Dataset, run_dir: Path, base: Path,
                  restart: bool, world: World, report: ReportWriter | None, created: bool,
                  stop: StopRequest) -> TrainResult:
    """The training of the run, one at a time (a job submitted twice, sbatch beside a local
    run), logged to its train.log. `created`: its folder was made for this attempt."""
    name = run_dir.name
    with exclusive(run_dir / LOCK, f"training run `{name}`") if world.is_main else nullcontext():
        if world.is_main:
            _remove_killed_saves(run_dir)
        handler = setup_logging(run_dir, world)
        device = distributed.device_for(world, settings.config.train.gpus)
        distributed.join(world, device)
        clean = False
        try:
            stop.stop_here(world)  # torch has loaded (device_for)
            result = _train_in(settings, dataset, run_dir, base, restart, world, device,
                               report, stop)
            clean = True
            return result
        except (Interrupted, ForgeError) as exc:
            clean = isinstance(exc, Interrupted)
            if created:  # rank 0, under the lock: no other training is in it
                _remove_if_unstarted(run_dir)
            raise
        finally:
            distributed.leave(world, clean)
            if handler is not None:
                logging.getLogger("loraforge").removeHandler(handler)
                handler.close()


def _train_in(settings: Settings, dataset: Dataset, run_dir: Path, base: Path,
              restart: bool, world: World, device: torch.device,
              report: ReportWriter | None, stop: StopRequest) -> TrainResult:
    from loraforge.models.manifest import model_legacy_hash, model_sha256
    from loraforge.train.metadata import TrainingFacts

    # A refusal of the settings comes before anything trains: the run, and its record (or
    # its having none), stay as they were.
    trainer = Trainer(settings, dataset, run_dir, world, device, report)
    if restart and world.is_main:  # what the old attempt made must not mix with the new one;
        for folder in ("state", "events", "samples"):  # only now that the settings are checked
            shutil.rmtree(run_dir / folder, ignore_errors=True)
        for old in [run_dir / HISTORY, run_dir / runs.SEPARATION, *runs.lora_files(run_dir)]:
            old.unlink(missing_ok=True)
    if restart:  # nor its record: its loss, LoRA file, finish and caches are not this attempt's
        trainer.record.data = {"name": run_dir.name}
    state = trainer.saved_state(restart)  # a refused resume leaves run.json as it was
    trained_from = _trained_from(trainer) if world.is_main else None
    if state is None:
        _start_over(trainer, trained_from)
    hosts = gather_objects(runs.this_host(), world)
    started = trainer.record.data.get("started_at_unix") or env_time() or time.time()
    session = hashlib.sha256(f"{run_dir.name}|{started}|{settings.config.train.seed}".encode()
                             ).hexdigest()[:16]
    # The base model as A1111 names it (an imported checkpoint by its own file's hashes);
    # only rank 0 writes the metadata
    model_sha = (model_sha256(base, settings.cache_dir) or "") if world.is_main else ""
    model_legacy = model_legacy_hash(base) if world.is_main else ""
    trainer.record.update(  # an earlier attempt's failure is not this attempt's
        name=run_dir.name, status="running", error=None, failed_at=None,
        config=settings.to_dict(), project=str(settings.base_dir),
        dataset={"concepts": dataset.dataset_dirs(), "images": dataset.num_images,
                 "images_x_repeats": dataset.images_x_repeats},
        started_at_unix=started, base_model=str(base), base_model_sha256=model_sha,
        device=str(trainer.device), **{runs.TRAINED_FROM: trained_from},
        processes=world.size, process_hosts=hosts, pid=os.getpid(),
        global_batch_size=trainer.plan.batch_size,
        steps_per_epoch=trainer.plan.steps_per_epoch, epochs=trainer.plan.epochs,
        slurm=slurm_job())
    if restart and world.is_main:  # not the old attempt's report: finished, its LoRA files
        trainer.write_report()

    def facts_for(t: Trainer, optimizer: Any, warmup: int) -> TrainingFacts:
        return TrainingFacts(
            run_name=run_dir.name, session_id=session, started_at=started,
            base_model_name=base.name, base_model_sha256=model_sha,
            base_model_legacy_hash=model_legacy,
            optimizer=_optimizer_description(optimizer, settings.config.train.optimizer_args),
            total_steps=t.plan.total_steps, num_epochs=t.plan.epochs,
            batches_per_epoch=t.plan.batches_per_epoch, total_batch_size=t.plan.batch_size,
            lr_factor=lr_factor(settings, t.world), warmup_steps=warmup,
            mixed_precision=t.precision, train_text_encoder=t.train_text,
            bucket_info=t.bucket_info())

    try:
        return TrainResult(trainer.run(base, state, facts_for, stop), trainer)
    except Interrupted:
        if trainer.record.data.get("status") == "finished":  # the signal came as it returned:
            return TrainResult(runs.final_lora(run_dir), trainer)  # the run is done, keep it so
        _record_end(trainer, status="interrupted")
        raise
    except ForgeError as exc:
        _record_end(trainer, status="failed", error=str(exc))
        raise
    except OSError as exc:  # an image removed mid-run, a folder made read-only, a full disk
        goes_on = runs.rerun_goes_on(run_dir)
        if disk_full(exc):
            error = full_disk_error(exc, exc.filename or run_dir, goes_on)
        else:
            error = ForgeError(f"{exc.strerror or exc} while training",
                               path=exc.filename or run_dir,
                               fix=f"fix the file or free the space, then rerun the same "
                                   f"command: {goes_on}")
        _record_end(trainer, status="failed", error=str(error))
        raise error from None
    except BaseException as exc:
        _record_end(trainer, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise


def _trained_from(trainer: Trainer) -> str:
    """The sha256 of what decides the trained weights: the settings a resume compares (those
    it may change left out), the images and their captions. Two trainings of a run with the
    same one write the same LoRA files."""
    found = trainer.trained_with
    decides = {section: {key: value for key, value in values.items()
                         if f"{section}.{key}" not in RESUME_SAFE}
               for section, values in found.items()}
    return hashlib.sha256(json.dumps(decides, sort_keys=True).encode()).hexdigest()


def _earlier_files(trainer: Trainer, trained_from: str | None,
                   ) -> tuple[str, Literal["same", "other", "unknown"]] | None:
    """The run's LoRA files as a message names them, and what its record shows of them: an
    unfinished attempt of this run wrote them from the `same` `_trained_from`, or from an
    `other` one; else `unknown`. None when it has none."""
    run_dir, record = trainer.run_dir, trainer.record.data
    earlier = [p.name for p in runs.lora_files(run_dir)]
    if not earlier:
        return None
    shown = f"{', '.join(earlier[:3])}{', ...' if len(earlier) > 3 else ''}"
    recorded = record.get(runs.TRAINED_FROM)
    if (record.get("name") != run_dir.name or record.get("status") not in UNFINISHED
            or recorded is None):
        return shown, "unknown"
    return shown, "same" if recorded == trained_from else "other"


def _start_over(trainer: Trainer, trained_from: str | None) -> None:
    """A run that holds LoRA files but no state to resume from: an attempt of it stopped
    before its first state (killed, its disk full) with the same settings and images trains
    again from step 0, which writes those files again, unchanged. Any other files (another
    training's, a finished run's, a run copied from another name, a record that does not say)
    would be overwritten by the new training's, or mixed with them: refused. Rank 0 decides:
    on shared storage another node may still see an older listing."""
    run_dir, world = trainer.run_dir, trainer.world
    found = from_main(_earlier_files(trainer, trained_from) if world.is_main else None, world)
    if found is None:
        return
    shown, known = found
    if known == "same":
        log.info("run `%s` stopped before its first state was saved: training it again from "
                 "step 0 with the same settings and images, which write %s again, unchanged",
                 run_dir.name, shown)
        return
    other = ", and other settings or images than these trained them" if known == "other" else ""
    undo = "undo those changes to train it again from step 0, " if known == "other" else ""
    raise ForgeError(f"run `{run_dir.name}` holds LoRA files of an earlier training ({shown}) "
                     f"but no state to resume it from{other}", path=run_dir,
                     fix=f"{undo}pass --restart to train it again from the start (those files "
                         "are replaced), or name a new run with --run")


def _remove_killed_saves(run_dir: Path) -> None:
    """The hidden copies of LoRA files whose save was killed (SIGKILL: no code runs to remove
    them), each as large as the file: only this run's trainer writes its LoRA files, and it
    holds the run's lock now."""
    for tmp in run_dir.glob(f".{glob.escape(run_dir.name)}*.safetensors.*.tmp"):
        tmp.unlink(missing_ok=True)


def _record_end(trainer: Trainer, **values: Any) -> None:
    """run.json's account of how the attempt ended, where it can be written, and the report
    rebuilt to say so (a report that cannot be written is a warning line: the attempt's own
    end is what the user reads). On a full disk the record often cannot be written: the error
    that ended the attempt must still be the one the user reads (the record then still says
    running, and `loraforge runs` shows the run as stopped)."""
    record = trainer.record
    try:
        record.update(**values)
    except OSError as exc:
        log.warning("%s not updated (%s): `loraforge runs` shows the run as stopped",
                    record.path, exc.strerror or exc)
        return
    if record.write:
        trainer.write_report()
