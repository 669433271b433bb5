"""Run the N range fine-tunes concurrently, record them in dvc.lock, then the rest of the pipeline.

    python -m tools.parallel_ranges -j 2                 # CPU: 2 at a time, cores/2 threads each
    python -m tools.parallel_ranges -j 4 --gpus 0,1,2,3  # one fine-tune per GPU

DVC holds a repository lock while ``dvc repro`` runs, so two ``dvc repro
--single-item finetune@i`` processes in one workspace cannot run at once.
The fine-tunes are independent, so this tool brings their inputs up to date
(``dvc repro partition``), runs each ``finetune@i`` command (``python -m
stages.finetune --range i``) as its own process, at most ``-j`` at a time,
each with ``DTM_THREADS`` = cores / j (and ``CUDA_VISIBLE_DEVICES`` from
``--gpus``, round robin), then ``dvc commit``s their outs so DVC treats them
as run, and finally runs ``dvc repro`` for the rest (``--no-rest`` skips
that). Each fine-tune is a pure function of its params and seed, so the outs
equal a sequential run's (tests/test_distributed.py and
tests/test_pipeline_e2e.py check it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
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
    """Run ``finetune --range i`` for each index, ``jobs`` at a time; seconds per range. Raises on a failure."""
    pending, running, seconds, failed = list(indices), {}, {}, []
    slot = 0
    while pending or running:
        while pending and len(running) < jobs:
            i = pending.pop(0)
            env = {**os.environ, THREADS_ENV: str(threads)}
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
            slot += 1
            cmd = [sys.executable, "-m", "stages.finetune", "--range", str(i)]
            log.info("finetune@%d: %s (%s=%d%s)", i, " ".join(cmd[1:]), THREADS_ENV, threads,
                     f", CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}" if gpus else "")
            running[i] = (subprocess.Popen(cmd, env=env), time.perf_counter())
        time.sleep(0.5)
        for i, (proc, start) in list(running.items()):
            if proc.poll() is not None:
                del running[i]
                seconds[i] = time.perf_counter() - start
                if proc.returncode:
                    failed.append((i, proc.returncode))
    if failed:
        raise SystemExit(f"parallel_ranges: fine-tunes failed (range, exit status): {failed}")
    return seconds


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
