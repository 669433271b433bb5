"""Training throughput of 1 and 2 concurrent workers on this machine, with and without thread shares.

    python benchmarks/parallel_workers.py [--steps 150]

Runs benchmarks/device_speed.py --train-only (the default DeMe fine-tune step)
as one worker with every core, as two concurrent workers with DTM_THREADS =
cores / 2 each (what tools/parallel_ranges.py and `dvc queue start -j 2` via
tools/exps.py set), and as two concurrent workers left at torch's default
(each takes every core: oversubscribed). Prints steps/s per worker and in
total for each setting, and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEED = re.compile(r"DeMe training ([\d.]+) steps/s")


def workers(n: int, steps: int, threads: int | None, timeout: float) -> list[float]:
    """steps/s of each of ``n`` concurrent workers; zeros when they did not finish within ``timeout`` s."""
    env = {k: v for k, v in os.environ.items() if k != "DTM_THREADS"}
    if threads:
        env["DTM_THREADS"] = str(threads)
    cmd = [sys.executable, str(ROOT / "benchmarks/device_speed.py"), "--train-only", "--steps", str(steps)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    rates = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # far slower than the others: record that it did not finish
            for q in procs:
                q.kill()
            return [0.0] * n
        if p.returncode:
            raise SystemExit(f"device_speed.py failed ({p.returncode})")
        rates.append(float(SPEED.search(out).group(1)))
    return rates


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--timeout", type=float, default=300, help="seconds a setting may take (then 0 steps/s)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    half = max(1, cores // 2)
    settings = {"1 worker, all cores": (1, None), f"2 workers, DTM_THREADS={half}": (2, half),
                "2 workers, default threads (oversubscribed)": (2, None)}
    out = {"cores": cores, "steps": args.steps, "settings": {}}
    for name, (n, threads) in settings.items():
        rates = workers(n, args.steps, threads, args.timeout)
        out["settings"][name] = {"per_worker_steps_per_s": rates, "total_steps_per_s": round(sum(rates), 2)}
        print(f"{name}: per worker {', '.join(f'{r:.2f}' for r in rates)} steps/s, total {sum(rates):.2f} steps/s",
              flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
