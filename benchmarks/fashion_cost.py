"""What one Fashion-MNIST seed costs on this machine, projected from measured throughputs.

A seed of configs/fashion.yaml (eight models, controls, analyses) runs for
hours on 2 CPU cores, so before running one this measures, with the shipped
base/fashion-unet, what every stage spends its time on and multiplies by the
counts the configuration asks for:

- sampling: samples per second (evaluate's sampler, steps and batch);
- held-out loss: image-timesteps per second;
- training: seconds per DeMe step (projection, consistency loss) and per
  plain step, at finetune.batch_size.

Counts: 8 evaluated models x evaluate.num_samples samples; the two scaled
controls' validation searches (controls.scales x controls.num_samples each);
held-out loss for the evaluated models (the ensemble's 4 range models each
score every timestep) and for analysis.lambdas x (N + 1) sources; fine-tune
steps of the ranges, the shared model, the soup and shared_consistency.
Not counted: data preparation, the classifier, the gradient-conflict
analysis, stage start-up (minutes, not hours). The projection is a
projection: compare it with a measured seed once one has run.

    python benchmarks/fashion_cost.py [--digits-repro-seconds S] [--out docs/results/fashion_cost.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import ROOT, cpu_model, deme_train, timing_recipe

from dtm_core.config import load_params
from dtm_core.denoising import heldout_losses
from dtm_core.io import write_json
from dtm_core.model import load_scheduler, load_unet, with_projection
from dtm_core.sampling import initial_noise, sample
from dtm_core.train import train

BASE = ROOT / "base" / "fashion-unet"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=2000,
                    help="samples timed: several batches, so every core's worker is busy as in a real evaluation")
    ap.add_argument("--steps", type=int, default=10, help="training steps timed per kind")
    ap.add_argument("--digits-repro-seconds", type=float, help="the digits default's make repro here, for the ratio")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    p = load_params(ROOT / "params.yaml", ROOT / "configs" / "fashion.yaml")
    ev, ft, n = p.evaluate, timing_recipe(p), p.num_ranges
    base, scheduler = load_unet(BASE, what="base"), load_scheduler(BASE)
    size = p.data.image_size

    noise = initial_noise(0, args.samples, (1, size, size))
    sample([base], scheduler, noise[:50], ev.sampling_steps, sampler=ev.sampler, batch_size=ev.batch_size)
    start = time.perf_counter()
    sample([base], scheduler, noise, ev.sampling_steps, sampler=ev.sampler, batch_size=ev.batch_size)
    samples_per_s = args.samples / (time.perf_counter() - start)

    images = np.random.default_rng(0).uniform(-1, 1, (100, 1, size, size)).astype(np.float32)
    start = time.perf_counter()
    heldout_losses(ev, [base], None, scheduler, images)
    pairs_per_s = len(images) * ev.heldout_timesteps / (time.perf_counter() - start)

    batch = torch.rand(2048, 1, size, size) * 2 - 1
    T = p.model.num_train_timesteps

    def seconds_per_step(deme: bool) -> float:
        def run(steps: int):
            if deme:
                return deme_train(with_projection(base, True), base, scheduler, batch, ft, steps, 0, T // n,
                                  ft.consistency_weight)
            return train(with_projection(base, False), scheduler, batch, ft, seed=0, steps=steps)

        run(2)  # warm-up
        return run(args.steps).seconds / args.steps

    deme_step, plain_step = seconds_per_step(True), seconds_per_step(False)

    controls = set(p.controls.models)
    evaluated = 4 + len(controls)
    searches = len(controls & {"shared_scaled", "merged_scaled"}) * len(p.controls.scales) * p.controls.num_samples
    lambdas = p.analysis.lambdas
    along_tau = (len(lambdas) - (0.0 in lambdas)) * (n + 1) + (0.0 in lambdas)  # lambda 0 (the base) scored once
    heldout_models = 3 + n + len(controls)  # the ensemble: each of its n range models at every t
    along_tau *= (p.analysis.heldout_images or ev.heldout_images) / ev.heldout_images  # in evaluate's scorings
    shared_steps = ft.shared_total_steps(n)
    parts = {
        "sampling_evaluations": evaluated * ev.num_samples / samples_per_s,
        "sampling_control_searches": searches / samples_per_s,
        "heldout_loss": (heldout_models + along_tau) * ev.heldout_images * ev.heldout_timesteps / pairs_per_s,
        "training": (n * ft.steps + (n * ft.steps if "soup" in controls else 0)) * deme_step
                    + shared_steps * plain_step
                    + (shared_steps * deme_step if "shared_consistency" in controls else 0),
    }
    total = sum(parts.values())
    result = {
        "cpu": cpu_model(), "threads": torch.get_num_threads(), "base": "base/fashion-unet (shipped)",
        "measured": {"samples_per_second": samples_per_s, "heldout_image_timesteps_per_second": pairs_per_s,
                     "deme_step_seconds": deme_step, "plain_step_seconds": plain_step,
                     "sampler": ev.sampler, "sampling_steps": ev.sampling_steps, "batch_size": ev.batch_size},
        "counts": {"evaluated_models": evaluated, "samples_per_model": ev.num_samples,
                   "control_search_samples": searches, "heldout_models": heldout_models,
                   "loss_along_tau_scorings": along_tau},
        "projected_seconds": {**parts, "total": total},
        "command": "python benchmarks/fashion_cost.py",
    }
    if args.digits_repro_seconds:
        result["digits_repro_seconds"] = args.digits_repro_seconds
        result["ratio_to_digits_repro"] = total / args.digits_repro_seconds
    for k, v in parts.items():
        print(f"{k:28s} {v / 60:7.1f} min")
    print(f"{'total (projected)':28s} {total / 60:7.1f} min"
          + (f"  = {result['ratio_to_digits_repro']:.1f}x the digits make repro (target <= 4x)"
             if args.digits_repro_seconds else ""))
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
