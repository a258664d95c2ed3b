"""Stopping a training cleanly: SIGTERM/SIGINT/SIGUSR1 (SLURM's time-limit warning, a
preemption, Ctrl-C) become a flag the loop checks between optimizer steps; the run then saves
its state and ends with `RESUMABLE_EXIT`, which the job script maps to a requeue."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from loraforge.runtime import SignalFlag
from loraforge.train.distributed import RESUMABLE, any_rank

if TYPE_CHECKING:
    from loraforge.train.distributed import World

#: Exit code after a signal: state saved, rerun the same command to resume (EX_TEMPFAIL).
RESUMABLE_EXIT = RESUMABLE
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")

log = logging.getLogger("loraforge.train")


class StopRequest(SignalFlag):
    """Turns SIGTERM/SIGINT/SIGUSR1 into a flag the loop checks between optimizer steps, and
    the setup before them at `stop_here`. The handler never raises: raised in the middle of an
    import (numpy's, inside torch's), an exception leaves the module half-imported, or the
    library swallows it or wraps it in an error of its own, and the stop turns into a crash."""

    def __init__(self) -> None:
        super().__init__(STOP_SIGNALS, log, "stopping at the end of this step and saving its "
                         "state (before the first step: once loading ends, nothing to save)")

    @property
    def requested(self) -> bool:
        return self.given

    @property
    def reason(self) -> str:
        """Why a state is saved: the signal, or another process's (which this one heard of
        through the step's collective)."""
        return f"signal {self.signal_name or 'to another process'}"

    def stop_here(self, world: World) -> None:
        """A point of the setup, before the first step, where stopping leaves no library
        halfway through anything: a stop asked for so far ends the command (Interrupted,
        nothing saved). Every process of `world` calls it at the same point, and all stop
        together when any was asked."""
        if any_rank(self.requested, world):
            raise Interrupted(saved=False)


class Interrupted(Exception):
    """Training stopped on a signal; the run can be resumed. `saved`: a state of it is on disk
    (False: stopped before its first step, so a rerun starts it)."""

    def __init__(self, saved: bool = True) -> None:
        super().__init__()
        self.saved = saved
