"""FD's bootstrap replicates from resample counts against the resampled copies, on a run's own samples.

For each model in ``samples/`` (the workspace's last run: ``make repro`` first) the report's replicates,
``--rounds`` resamples of the model's features against the reference, are computed twice in one process:
as the resampled copies (``FrechetToReference()(feats[idx])`` on :func:`bootstrap_workers` threads, how
the replicates were computed before counts), and by
``dtm_core.distances.bootstrap_replicates`` (``FrechetToReference.of_resamples``: the counts of a pass of
rounds weight the features). Prints each route's seconds, their ratio and the largest relative difference.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from machine import ROOT, cpu_model, publish

from dtm_core.distances import FrechetToReference, bootstrap_replicates, bootstrap_workers, frechet_distance
from stages.common import EVAL_MODELS, SAMPLES_DIR, load_reference, read_npz, reference_split


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=1000, help="resamples per model (report.bootstrap_rounds)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    ref = load_reference()
    reference = ref[reference_split(ref)]
    seconds = {"resampled_copies": 0.0, "counts": 0.0}
    worst = 0.0
    for name in EVAL_MODELS:
        feats = read_npz(ROOT / SAMPLES_DIR / f"{name}.npz")["features"]
        start = time.perf_counter()
        one = FrechetToReference(reference)
        rng = np.random.default_rng(args.seed)
        with ThreadPoolExecutor(bootstrap_workers()) as pool:
            copies = np.array(list(pool.map(lambda idx, one=one, feats=feats: one(feats[idx]), (
                rng.integers(0, len(feats), len(feats)) for _ in range(args.rounds)))))
        seconds["resampled_copies"] += time.perf_counter() - start
        start = time.perf_counter()
        counts = bootstrap_replicates(feats, reference, frechet_distance, args.rounds, args.seed)
        seconds["counts"] += time.perf_counter() - start
        worst = max(worst, float(np.max(np.abs(counts - copies) / np.abs(copies))))
    return publish({
        "cpu": cpu_model(), "models": list(EVAL_MODELS), "samples": len(feats), "feature_dim": feats.shape[1],
        "rounds": args.rounds, "seconds": seconds,
        "ratio_counts_to_copies": seconds["counts"] / seconds["resampled_copies"],
        "max_relative_difference": worst}, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
