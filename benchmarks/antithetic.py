"""Antithetic noise pairs against independent noise: does merged − shared's FD interval narrow at equal cost?

    python benchmarks/antithetic.py --out docs/results/antithetic.json    # after dvc repro (models, classifier)

For each of ``--noise-seeds``, the workspace's merged and shared models sample ``--samples`` images twice, at
the default evaluation's solver and steps: from independent noise, and from antithetic pairs (z_1..z_m and
-z_1..-z_m, m = samples / 2). Each set's merged − shared FD against the reference split has a bootstrap
standard error: rows resampled for independent noise, pairs resampled (both members together) for antithetic
noise, the same rounds. The figure is the ratio of the two standard errors; the samples a half-width needs
scale with its square.

The rule, written before the run: antithetic noise is worth adopting only if the ratio is at most 0.85 in
every noise seed (the same half-width from at most 72% of the samples); then the default's sample count would
be re-measured with it (docs/RESULTS.md "The sample count"). Otherwise it is not adopted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from machine import ROOT, cpu_model

from dtm_core.config import load_params
from dtm_core.distances import FrechetToReference, frechet_distance
from dtm_core.features import feature_extractor, load_classifier
from dtm_core.io import write_json
from dtm_core.model import load_scheduler, load_unet
from dtm_core.sampling import initial_noise, sample
from stages.common import CLASSIFIER_DIR, load_reference, reference_split

RULE = 0.85


def contrast_se(merged: np.ndarray, shared: np.ndarray, reference: np.ndarray, rounds: int, paired: bool,
                seed: int) -> tuple[float, float]:
    """merged − shared FD and its bootstrap standard error (resampling antithetic pairs whole when ``paired``)."""
    fd = FrechetToReference(reference)
    rng = np.random.default_rng(seed)
    n = len(merged)
    counts = np.empty((rounds, n))
    for row in counts:
        if paired:  # a pair's members share one draw: the first half's counts, repeated for the second
            row[:] = np.tile(np.bincount(rng.integers(0, n // 2, n // 2), minlength=n // 2), 2)
        else:
            row[:] = np.bincount(rng.integers(0, n, n), minlength=n)
    boot = fd.of_resamples(merged, counts) - fd.of_resamples(shared, counts)
    return frechet_distance(merged, reference) - frechet_distance(shared, reference), float(np.std(boot, ddof=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--noise-seeds", type=int, nargs="+", default=[11, 12])
    ap.add_argument("--rounds", type=int, default=500)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    ev = load_params(ROOT / "params.yaml").evaluate
    ref = load_reference(ev.features)
    reference = ref[reference_split(ref)]
    extract = feature_extractor(ev.features, load_classifier(CLASSIFIER_DIR / "classifier"))
    models = {name: load_unet(ROOT / "models" / name, what=name) for name in ("merged", "shared")}
    scheduler = load_scheduler(ROOT / "models" / "merged")
    shape = (models["merged"].config.in_channels, models["merged"].config.sample_size,
             models["merged"].config.sample_size)
    rows = []
    for seed in args.noise_seeds:
        independent = initial_noise(seed, args.samples, shape)
        half = initial_noise(seed + 1000, args.samples // 2, shape)
        row = {"noise_seed": seed}
        for kind, noise in (("independent", independent), ("antithetic", torch.cat([half, -half]))):
            feats = {name: extract(sample([m], scheduler, noise, ev.sampling_steps, sampler=ev.sampler,
                                          batch_size=ev.batch_size, desc=f"{kind} {name}"))
                     for name, m in models.items()}
            delta, se = contrast_se(feats["merged"], feats["shared"], reference, args.rounds,
                                    kind == "antithetic", seed)
            row[kind] = {"merged_minus_shared_fd": delta, "bootstrap_se": se}
        row["se_ratio"] = row["antithetic"]["bootstrap_se"] / row["independent"]["bootstrap_se"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    adopt = all(r["se_ratio"] <= RULE for r in rows)
    result = {
        "cpu": cpu_model(), "samples": args.samples, "rounds": args.rounds, "sampler": ev.sampler,
        "steps": ev.sampling_steps, "rule": f"adopt only if every se_ratio <= {RULE}", "rows": rows,
        "verdict": "adopt: re-measure the sample count with antithetic pairs" if adopt else "not adopted",
        "command": " ".join(["python benchmarks/antithetic.py", *sys.argv[1:]]),
    }
    print(result["verdict"])
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
