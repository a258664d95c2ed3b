"""Progress for people and for log files: a bar on a terminal; otherwise (a SLURM log) one plain
line every N seconds, never carriage-return spam.

rich keeps the count, the speed and the ETA in both cases. It draws the bar; the log line is ours,
because rich writes nothing to a file until the bar stops."""

from __future__ import annotations

import datetime
import sys
import time
from typing import TextIO

#: Speed and ETA come from the steps of the last few minutes (not the warm-up of a long run).
SPEED_WINDOW_SECONDS = 300.0


class TrainingProgress:
    """Reports step/total, epoch, smoothed loss, lr, images/s and ETA."""

    def __init__(self, total_steps: int, start_step: int, every_seconds: float,
                 stream: TextIO | None = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.total = total_steps
        self.every = every_seconds
        self.stream = stream or sys.stdout
        self.started = time.monotonic()
        self.last_line = self.started
        self._rich = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                              console=Console(file=self.stream),
                              speed_estimate_period=SPEED_WINDOW_SECONDS,
                              disable=not self.stream.isatty())
        self._steps = self._rich.add_task("train", total=total_steps, completed=start_step,
                                          info="")
        self._images = self._rich.add_task("images", total=None, visible=False)
        self._rich.start()

    def line(self, step: int, epoch: int, loss: float, lr: float) -> str:
        """The log line; speed and ETA read `?` until two steps have been timed."""
        steps, images = self._rich.tasks  # in the order they were added
        eta, rate = steps.time_remaining, images.speed
        return (f"step {step}/{self.total} epoch {epoch} loss {loss:.4f} lr {lr:.2e} "
                f"{'?' if rate is None else f'{rate:.2f}'} img/s eta "
                f"{'?' if eta is None else datetime.timedelta(seconds=int(eta))}")

    def update(self, step: int, epoch: int, loss: float, lr: float, images: int) -> None:
        self._rich.update(self._steps, completed=step,
                          info=f"epoch {epoch} loss {loss:.4f} lr {lr:.2e}")
        self._rich.advance(self._images, images)
        if not self._rich.disable:
            return
        now = time.monotonic()
        if now - self.last_line >= self.every or step == self.total:
            self.last_line = now
            print(self.line(step, epoch, loss, lr), file=self.stream, flush=True)

    def close(self) -> None:
        self._rich.stop()
