"""Progress for people and for log files: a bar on a terminal; otherwise (a SLURM log) one plain
line every N seconds, never carriage-return spam."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class TrainingProgress:
    """Reports step/total, epoch, smoothed loss, lr, images/s and ETA."""

    def __init__(self, total_steps: int, start_step: int, every_seconds: float,
                 stream: TextIO | None = None) -> None:
        self.total = total_steps
        self.start_step = start_step
        self.every = every_seconds
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self.last_line = self.started
        self.images = 0
        self._bar = None
        if self.tty:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step,
                                            info="")
            self._bar.start()

    def line(self, step: int, epoch: int, loss: float, lr: float) -> str:
        elapsed = time.monotonic() - self.started
        done = step - self.start_step
        rate = self.images / elapsed if elapsed > 0 else 0.0
        eta = elapsed / done * (self.total - step) if done else 0.0
        return (f"step {step}/{self.total} epoch {epoch} loss {loss:.4f} lr {lr:.2e} "
                f"{rate:.2f} img/s eta {_duration(eta)}")

    def update(self, step: int, epoch: int, loss: float, lr: float, images: int) -> None:
        self.images += images
        if self._bar is not None:
            self._bar.update(self._task, completed=step,
                             info=f"epoch {epoch} loss {loss:.4f} lr {lr:.2e}")
            return
        now = time.monotonic()
        if now - self.last_line >= self.every or step == self.total:
            self.last_line = now
            print(self.line(step, epoch, loss, lr), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
