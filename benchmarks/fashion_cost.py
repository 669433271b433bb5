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

``--measured RUN`` instead splits a seed that ran (``make fashion``: the MLflow
parent run ``seeds-0-fashion``) into the same parts, from its stage runs' logged
seconds. The controls stage logs each control's sampling and held-out seconds
with a timestamp: its four evaluations are taken as the span of those
timestamps plus one evaluation, its scale searches at the evaluations'
samples per second, and its training as the rest of the stage.

    python benchmarks/fashion_cost.py [--digits-repro-seconds S] [--out docs/results/fashion_cost.json]
    python benchmarks/fashion_cost.py --measured seeds-0-fashion --wall-seconds S --digits-repro-seconds S \
        --out docs/results/fashion_seed_cost.json
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
from stages.common import EVAL_MODELS

BASE = ROOT / "base" / "fashion-unet"


def search_samples(p) -> int:
    """Validation samples of the scaled controls' searches: controls.scales x controls.num_samples each."""
    return len(set(p.controls.models) & {"shared_scaled", "merged_scaled"}) * len(p.controls.scales) \
        * p.controls.num_samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=2000,
                    help="samples timed: several batches, so every core's worker is busy as in a real evaluation")
    ap.add_argument("--steps", type=int, default=10, help="training steps timed per kind")
    ap.add_argument("--digits-repro-seconds", type=float, help="the digits default's make repro here, for the ratio")
    ap.add_argument("--measured", metavar="RUN", help="split this MLflow parent run's measured seconds instead")
    ap.add_argument("--wall-seconds", type=float, help="--measured: the seed's wall time (make fashion)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    p = load_params(ROOT / "params.yaml", ROOT / "configs" / "fashion.yaml")
    if args.measured:
        if not (args.wall_seconds and args.digits_repro_seconds):
            ap.error("--measured needs --wall-seconds and --digits-repro-seconds")
        return report(measured(p, args.measured, args.wall_seconds), args)
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
    searches = search_samples(p)
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
    return report(result, args)


def measured(p, run_name: str, wall_seconds: float) -> dict:
    """A seed's wall time split into parts from its MLflow stage runs (see the module docstring)."""
    from mlflow import MlflowClient

    from dtm_core.tracking import tracking_uri

    client = MlflowClient(tracking_uri(p))
    experiment = client.get_experiment_by_name(p.tracking.experiment_name)
    found = client.search_runs(experiment.experiment_id, f"attributes.run_name = '{run_name}'",
                               order_by=["attributes.start_time DESC"], max_results=1) if experiment else []
    if not found:
        raise SystemExit(f"--measured {run_name}: no MLflow run of that name in experiment "
                         f"{p.tracking.experiment_name!r} at {tracking_uri(p)}; run `make fashion` first "
                         "(its parent run is seeds-0-fashion)")
    parent = found[0]
    runs = client.search_runs(parent.info.experiment_id, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    stages = {r.info.run_name: r for r in runs}
    sec = {name: {k: v for k, v in r.data.metrics.items() if k.endswith("_seconds")} for name, r in stages.items()}
    controls = stages["controls"].info.run_id
    sampled = client.get_metric_history(controls, "sample_seconds")
    ends = sorted(m.timestamp / 1000 for m in sampled)
    ev = p.evaluate
    evals = [f"evaluate@{m}" for m in EVAL_MODELS]
    searches = search_samples(p) * sum(m.value for m in sampled) / (len(sampled) * ev.num_samples)
    control_evals = ends[-1] - ends[0] + (ends[1] - ends[0])  # the first as long as the second
    parts = {
        "training: range fine-tunes": sum(sec[f"finetune@{i}"]["stage_seconds"] for i in range(p.num_ranges)),
        "training: shared fine-tune": sec["finetune_shared"]["stage_seconds"],
        "training: controls shared_consistency and soup (derived)":
            sec["controls"]["stage_seconds"] - control_evals - searches,
        "sampling: evaluate@*": sum(sec[s]["sample_seconds"] for s in evals),
        "sampling: controls": sum(m.value for m in sampled),
        "sampling: scale searches (derived)": searches,
        "heldout_loss": sum(sec[s]["heldout_loss_seconds"] for s in evals)
                        + sum(m.value for m in client.get_metric_history(controls, "heldout_loss_seconds")),
        "analysis stage": sec["analysis"]["stage_seconds"],
    }
    parts["the rest: data, classifier, merge, report, features, saving, DVC between stages"] = (
        wall_seconds - sum(parts.values()))
    return {"cpu": cpu_model(), "mlflow_parent_run": parent.info.run_id, "run_name": run_name,
            "commit": parent.data.tags.get("mlflow.source.git.commit"),
            "measured_seconds": {**parts, "total": wall_seconds},
            "stages": {name: sec[name] for name in sorted(sec)},
            "command": f"python benchmarks/fashion_cost.py --measured {run_name} --wall-seconds {wall_seconds:g}"}


def report(result: dict, args) -> int:
    parts = result.get("projected_seconds") or result["measured_seconds"]
    total = parts["total"]
    if args.digits_repro_seconds:
        result["command"] += f" --digits-repro-seconds {args.digits_repro_seconds:g}"
        result["digits_repro_seconds"] = args.digits_repro_seconds
        result["ratio_to_digits_repro"] = total / args.digits_repro_seconds
    for k, v in parts.items():
        print(f"{k:28s} {v / 60:7.1f} min")
    if args.digits_repro_seconds:
        print(f"= {result['ratio_to_digits_repro']:.1f}x the digits make repro (target <= 4x)")
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
