"""What every DVC stage pays before and besides its work: imports, the MLflow client, the bootstrap.

    python benchmarks/stage_startup.py                 # 3 fresh processes per figure, medians
    python benchmarks/stage_startup.py --repeats 5 --rounds 200

A `dvc repro` of the default runs 17 stage processes, so a second of import
is 17 seconds of pipeline. This prints, each as the median over
``--repeats`` fresh Python processes:

1. ``import stages.<name>`` for every stage module (what the process imports
   before the stage's timer starts), and ``import torch`` /
   ``dtm_core.model`` (diffusers) alone;
2. the MLflow client a stage opens (``import mlflow`` + ``MlflowClient`` on
   an existing SQLite store, as every stage but the first finds it);
3. one bootstrap FD replicate of 12000 x 64 features against 1438
   reference rows (the default's shape until 7c9e79a, 22000 samples since;
   the committed figures are of 12000): the one-at-a-time loop against
   ``distances.bootstrap_replicates`` on its threads, and whether the two are
   bit for bit equal.

Writes docs/results/stage_startup.json (``--out``). Timings on this shared
virtual machine drift within a day: compare figures of one run only.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import ROOT

from dtm_core import distances
from dtm_core.io import write_json
from stages.common import STAGES


def _seconds(code: str, repeats: int) -> float:
    """Median wall seconds of ``python -c code`` in a fresh process (the interpreter's own start included)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _mlflow_code(uri: str) -> str:
    return ("import mlflow\nfrom mlflow.tracking import MlflowClient\n"
            f"MlflowClient(tracking_uri={uri!r}).search_experiments()")


def _bootstrap(rounds: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    feats, ref = rng.normal(size=(12000, 64)), rng.normal(0.1, 1.0, size=(1438, 64))
    fd = distances.frechet_distance

    def plain() -> np.ndarray:
        draws = np.random.default_rng(1)
        return np.array([fd(feats[draws.integers(0, len(feats), len(feats))], ref) for _ in range(rounds)])

    timings: dict[str, list[float]] = {"one_at_a_time": [], "threaded": []}
    for _ in range(repeats):
        start = time.perf_counter()
        a = plain()
        timings["one_at_a_time"].append((time.perf_counter() - start) / rounds)
        start = time.perf_counter()
        b = distances.bootstrap_replicates(feats, ref, fd, rounds, seed=1)
        timings["threaded"].append((time.perf_counter() - start) / rounds)
    ms = {k: 1000 * statistics.median(v) for k, v in timings.items()}
    return {"ms_per_replicate": ms, "workers": distances.bootstrap_workers(), "bit_equal": bool(np.array_equal(a, b)),
            "rounds": rounds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=100, help="bootstrap replicates per timing")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "stage_startup.json")
    args = ap.parse_args()

    imports = {"python": _seconds("pass", args.repeats), "torch": _seconds("import torch", args.repeats),
               "dtm_core.model (torch + diffusers)": _seconds("import dtm_core.model", args.repeats)}
    modules = sorted({name.split("@")[0] for name in STAGES})
    stages = {m: _seconds(f"import stages.{m}", args.repeats) for m in modules}
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        subprocess.run([sys.executable, "-c", _mlflow_code(uri)], cwd=ROOT, check=True,
                       capture_output=True)  # creates and migrates the store, untimed
        mlflow_s = _seconds(_mlflow_code(uri), args.repeats) - imports["python"]
    boot = _bootstrap(args.rounds, args.repeats)

    print(f"fresh-process medians over {args.repeats} runs (interpreter start {imports['python']:.2f} s included)")
    for name, s in {**imports, **{f"stages.{m}": s for m, s in stages.items()}}.items():
        print(f"  import {name:<40} {s:6.2f} s")
    print(f"  MLflow client on an existing SQLite store   {mlflow_s:6.2f} s (interpreter start excluded)")
    ms = boot["ms_per_replicate"]
    print(f"bootstrap FD replicate, 12000 x 64: one at a time {ms['one_at_a_time']:.1f} ms, "
          f"{boot['workers']} threads {ms['threaded']:.1f} ms; bit for bit equal: {boot['bit_equal']}")
    write_json(args.out, {"repeats": args.repeats, "import_seconds": imports,
                          "stage_import_seconds": stages, "mlflow_client_seconds": mlflow_s, "bootstrap": boot})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
