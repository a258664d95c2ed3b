"""Stopping a training cleanly: SIGTERM/SIGINT/SIGUSR1 (SLURM's time-limit warning, a
preemption, Ctrl-C) become a flag the loop checks between optimizer steps; the run then saves
its state and ends with `RESUMABLE_EXIT`, which the job script maps to a requeue."""

from __future__ import annotations

import logging

from loraforge.runtime import SignalFlag
from loraforge.train.distributed import RESUMABLE

#: Exit code after a signal: state saved, rerun the same command to resume (EX_TEMPFAIL).
RESUMABLE_EXIT = RESUMABLE
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")

log = logging.getLogger("loraforge.train")


class StopRequest(SignalFlag):
    """Turns SIGTERM/SIGINT/SIGUSR1 into a flag the loop checks between optimizer steps."""

    def __init__(self) -> None:
        super().__init__(STOP_SIGNALS, log, "saving state at the end of this step")

    @property
    def requested(self) -> bool:
        return self.given

    @property
    def reason(self) -> str:
        """Why a state is saved: the signal, or another process's (which this one heard of
        through the step's collective)."""
        return f"signal {self.signal_name or 'to another process'}"


class Interrupted(Exception):
    """Training stopped on a signal; the run can be resumed. `saved`: a state of it is on disk
    (False: stopped before its first step, so a rerun starts it)."""

    def __init__(self, saved: bool = True) -> None:
        super().__init__()
        self.saved = saved
