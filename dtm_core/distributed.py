"""Processes and threads: multi-process training under a launcher, and each worker's thread share.

Two environment variables, read by every stage (so they reach ``dvc repro``, ``dvc exp run`` and
``dvc queue start -j N`` workers unchanged):

- ``DTM_NUM_PROCESSES=<P>``: a training stage re-launches itself as P local processes with
  ``torchrun --standalone`` (one per GPU over NCCL, or P CPU processes over gloo; ``accelerate launch
  --cpu`` would start one process only). Every process draws the same global batch from the same seeded
  streams and trains on its 1/P slice; DDP averages the gradients, so the result is the one-process run's
  up to floating-point rounding. Only the main process saves and logs; the others stop with
  :class:`WorkerDone`. Launching by hand (``torchrun --nproc_per_node 2 -m stages.finetune --range 0``,
  or ``accelerate launch --multi_gpu ...``, multi-node included) works the same way.
- ``DTM_THREADS=<k>``: torch's intra-op threads for this process. Set it to cores / workers when several
  stages run at once: two torch processes with a full share each on two cores run 10-20 times slower
  than one. Without it, a process of a P-process CPU launch takes cores / P.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence, TypeVar

import torch

from .errors import ConfigError

PROCESSES_ENV = "DTM_NUM_PROCESSES"
THREADS_ENV = "DTM_THREADS"
T = TypeVar("T")
R = TypeVar("R")
LAUNCHED_ENV = "DTM_LAUNCHED"  # set in the processes a stage launched, which never launch again


class WorkerDone(Exception):
    """Raised in a non-main process of a multi-process launch once training has finished: the main one saves."""


def _env_int(name: str) -> Optional[int]:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"environment variable {name}={raw!r} must be a positive integer")
    return value


def rank() -> int:
    """This process's rank in a launch (0 outside one)."""
    return int(os.environ.get("RANK", "0"))


def launched() -> bool:
    """True inside a process started by a launcher (torchrun, accelerate launch) or by a stage's re-launch."""
    return LAUNCHED_ENV in os.environ or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)


def is_main() -> bool:
    return rank() == 0


def requested_processes() -> int:
    """``DTM_NUM_PROCESSES`` (1 when unset)."""
    return _env_int(PROCESSES_ENV) or 1


def thread_share() -> Optional[int]:
    """The intra-op threads this process should use, or None to leave torch's default."""
    explicit = _env_int(THREADS_ENV)
    if explicit:
        return explicit
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if launched() and local > 1 and not torch.cuda.is_available():
        return max(1, (os.cpu_count() or 1) // local)
    return None


def apply_thread_share() -> Optional[int]:
    threads = thread_share()
    if threads:
        torch.set_num_threads(threads)
    return threads


def launch_command(module: str, argv: Sequence[str], processes: int) -> list[str]:
    """``torchrun`` of ``python -m <module> <argv>`` on ``processes`` local processes (a free port each time)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", module, *argv]


def launch_env() -> dict[str, str]:
    return {**os.environ, LAUNCHED_ENV: "1"}


def shard(batch_size: int) -> slice:
    """This process's slice of a global batch (rank::world); the batch must divide evenly."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if batch_size % world:
        raise ConfigError(
            f"batch_size {batch_size} does not split evenly over {world} processes ({PROCESSES_ENV}); "
            f"choose a batch_size divisible by {world}"
        )
    return slice(rank(), None, world)


def inference_map(fn: Callable[[T], R], items: Sequence[T], device: torch.device) -> list[R]:
    """``[fn(x) for x in items]`` under ``torch.inference_mode``; on CPU one item per core at a time.

    On CPU every item runs with ONE intra-op thread, in as many Python threads as torch's thread share
    (torch releases the GIL inside its kernels): the small UNet keeps two cores busier as two streams of
    batches than as one batch on two threads (docs/RESULTS.md, "Sampling"), and an item's bits do not
    depend on the thread count. On a GPU the items run in order on the calling thread. ``fn`` must not
    share mutable state between items (each sampling batch has its own scheduler).
    """
    items = list(items)

    def run(x: T) -> R:
        with torch.inference_mode():
            return fn(x)

    if device.type != "cpu":
        return [run(x) for x in items]
    share = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if share <= 1 or len(items) <= 1:
            return [run(x) for x in items]
        with ThreadPoolExecutor(min(share, len(items)), initializer=torch.set_num_threads, initargs=(1,)) as pool:
            return list(pool.map(run, items))
    finally:
        torch.set_num_threads(share)
