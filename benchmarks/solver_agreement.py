"""Does a faster sampler give the same comparison? FD and paired contrasts per sampler and step count.

    python benchmarks/solver_agreement.py                       # on the workspace's models (after dvc repro)
    python benchmarks/solver_agreement.py --samples 4000 --configs ddim:50 ddim:100 dpmsolver:20

Run after ``dvc repro``: it reads the four evaluated models (pretrained,
shared, merged and the ensemble of range models) and the feature classifier.
Every model is sampled on the SAME ``--samples`` initial noises (a seed of its
own: neither the test nor the validation noise) by each sampler configuration
``name:steps`` (names as ``evaluate.sampler``). Per configuration it prints
every model's FD, the report's paired contrasts (merged - shared, ensemble -
shared, merged - pretrained, with dtm_core.distances.fd_contrast's interval), the
models' order, images/s, and how far its samples lie from those of the
reference configuration (``--reference``, the most exact one: RMS pixel
distance on [-1, 1] images, same noise). A cheaper sampler can replace the
default where its contrasts agree with the exact sampler's within their
intervals and the order does not change. Writes docs/results/solver_agreement.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dtm_core import distances, features  # noqa: E402
from dtm_core.distances import fd_contrast  # noqa: E402
from dtm_core.io import write_json  # noqa: E402
from dtm_core.sampling import initial_noise, sample  # noqa: E402
from dtm_core.seeding import derive_seed  # noqa: E402
from stages.common import CLASSIFIER_DIR, load_reference  # noqa: E402
from stages.evaluate import load_eval_models  # noqa: E402

MODELS = ("pretrained", "shared", "merged", "ensemble")
CONTRASTS = (("merged", "shared"), ("ensemble", "shared"), ("merged", "pretrained"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--configs", nargs="+",
                    default=["dpmsolver:50", "ddim:100", "ddim:50", "dpmsolver:25", "dpmsolver:20", "dpmsolver:15",
                             "dpmsolver:10"])
    ap.add_argument("--reference", default=None, help="the most exact configuration (default: the first)")
    ap.add_argument("--rounds", type=int, default=1000, help="bootstrap rounds of each contrast's interval")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS,
                    help="a subset (e.g. pretrained alone, to see which sampler lands nearest the exact ODE cheaply)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "solver_agreement.json")
    args = ap.parse_args()
    reference_config = args.reference or args.configs[0]
    if reference_config not in args.configs:
        ap.error(f"--reference {reference_config} is not one of --configs")
    models = args.models
    nets = {m: load_eval_models(m) for m in models}
    clf = features.load_classifier(CLASSIFIER_DIR / "classifier")
    ref = load_reference()["train"]
    cfg = nets[models[0]][0][0].config
    noise = initial_noise(derive_seed(0, "solver-agreement"), args.samples,
                          (cfg.in_channels, cfg.sample_size, cfg.sample_size))
    rows, exact = [], {}
    for config in [reference_config] + [c for c in args.configs if c != reference_config]:
        sampler, steps = config.split(":")
        steps = int(steps)
        row: dict = {"config": config, "sampler": sampler, "steps": steps, "fd": {}, "rms_to_reference": {}}
        data, seconds = {}, 0.0
        for m in models:
            unets, ranges, scheduler = nets[m]
            start = time.perf_counter()
            images = sample(unets, scheduler, noise, steps, ranges=ranges, batch_size=args.batch_size,
                            desc=f"{m} {config}", sampler=sampler)
            seconds += time.perf_counter() - start
            data[m] = {"features": features.extract_features(clf, images)}
            row["fd"][m] = distances.frechet_distance(data[m]["features"], ref)
            if config == reference_config:
                exact[m] = images
            row["rms_to_reference"][m] = float(np.sqrt(np.mean((images - exact[m]) ** 2)))
        row["images_per_second"] = len(models) * args.samples / seconds
        row["contrasts"] = {f"{a}_minus_{b}": fd_contrast(data[a], data[b], ref, args.rounds, seed=1)
                            for a, b in CONTRASTS if a in data and b in data}
        row["order"] = sorted(models, key=lambda m: row["fd"][m])
        rows.append(row)
        print(f"{config:>14}: " + "  ".join(f"{m} {row['fd'][m]:.4f}" for m in models)
              + f"  | {row['images_per_second']:.0f} img/s | rms to {reference_config} "
              + " ".join(f"{row['rms_to_reference'][m]:.3f}" for m in models), flush=True)
        for name, c in row["contrasts"].items():
            print(f"{'':>16}{name}: {c['fd']:+.4f} [{c['fd_ci'][0]:+.4f}, {c['fd_ci'][1]:+.4f}] {c['verdict']}",
                  flush=True)
        print(f"{'':>16}order {row['order']}", flush=True)
        write_json(args.out, {"samples": args.samples, "models": models, "reference": reference_config,
                              "bootstrap_rounds": args.rounds, "threads": torch.get_num_threads(), "rows": rows})
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
