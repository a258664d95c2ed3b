"""The record of a run: its log (`setup_logging`), and for every optimizer step the moving
average of the loss (saved with each state) and, on rank 0, the TensorBoard scalars, one
`history.jsonl` line and the progress bar or log line.

Losses stay on the device until they are written: reading one makes the CPU wait for the GPU to
finish every step queued so far, which leaves the GPU idle while the next step is prepared. So
on a GPU they are read in groups: the first step alone (its time shows the warm-up:
compiling, the first kernel launches), then every `GPU_GROUP` steps, at least once a second,
and whenever
the trainer needs the numbers (`flush`: before a state is saved, at an epoch's end, at the end).
The numbers written are the same whatever the grouping.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.errors import ForgeError
from loraforge.fsutil import named
from loraforge.train.state import Position

if TYPE_CHECKING:
    import torch

    from loraforge.train.distributed import World

log = logging.getLogger("loraforge.train")
#: Weight of the old value in the loss's moving average.
LOSS_SMOOTHING = 0.98
#: One JSON line per optimizer step; after a resume the last line for a step wins.
HISTORY = "history.jsonl"
LOG = "train.log"
#: Steps whose losses a GPU run reads at once (a CPU reads each at once: it never waits).
GPU_GROUP = 8
#: The longest a person watching waits for the next progress update.
MAX_WAIT_SECONDS = 1.0


@dataclass
class _Pending:
    step: int
    epoch: int
    loss: torch.Tensor
    lrs: list[float]
    images: int
    extra: dict[str, Any]


class Journal:
    """Keeps `position.loss_ema` and, when `write` (rank 0), the run's step records.
    `history.jsonl`'s `seconds` is when a step's loss was read: the time the step had surely
    finished."""

    def __init__(self, run_dir: Path, position: Position, total: int, every_seconds: float,
                 write: bool, on_gpu: bool, warm_up: str = "") -> None:
        from loraforge.train.progress import TrainingProgress

        self.position = position
        self.write = write
        #: What the first step does beside training (e.g. "compiling"); its time is logged.
        self.warm_up = warm_up
        self.group = GPU_GROUP if on_gpu else 1
        self.pending: list[_Pending] = []
        self.last_flush = -float("inf")  # the first step is read at once: it shows the warm-up
        if not write:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "events"), purge_step=position.step + 1)
        # Line-buffered: a process killed without warning keeps every line written so far.
        self.history = open(run_dir / HISTORY, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self.progress = TrainingProgress(total, position.step, every_seconds)
        self.started = time.monotonic()

    def step(self, epoch: int, loss: torch.Tensor, lrs: list[float], images: int,
             extra: dict[str, Any]) -> None:
        """Record the step `position.step` (already counted), whose mean loss is `loss`."""
        self.pending.append(_Pending(self.position.step, epoch, loss.detach(), list(lrs),
                                     images, extra))
        if (len(self.pending) >= self.group
                or time.monotonic() - self.last_flush >= MAX_WAIT_SECONDS):
            self.flush()

    def flush(self, durable: bool = False) -> None:
        """Read the pending losses (one wait for the device) and record them in order; each
        history line reaches the file at once. `durable`: the TensorBoard events too (before
        a state is saved: a process killed after it must not leave a hole in the curves)."""
        self.last_flush = time.monotonic()
        if self.pending:
            self._record_pending()
        if durable and self.write:
            self.writer.flush()

    def _record_pending(self) -> None:
        import torch

        losses = torch.stack([p.loss.float() for p in self.pending]).tolist()
        for entry, loss in zip(self.pending, losses, strict=True):
            if not math.isfinite(loss):  # raised before a state or a file can save the weights
                raise ForgeError(
                    f"the loss became {loss} at step {entry.step}: training diverged, and "
                    "every later weight would be broken", fix="lower train.unet_lr and "
                    "train.text_encoder_lr (or use mixed_precision = \"bf16\" instead of "
                    "fp16) and train again with --restart; if the loss is not finite from the "
                    "first step, check the base model's files")
        if self.warm_up and self.write:
            log.info("first step: %.1f s (%s included)", self.last_flush - self.started,
                     self.warm_up)
            self.warm_up = ""
        for entry, loss in zip(self.pending, losses, strict=True):
            self.position.loss_ema = (LOSS_SMOOTHING * self.position.loss_ema
                                      + (1 - LOSS_SMOOTHING) * loss)
            if self.write:
                self._write(entry, loss, self.position.loss_ema
                            / (1 - LOSS_SMOOTHING ** entry.step))
        self.pending.clear()

    def _write(self, entry: _Pending, loss: float, smoothed: float) -> None:
        self.writer.add_scalar("loss/step", loss, entry.step)
        self.writer.add_scalar("loss/smoothed", smoothed, entry.step)
        for group_name, lr in zip(("unet", "text_encoder"), entry.lrs, strict=False):
            self.writer.add_scalar(f"lr/{group_name}", lr, entry.step)
        try:
            self.history.write(json.dumps({
                "step": entry.step, "epoch": entry.epoch, "loss": loss,
                "loss_smoothed": smoothed, "lr": entry.lrs,
                "seconds": round(self.last_flush - self.started, 4), **entry.extra}) + "\n")
        except OSError as exc:  # a full disk: name the file (a failed write names none)
            raise named(exc, Path(self.history.name)) from None
        self.progress.update(entry.step, entry.epoch, smoothed, entry.lrs[0], entry.images)

    def close(self) -> None:
        self.flush()
        if self.write:
            self.progress.close()
            self.writer.close()
            self.history.close()


class _LogFile(logging.FileHandler):
    """train.log. A disk too full for it loses its lines without a word: they reach stderr all
    the same, and logging's own report would be a traceback per line, around the error that
    tells the full disk."""

    def handleError(self, record: logging.LogRecord) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handleError(record)


def setup_logging(run_dir: Path, world: World) -> logging.Handler | None:
    """Rank 0 logs to train.log and stderr; other processes only their own errors, marked
    with their rank (the messages would otherwise repeat once per process)."""
    root = logging.getLogger("loraforge")
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in root.handlers):
        stream = logging.StreamHandler(sys.stderr)
        prefix = "" if world.is_main else f"[rank {world.rank}] "
        stream.setFormatter(logging.Formatter(prefix + "%(message)s"))
        root.addHandler(stream)
    if not world.is_main:
        root.setLevel(logging.ERROR)
        return None
    handler = _LogFile(run_dir / LOG, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    return handler
