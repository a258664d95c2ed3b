"""The training's progress: the bar on a terminal, in a log file one line every N seconds with
step/total, epoch, smoothed loss, lr, images/s and ETA (see `loraforge.progress`)."""

from __future__ import annotations

from typing import TextIO

from loraforge.progress import Progress, duration


class TrainingProgress:
    """Reports step/total, epoch, smoothed loss, lr, images/s and ETA."""

    def __init__(self, total_steps: int, start_step: int, every_seconds: float,
                 stream: TextIO | None = None) -> None:
        self.total = total_steps
        self.progress = Progress("train", total_steps, every_seconds, start_step, stream)
        self.stream = self.progress.stream

    def line(self, step: int, epoch: int, loss: float, lr: float) -> str:
        """The log line; speed and ETA read `?` until two steps have been timed."""
        rate = self.progress.rate
        return (f"step {step}/{self.total} epoch {epoch} loss {loss:.4f} lr {lr:.2e} "
                f"{'?' if rate is None else f'{rate:.2f}'} img/s eta "
                f"{duration(self.progress.eta)}")

    def update(self, step: int, epoch: int, loss: float, lr: float, images: int) -> None:
        if self.progress.update(step, images, f"epoch {epoch} loss {loss:.4f} lr {lr:.2e}"):
            print(self.line(step, epoch, loss, lr), file=self.stream, flush=True)

    def close(self) -> None:
        self.progress.close()
