"""evaluate@<model>: samples from identical noise, FD / KID with bootstrap intervals, class coverage."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import metrics as metrics_mod
from ..config import Params, derive_seed
from ..io import atomic_path
from ..model import load_scheduler, load_unet
from ..partition import load_partition
from ..sampling import initial_noise, sample, save_grid
from .common import CLASSIFIER_DIR, EVAL_MODELS, PARTITION_FILE, SAMPLES_DIR, NullRun, load_reference, range_dir


def _load_eval_models(name: str):
    if name == "ensemble":
        ranges, _ = load_partition(PARTITION_FILE)
        models = [load_unet(range_dir(i), what=f"range model {i}") for i in range(len(ranges))]
        return models, ranges, load_scheduler(range_dir(0))
    if name not in EVAL_MODELS:
        raise ValueError(f"unknown model '{name}' to evaluate; choose one of {EVAL_MODELS}")
    path = Path("models") / name
    return [load_unet(path, what=f"{name} model")], None, load_scheduler(path)


def noise_seed(params: Params, index: int) -> int:
    """Initial-noise seed ``index`` of the evaluation; never depends on the model (common random numbers)."""
    return derive_seed(params.seed, "evaluate" if index == 0 else f"evaluate-{index}")


def evaluate(params: Params, name: str, run: Any = NullRun()) -> dict:
    ev = params.evaluate
    if ev.features == "inception":
        metrics_mod.inception_weights(ev.inception_dir)  # fail before any sampling
    models, ranges, scheduler = _load_eval_models(name)
    classifier_model = metrics_mod.load_classifier(CLASSIFIER_DIR / "classifier")
    ref = load_reference(ev.features)
    extract = metrics_mod.feature_extractor(ev.features, classifier_model, ev.inception_dir)
    cfg = models[0].config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    per_seed, seconds = [], 0.0
    for s in range(ev.noise_seeds):
        noise = initial_noise(noise_seed(params, s), ev.num_samples, shape)
        start = time.perf_counter()
        images = sample(models, scheduler, noise, ev.ddim_steps, ranges=ranges, eta=ev.eta, batch_size=ev.batch_size,
                        seed=derive_seed(params.seed, f"evaluate-eta-{s}"), desc=f"sample {name} (noise {s})")
        seconds += time.perf_counter() - start
        feats = extract(images)
        per_seed.append(metrics_mod.distances(feats, ref["train"], ev.kid_subsets, ev.kid_subset_size,
                                              ev.bootstrap_rounds, derive_seed(params.seed, "kid")))
        if s == 0:
            first_images, first_feats = images, feats
    grid = SAMPLES_DIR / f"{name}.png"
    save_grid(first_images, grid, nrow=ev.grid_size)
    with atomic_path(SAMPLES_DIR / f"{name}.npz") as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, features=first_feats)
    run.log_artifact(grid, "samples")
    probs = torch.softmax(torch.as_tensor(metrics_mod.predict(classifier_model, first_images)), dim=1).numpy()
    fds, kids = [r["fd"] for r in per_seed], [r["kid"] for r in per_seed]
    n_floor = len(ref["heldout"])
    return {
        "model": name,
        "features": ev.features,
        "fd": float(np.mean(fds)),
        "kid": float(np.mean(kids)),
        "fd_ci": per_seed[0]["fd_ci"],
        "kid_ci": per_seed[0]["kid_ci"],
        "fd_per_seed": fds,
        "kid_per_seed": kids,
        "fd_seed_std": float(np.std(fds, ddof=1)) if len(fds) > 1 else 0.0,
        "kid_seed_std": float(np.std(kids, ddof=1)) if len(kids) > 1 else 0.0,
        # FD is biased upwards at small n: this one is comparable with the
        # real-vs-real floor, which only has the held-out images.
        "fd_at_floor_n": metrics_mod.frechet_distance(first_feats[:n_floor], ref["train"]),
        **metrics_mod.class_coverage(probs, ref["class_freq"]),
        "num_samples": ev.num_samples,
        "noise_seeds": ev.noise_seeds,
        "ddim_steps": ev.ddim_steps,
        "sample_seconds": seconds,
        "images_per_second": ev.num_samples * ev.noise_seeds / seconds if seconds > 0 else None,
    }
