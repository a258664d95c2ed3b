"""Progress for people and for log files: a bar on a terminal; otherwise (a SLURM log) one plain
line every N seconds, never carriage-return spam.

rich keeps the count, the speed and the ETA in both cases. It draws the bar; the log line is the
caller's (`update` says when one is due), because rich writes nothing to a file until the bar
stops."""

from __future__ import annotations

import datetime
import sys
import time
from typing import TextIO

#: Speed and ETA come from the work of the last few minutes (not the warm-up of a long run).
SPEED_WINDOW_SECONDS = 300.0


def duration(seconds: float | None) -> str:
    """H:MM:SS, or `?` while there is no estimate yet."""
    return "?" if seconds is None else str(datetime.timedelta(seconds=int(seconds)))


class Progress:
    """`total` steps from `start`, each handling some items (images): the bar shows the steps
    and `info`; `rate` is items per second and `eta` seconds, both None until two updates."""

    def __init__(self, label: str, total: int, every_seconds: float, start: int = 0,
                 stream: TextIO | None = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.total = total
        self.every = every_seconds
        self.stream = stream or sys.stdout
        self.last_line = time.monotonic()
        self._rich = RichProgress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                  console=Console(file=self.stream),
                                  speed_estimate_period=SPEED_WINDOW_SECONDS,
                                  disable=not self.stream.isatty())
        self._steps = self._rich.add_task(label, total=total, completed=start, info="")
        self._items = self._rich.add_task("items", total=None, visible=False)
        self._rich.start()

    @property
    def rate(self) -> float | None:
        return self._rich.tasks[self._items].speed

    @property
    def eta(self) -> float | None:
        return self._rich.tasks[self._steps].time_remaining

    def update(self, completed: int, items: int, info: str = "") -> bool:
        """Record progress; True when the caller should print its log line now (not a
        terminal, and `every_seconds` have passed or the work is done)."""
        self._rich.update(self._steps, completed=completed, info=info)
        self._rich.advance(self._items, items)
        if not self._rich.disable:
            return False
        now = time.monotonic()
        if now - self.last_line >= self.every or completed == self.total:
            self.last_line = now
            return True
        return False

    def close(self) -> None:
        self._rich.stop()
