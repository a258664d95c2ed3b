"""Data-parallel training: one process per GPU (or per CPU share, for tests), torch.distributed.

Who launches the processes:
- a SLURM job: `srun` starts one task per GPU on every node; the job script exports MASTER_ADDR
  (the allocation's first host) and MASTER_PORT (a free port there), and each task takes its
  rank from SLURM (`SLURM_PROCID`, `SLURM_LOCALID`, `SLURM_STEP_NUM_TASKS`). srun passes USR1
  and TERM to every task and reports their exit codes, which the requeue logic relies on.
- `torchrun --nproc-per-node N -m loraforge train ...`: RANK, WORLD_SIZE, LOCAL_RANK, as usual.
- `loraforge train` with `train.gpus = N` and neither of the above: `launch_local` starts N
  workers on this machine with the same variables torchrun would set.

The processes form one group (NCCL on GPUs, gloo on CPU). The arithmetic is exact data
parallelism: every rank trains on its slice of each global batch (`shard`), scales its loss by its
share of the batch, and one all-reduce per optimizer step sums the gradients (plus the loss and
the stop flag); every rank then takes the same optimizer step. The sum of the slices is the
single-process gradient of the global batch, whatever the slice sizes (a bucket's last batch may
leave a rank with nothing). LoRA gradients are a few MB, so one flat all-reduce per step is cheap,
and unlike DistributedDataParallel it needs no dummy forward for an empty slice.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from loraforge.errors import RESUMABLE_EXIT, ForgeError

if TYPE_CHECKING:
    import torch

#: The group `gather_objects` and `from_main` use (None: the default group).
_objects_group: Any = None
#: Longest wait in a collective: rank 0 alone renders previews and writes files meanwhile.
COLLECTIVE_TIMEOUT = timedelta(minutes=60)
#: Signals a local launch passes on to its workers.
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
#: Rank 0's exit code after a signal, state saved.
RESUMABLE = RESUMABLE_EXIT
#: After one worker fails, the others get this long to notice before they are killed.
FAILURE_GRACE_SECONDS = 10.0


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _int(env: dict[str, str] | os._Environ[str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ForgeError(f"environment variable {name}={env[name]!r} is not a number",
                         fix="unset it, or launch with torchrun / srun, which set it") from None


def world_from_env(env: dict[str, str] | os._Environ[str] = os.environ) -> World:
    """The world torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or srun (SLURM_PROCID, SLURM_LOCALID,
    SLURM_STEP_NUM_TASKS) describes; a single process otherwise."""
    if "WORLD_SIZE" in env and "RANK" in env:
        world = World(_int(env, "RANK"), _int(env, "WORLD_SIZE"),
                      _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0)
    elif "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        world = World(_int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS"),
                      _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0)
    else:
        return World()
    if world.size > 1 and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        raise ForgeError(f"{world.size} training processes were started but MASTER_ADDR and "
                         "MASTER_PORT, where they meet, are not set",
                         fix="submit the job script `loraforge init` or `loraforge slurm train` "
                             "writes (it sets both), or launch with torchrun")
    if not 0 <= world.rank < world.size:
        raise ForgeError(f"rank {world.rank} is outside a world of {world.size} processes",
                         fix="launch with torchrun or srun, which set consistent values")
    return world


def join(world: World, device: torch.device) -> None:
    """Meet the other processes (a no-op for a single process)."""
    if not world.distributed:
        return
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    global _objects_group
    try:
        dist.init_process_group(backend, init_method="env://", rank=world.rank,
                                world_size=world.size, timeout=COLLECTIVE_TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
        # Python objects (the latent cache, a path) travel over gloo: through NCCL they would
        # be staged in GPU memory, padded to the largest, once per process.
        _objects_group = (dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
                          if backend == "nccl" else None)
    except (RuntimeError, ValueError) as exc:  # DistNetworkError, DistStoreError, a bad port
        if dist.is_initialized():
            dist.destroy_process_group()
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise ForgeError(f"process {world.rank} of {world.size} could not meet the others at "
                         f"{where}: {exc}",
                         fix="check that MASTER_ADDR is a host of this job and MASTER_PORT is "
                             "free there; resubmit the job") from None


def leave(world: World, clean: bool) -> None:
    """Leave the group. After a clean end every rank first waits for the others (rank 0 may
    still be writing files); without the barrier and `destroy_process_group` runs on CPU
    aborted at exit about one time in ten."""
    if not world.distributed:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()
    global _objects_group
    _objects_group = None


def device_for(world: World, gpus_wanted: int) -> torch.device:
    """This rank's device: GPU `local_rank` when CUDA is there, the CPU otherwise."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    index = world.local_rank
    bound = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    started_by_srun = "SLURM_PROCID" in os.environ and "RANK" not in os.environ
    if started_by_srun and count == 1 and bound and "," not in bound:  # one GPU per task
        index = 0
    if index >= count:
        raise ForgeError(f"process {world.rank} wants GPU {world.local_rank} but this node has "
                         f"{count}", fix=f"ask for at most {count} processes per node "
                         f"(train.gpus = {gpus_wanted}, or slurm.gpus_per_node)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def check_local_gpus(processes: int) -> None:
    """Before starting `processes` workers on this machine: enough GPUs, when it has any."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if 0 < count < processes:
        raise ForgeError(f"train.gpus = {processes} but this machine has {count} GPU"
                         f"{'s' if count > 1 else ''}",
                         fix=f"set train.gpus to at most {count}, or ask SLURM for more GPUs")


def shard(batch: Sequence[int], world: World) -> tuple[int, list[int]]:
    """This rank's contiguous slice of a global batch and where it starts; slice sizes differ
    by at most one, and a rank gets nothing when the batch is smaller than the world."""
    base, extra = divmod(len(batch), world.size)
    start = world.rank * base + min(world.rank, extra)
    stop = start + base + (1 if world.rank < extra else 0)
    return start, list(batch[start:stop])


def sum_gradients(params: Sequence[torch.Tensor], extras: Sequence[float | torch.Tensor],
                  world: World) -> torch.Tensor:
    """Sum every parameter's gradient over the ranks, in place (a missing gradient counts as
    zero), in one all-reduce that also sums `extras` (numbers); returns the summed extras, a
    float32 vector on the parameters' device."""
    import torch

    device = params[0].device
    values = torch.stack([torch.as_tensor(x, dtype=torch.float32, device=device).reshape(())
                          for x in extras]) if extras else torch.zeros(0, device=device)
    if not world.distributed:
        return values
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([*(p.grad.reshape(-1).float() for p in params), values])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        count = p.numel()
        p.grad.copy_(flat[offset:offset + count].view_as(p.grad))
        offset += count
    return flat[offset:]


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank when it is true on one (e.g. a signal only some ranks received)."""
    if not world.distributed:
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(value)
    return value.item() > 0


def _collective_device() -> torch.device:
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def replica_spread(params: Sequence[torch.Tensor], world: World) -> float:
    """How far the ranks' copies of the weights are apart (0.0 when identical): the largest
    difference of any tensor's norm from rank 0's. Every rank must call it."""
    if not world.distributed:
        return 0.0
    import torch
    import torch.distributed as dist

    norms = torch.stack(torch._foreach_norm([p.detach().float() for p in params]))
    gathered = [torch.empty_like(norms) for _ in range(world.size)]
    dist.all_gather(gathered, norms)
    return max((g - gathered[0]).abs().max().item() for g in gathered)


def gather_objects(value: Any, world: World) -> list[Any]:
    """Every rank's `value`, in rank order (picklable, CPU tensors)."""
    if not world.distributed:
        return [value]
    import torch.distributed as dist

    found: list[Any] = [None] * world.size
    dist.all_gather_object(found, value, group=_objects_group)
    return found


