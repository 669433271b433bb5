"""Run the N range fine-tunes concurrently, record them in dvc.lock, then the rest of the pipeline.

    python -m tools.parallel_ranges -j 2                 # CPU: 2 at a time, cores/2 threads each
    python -m tools.parallel_ranges -j 4 --gpus 0,1,2,3  # one fine-tune per GPU

``dvc repro`` holds a repository lock, so two ``dvc repro --single-item
finetune@i`` cannot run at once in one workspace. This tool brings the
fine-tunes' inputs up to date (``dvc repro partition``), runs each
``finetune@i`` command as its own process, at most ``-j`` at a time with
``DTM_THREADS`` = cores / j (and ``CUDA_VISIBLE_DEVICES`` from ``--gpus``,
round robin), ``dvc commit``s their outs so DVC treats them as run, then
runs ``dvc repro`` for the rest (not with ``--no-rest``). Each fine-tune is a
pure function of its params and seed, so the outs equal a sequential run's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from dtm_core.distributed import THREADS_ENV
from tools.exps import DVC

log = logging.getLogger("parallel_ranges")
PARTITION_FILE = Path("partition/ranges.json")


def _dvc(*args: str) -> None:
    log.info("dvc %s", " ".join(args))
    subprocess.run([*DVC, *args], check=True)


def run_ranges(indices: list[int], jobs: int, gpus: list[str], threads: int) -> dict[int, float]:
    """Run ``finetune --range i`` for each index, ``jobs`` at a time (the k-th started gets GPU k mod len(gpus));
    seconds per range. Raises on a failure."""
    def run(slot: int, i: int) -> tuple[float, int]:
        env = {**os.environ, THREADS_ENV: str(threads)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
        cmd = [sys.executable, "-m", "stages.finetune", "--range", str(i)]
        log.info("finetune@%d: %s (%s=%d%s)", i, " ".join(cmd[1:]), THREADS_ENV, threads,
                 f", CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}" if gpus else "")
        start = time.perf_counter()
        returncode = subprocess.run(cmd, env=env).returncode
        return time.perf_counter() - start, returncode

    with ThreadPoolExecutor(jobs) as pool:
        done = dict(zip(indices, pool.map(run, range(len(indices)), indices)))
    failed = [(i, rc) for i, (_, rc) in done.items() if rc]
    if failed:
        raise SystemExit(f"parallel_ranges: fine-tunes failed (range, exit status): {failed}")
    return {i: seconds for i, (seconds, _) in done.items()}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.parallel_ranges", description=__doc__.split("\n\n")[0])
    ap.add_argument("-j", "--jobs", type=int, default=2, help="fine-tunes at once (default 2)")
    ap.add_argument("--gpus", default="", help="comma-separated GPU ids, assigned round robin")
    ap.add_argument("--threads", type=int, default=0, help=f"{THREADS_ENV} per fine-tune (default cores / jobs)")
    ap.add_argument("--no-rest", action="store_true", help="stop after recording the fine-tunes")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s parallel_ranges %(message)s", stream=sys.stderr)
    if args.jobs < 1:
        ap.error("-j must be at least 1")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    _dvc("repro", "partition")
    n = len(json.loads(PARTITION_FILE.read_text())["ranges"])
    gpus = [g for g in args.gpus.split(",") if g.strip()]
    start = time.perf_counter()
    seconds = run_ranges(list(range(n)), args.jobs, gpus, threads)
    wall = time.perf_counter() - start
    _dvc("commit", "--force", *[f"finetune@{i}" for i in range(n)])
    print(json.dumps({"ranges": n, "jobs": args.jobs, "threads_each": threads, "wall_seconds": round(wall, 1),
                      "seconds_per_range": {str(i): round(s, 1) for i, s in sorted(seconds.items())}}))
    if not args.no_rest:
        _dvc("repro")
    return 0


if __name__ == "__main__":
    sys.exit(main())
