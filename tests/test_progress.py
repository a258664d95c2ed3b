"""The training log line: its speed and ETA come from the recent steps (rich's estimate), so a
slow first step (loading, compiling) does not inflate the ETA for the rest of the run."""

from __future__ import annotations

import io
import re
import time

from loraforge.train.progress import TrainingProgress


def test_log_line_eta_follows_recent_steps_not_the_warm_up() -> None:
    log = io.StringIO()  # not a terminal: plain lines, no bar
    progress = TrainingProgress(100, 0, every_seconds=0.0, stream=log)
    time.sleep(1.0)  # the first step: warm-up
    progress.update(1, 1, 0.5, 1e-4, images=4)
    for step in range(2, 7):
        time.sleep(0.01)
        progress.update(step, 1, 0.25, 1e-4, images=4)
    progress.close()

    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and "━" not in log.getvalue()
    assert len(lines) == 6 and lines[0].endswith("? img/s eta ?")  # one step: no speed yet
    match = re.fullmatch(r"step 6/100 epoch 1 loss 0\.2500 lr 1\.00e-04 ([\d.]+) img/s "
                         r"eta (\d+):(\d\d):(\d\d)", lines[-1])
    assert match, lines[-1]
    # 94 steps left at ~100 steps/s: about a second (the whole-run average would say ~16 s).
    assert float(match[1]) > 40
    hours, minutes, seconds = (int(g) for g in match.groups()[1:])
    assert hours == 0 and minutes == 0 and 1 <= seconds <= 6
