"""The taught tiny base and the runs on it that the slow separation and casting tests measure,
made in the background while the rest of the suite runs.

`python tests/taught_work.py STORE WORK [--run] [--oracle]` builds the taught tiny base under
STORE. `--run` then trains `ours` in the project folder WORK on bench/separation.py's flat red
`blake` and flat blue `mira` (200 steps, `init --tiny`'s settings) and measures it on
WORK/held_out. `--oracle` does the same for the independent diffusers + peft loop. The
measurements are pickled into WORK/separation.pickle as {"ours": ..., "oracle": ...}.

conftest.py starts it once per test run (for all of pytest-xdist's workers), at nice 19 on one
torch thread: it takes the cores' idle time (one pytest process leaves about half of a 2-core
machine idle: its in-process renders hold one thread, and subprocesses import and wait). The
tests that need it run last.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

RESULTS = "separation.pickle"
STATUS = "taught_work.status"  # "0" when it ended well, "1" when it failed; written last
STEPS = 200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("--run", action="store_true", help="train and measure `ours`")
    parser.add_argument("--oracle", action="store_true", help="and the independent loop")
    args = parser.parse_args()
    status = "1"
    try:
        make(args)
        status = "0"
    finally:
        (args.work / STATUS).write_text(status)


def make(args: argparse.Namespace) -> None:
    """The taught base, then the runs asked for; their measurements pickled into WORK."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/

    import torch

    from bench.separation import HELD_OUT, oracle, ours, write_dataset
    from loraforge.models.taught import ensure_taught_model

    torch.set_num_threads(1)
    base = ensure_taught_model(args.store)[0]
    results = {}
    if args.run or args.oracle:
        write_dataset(args.work / "master_dataset", solid=True)
        write_dataset(args.work / "held_out", solid=True, numbers=HELD_OUT)
        results["ours"] = ours(args.work, base, STEPS, [], args.work / "held_out")
    if args.oracle:
        results["oracle"] = oracle(args.work, base, STEPS, args.work / "held_out")
    (args.work / RESULTS).write_bytes(pickle.dumps(results))


if __name__ == "__main__":
    main()
