"""DVC stage evaluate@<model>: samples from the common test noise, FD/KID, held-out loss, memorisation.

-> samples/<model>.{png,npz}, evaluation/<model>.json (details) and
metrics/<model>.json (fd, kid, heldout_loss, memorised_fraction: the numbers
compared across experiments).

Every model is sampled from the same initial noise (common random numbers)
and scored on the same held-out images and noise; the ensemble lets range
model i denoise the timesteps of range i.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from dtm_core import data as data_mod
from dtm_core import distances, features
from dtm_core.conditioning import prompt_labels
from dtm_core.config import Params
from dtm_core.denoising import heldout_losses
from dtm_core.io import atomic_file, dir_digest, write_json
from dtm_core.model import PromptUNet2DModel, load_scheduler, load_unet
from dtm_core.partition import load_partition, range_columns
from dtm_core.sampling import initial_noise, sample, save_grid
from dtm_core.seeding import derive_seed
from dtm_core.tracking import NullRun, git_commit, params_digest
from stages.common import (
    CLASSIFIER_DIR,
    DATA_DIR,
    EVALUATION_DIR,
    PARTITION_FILE,
    SAMPLES_DIR,
    eval_model_dir,
    load_reference,
    log_data_version,
    main,
    range_dir,
    reference_split,
)


def noise_seed(params: Params, index: int) -> int:
    """Test-noise seed ``index``: a function of evaluate.seed alone, the same for every model and training seed."""
    return derive_seed(params.evaluate.seed, "evaluate" if index == 0 else f"evaluate-{index}")


def load_eval_models(name: str):
    """The model(s) behind ``name``, the ranges they own (ensemble only) and the noise schedule."""
    ranges, _ = load_partition(PARTITION_FILE)
    if name == "ensemble":
        models = [load_unet(range_dir(i), what=f"range model {i}") for i in range(len(ranges))]
        return models, ranges, load_scheduler(range_dir(0))
    path = eval_model_dir(name)
    return [load_unet(path, what=f"{name} model")], None, load_scheduler(path)


def evaluate(params: Params, run=NullRun(), name: str = "merged") -> dict:
    if params.evaluate.features == "inception":
        features.inception_weights(params.evaluate.inception_dir)  # fail before any sampling
    models, ranges, scheduler = load_eval_models(name)
    headline, losses = score_models(params, run, name, models, ranges, scheduler, SAMPLES_DIR, EVALUATION_DIR)
    log_models(params, run, name, headline, losses, ranges)
    return headline


def score_models(params: Params, run, name: str, models, ranges, scheduler, samples_dir: Path,
                 evaluation_dir: Path) -> tuple[dict, dict]:
    """Sample ``models`` from the test noise and score them; writes ``samples_dir/<name>.{png,npz}`` and
    ``evaluation_dir/<name>.json``; the headline metrics and the held-out loss matrices."""
    ev = params.evaluate
    clf = features.load_classifier(CLASSIFIER_DIR / "classifier")
    ref = load_reference(ev.features)
    extract = features.feature_extractor(ev.features, clf, ev.inception_dir)
    cfg = models[0].config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    # a prompt-conditioned model: sample i prompted with class i mod C, guided (dtm_core/conditioning.py)
    labels = prompt_labels(ev.num_samples, len(cfg.prompts)) if isinstance(models[0], PromptUNet2DModel) else None
    guide = {} if labels is None else {"labels": labels, "guidance_scale": ev.guidance_scale}
    images, per_seed, seconds = [], [], 0.0
    for s in range(ev.noise_seeds):
        noise = initial_noise(noise_seed(params, s), ev.num_samples, shape)
        start = time.perf_counter()
        images.append(sample(models, scheduler, noise, ev.sampling_steps, ranges=ranges, eta=ev.eta, sampler=ev.sampler,
                             batch_size=ev.batch_size, seed=derive_seed(ev.seed, f"evaluate-eta-{s}"),
                             desc=f"sample {name} (noise {s})", **guide))
        seconds += time.perf_counter() - start
        per_seed.append(extract(images[-1]))
    against = reference_split(ref)
    fds = [distances.frechet_distance(f, ref[against]) for f in per_seed]
    images, feats = np.concatenate(images), np.concatenate(per_seed)
    # FD and KID over the pooled samples of every noise seed, interval included
    scores = distances.distances(feats, ref[against], ev.kid_subsets, ev.kid_subset_size, ev.bootstrap_rounds,
                                 derive_seed(ev.seed, "kid"))
    held = data_mod.load_split(DATA_DIR, "heldout")
    train_images = data_mod.load_split(DATA_DIR, "train").images
    start = time.perf_counter()
    held_labels = None if labels is None else torch.as_tensor(held.labels[: ev.heldout_images])
    losses = heldout_losses(ev, models, ranges, scheduler, held.images[: ev.heldout_images], held_labels)
    heldout_seconds = time.perf_counter() - start
    clf_feats = feats if ev.features == "classifier" else features.extract_features(clf, images)
    mem_pixels = distances.memorisation(images, held.images, train_images, ev.memorisation_percentile)
    mem_feats = distances.memorisation(clf_feats, ref["heldout_classifier"], ref["train_classifier"],
                                       ev.memorisation_percentile)
    probs = torch.softmax(torch.as_tensor(features.predict(clf, images)), dim=1).numpy()
    # the floor has only the held-out images: FD at that n, where there are that many samples (a sweep at fewer
    # samples than held-out images gets none rather than one at a smaller n labelled as the floor's)
    n_floor = len(ref["heldout"])
    at_floor_n = (lambda split: distances.frechet_distance(feats[:n_floor], ref[split])) if len(feats) >= n_floor \
        else (lambda split: None)

    save_grid(images, samples_dir / f"{name}.png", nrow=ev.grid_size)
    with atomic_file(samples_dir / f"{name}.npz", "wb") as handle:
        np.savez(handle, features=feats, **losses)
    headline = {
        "fd": scores["fd"],
        "kid": scores["kid"],
        "heldout_loss": float(losses["losses"].mean()),
        "memorised_fraction": mem_pixels["memorised_fraction"],
        "memorised_fraction_features": mem_feats["memorised_fraction"],
    }
    if against == "test":  # the second column: FD against the images the models trained on
        headline["fd_train"] = distances.frechet_distance(feats, ref["train"])
    if labels is not None:  # the stand-in for CLIP score: the classifier agrees with the prompt
        headline["conditional_accuracy"] = conditional_accuracy(probs, labels.repeat(ev.noise_seeds))
    details = {
        "model": name,
        **headline,
        "fd_ci": scores["fd_ci"],
        "kid_ci": scores["kid_ci"],
        "fd_per_noise_seed": fds,
        "fd_noise_seed_std": float(np.std(fds, ddof=1)) if len(fds) > 1 else 0.0,
        # FD is biased upwards at small n: this one is comparable with the
        # real-vs-real floor, which only has the held-out images.
        "fd_at_floor_n": at_floor_n("train"),
        "reference": against,
        **({"fd_test_at_floor_n": at_floor_n("test")} if against == "test" else {}),
        "heldout_loss_curve": losses["losses"].mean(axis=0).tolist(),
        "heldout_timesteps": losses["timesteps"].tolist(),
        "memorisation_pixels": mem_pixels,
        "memorisation_features": mem_feats,
        **distances.class_coverage(probs, ref["class_freq"]),
        "settings": {"features": ev.features, "num_samples": ev.num_samples, "noise_seeds": ev.noise_seeds,
                     "sampler": ev.sampler, "sampling_steps": ev.sampling_steps, "evaluate_seed": ev.seed,
                     "eta": ev.eta, "model_bootstrap_rounds": ev.bootstrap_rounds},
    }
    if "range_losses" in losses:
        details["range_model_heldout_loss_curves"] = losses["range_losses"].mean(axis=1).tolist()
    if labels is not None:
        details["settings"]["guidance_scale"] = ev.guidance_scale
        details["guidance_curve"] = guidance_curve(params, models, ranges, scheduler, shape, labels, clf, extract,
                                                   ref[against], name)
    write_json(evaluation_dir / f"{name}.json", details)
    run.log_artifact(samples_dir / f"{name}.png", "samples")
    run.log_curve("heldout_loss_by_t", list(zip(losses["timesteps"].tolist(), details["heldout_loss_curve"])))
    run.log_metrics({"images_per_second": len(images) / seconds if seconds > 0 else float("nan"),
                     "sample_seconds": seconds, "heldout_loss_seconds": heldout_seconds,
                     **({} if details["fd_at_floor_n"] is None else {"fd_at_floor_n": details["fd_at_floor_n"]})})
    log_data_version(run, params, "evaluation")
    return headline, losses


def conditional_accuracy(probs: np.ndarray, labels: torch.Tensor) -> float:
    """The share of samples the feature classifier puts in the class they were prompted with."""
    return float((probs.argmax(axis=1) == labels.numpy()).mean())


def guidance_curve(params: Params, models, ranges, scheduler, shape, labels, clf, extract, reference,
                   name: str) -> list[dict]:
    """FD and conditional accuracy at every ``evaluate.guidance_curve`` scale, each on the first
    ``guidance_curve_samples`` rows of the first noise seed's noise and prompts (comparable across
    scales and models, not with the headline FD at its larger n)."""
    ev = params.evaluate
    n = min(ev.guidance_curve_samples, ev.num_samples)
    noise = initial_noise(noise_seed(params, 0), ev.num_samples, shape)[:n]
    out = []
    for scale in ev.guidance_curve:
        images = sample(models, scheduler, noise, ev.sampling_steps, ranges=ranges, sampler=ev.sampler,
                        batch_size=ev.batch_size, labels=labels[:n], guidance_scale=scale,
                        desc=f"guidance {scale:g} {name}")
        probs = torch.softmax(torch.as_tensor(features.predict(clf, images)), dim=1).numpy()
        out.append({"scale": scale, "num_samples": n, "fd": distances.frechet_distance(extract(images), reference),
                    "conditional_accuracy": conditional_accuracy(probs, labels[:n])})
    return out


def log_models(params: Params, run, name: str, headline: dict, losses: dict, ranges) -> None:
    """The evaluated model (and, for the ensemble, each range model) as MLflow logged models with their metrics."""
    path = eval_model_dir(name)
    model_id = run.log_model(name, path, dir_digest(path), headline, {"dvc_stage": f"evaluate@{name}"})
    if name == "merged" and model_id and params.tracking.register_model:
        run.register_model(params.tracking.register_model, model_id, {
            "params_digest": params_digest(params), "git_commit": git_commit(), "fd": headline["fd"]})
    if name == "ensemble":
        cols = range_columns(losses["timesteps"], ranges)
        for i, matrix in enumerate(losses["range_losses"]):
            run.log_model(f"range-{i}", range_dir(i), dir_digest(range_dir(i)), {
                "heldout_loss": float(matrix.mean()), "heldout_loss_own_range": float(matrix[:, cols[i]].mean())},
                {"range": list(ranges[i])})


if __name__ == "__main__":
    sys.exit(main("evaluate", evaluate))
