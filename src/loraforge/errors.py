"""The one error type users see: a message naming the file and the fix, never a traceback."""

from __future__ import annotations

from pathlib import Path

#: Exit code of a command stopped by a signal with its work so far kept (a training's state
#: saved, generated images written): rerun the same command to go on. Job scripts requeue on it
#: (75: EX_TEMPFAIL).
RESUMABLE_EXIT = 75


class ForgeError(Exception):
    """A problem the user can fix. The CLI prints it as one message and exits with `exit_code`."""

    def __init__(self, message: str, *, path: Path | str | None = None, fix: str | None = None,
                 exit_code: int = 1) -> None:
        self.message = message
        self.path = Path(path) if path is not None else None
        self.fix = fix
        self.exit_code = exit_code
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path is not None else self.message
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text