def from_main(value: Any, world: World) -> Any:
    """Rank 0's `value` on every rank: what rank 0 decided (which state to resume, a hash of
    a file on shared storage) is what every process uses."""
    if not world.distributed:
        return value
    import torch.distributed as dist

    holder = [value]
    dist.broadcast_object_list(holder, src=0, group=_objects_group)
    return holder[0]


# --- launching on one machine -----------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch_local(size: int, argv: list[str], threads: int | None = None,
                 grace: float = FAILURE_GRACE_SECONDS) -> int:
    """Run `argv` as `size` workers on this machine (the variables torchrun sets), pass
    TERM/INT/USR1 on to all of them, and return one exit code: the first failure's, else rank
    0's (75 after a signal, state saved). When a worker fails the others get `grace` seconds,
    then are killed: they would wait for it in the next collective."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(size), "LOCAL_WORLD_SIZE": str(size)}
    if threads is not None and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(threads)
    workers = [subprocess.Popen(argv, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
               for rank in range(size)]

    def forward(number: int, _frame: Any) -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(number)

    previous = {number: signal.signal(number, forward) for number in FORWARDED}
    failure: int | None = None
    try:
        failed_at = 0.0
        while any(w.poll() is None for w in workers):
            if failure is None:
                failure = _failure([w.poll() for w in workers])
                failed_at = time.monotonic()
            elif time.monotonic() - failed_at > grace:
                for worker in workers:
                    if worker.poll() is None:
                        worker.kill()
            time.sleep(0.1)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    codes = [w.wait() for w in workers]
    found = failure if failure is not None else _failure(codes)
    code = found if found is not None else codes[0]
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell says


def _failure(codes: list[int | None]) -> int | None:
    """The exit code of a worker that ended badly (anything but 0, or 75: "state saved"), or
    None."""
    return next((c for c in codes if c not in (None, 0, RESUMABLE)), None)


def rerun_argv() -> list[str]:
    """This command again, as a worker process runs it."""
    return [sys.executable, "-m", "loraforge", *sys.argv[1:]]
