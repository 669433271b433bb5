"""One function per DVC stage: what the stage computes and where its outs land.

Stage scripts in ``stages/`` only parse arguments and call these through
:func:`dtm_core.cli.main`. Every function takes the parsed params and a
:class:`~dtm_core.tracking.StageRun` (or :class:`NullRun`) to log to, writes
its outs atomically, and returns the metrics that land in the stage's
DVC-tracked metrics JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import data as data_mod
from . import metrics as metrics_mod
from .config import Params, derive_seed, flatten
from .io import atomic_dir, atomic_file, atomic_path, dir_digest, read_json, write_json
from . import analysis
from .merge import merge_files, parameter_distance
from .merge_search import plot_search, search_weights, write_candidates_tsv
from .model import (
    build_scheduler,
    build_unet,
    float_state,
    has_projection,
    load_scheduler,
    load_unet,
    num_parameters,
    save_model,
    with_projection,
)
from .partition import load_partition, ranges_from_params, sample_timesteps, save_partition
from .sampling import initial_noise, sample, save_grid
from .task_vector import TaskVector
from .train import clear_checkpoints, smoothed, train

log = logging.getLogger(__name__)

# Where outs land (relative to the repository root; dvc.yaml names the same paths).
DATA_DIR = Path("data/prepared")
CLASSIFIER_DIR = Path("models/classifier")
REFERENCE_FILE = CLASSIFIER_DIR / "reference_features.npz"  # features of the real data, per data version
PRETRAINED_DIR = Path("models/pretrained")
SHARED_DIR = Path("models/shared")
MERGED_DIR = Path("models/merged")
PARTITION_FILE = Path("partition/ranges.json")
TASK_VECTOR_DIR = Path("task_vectors")
FINETUNE_METRICS_DIR = Path("metrics/finetune")
TASK_VECTOR_NORMS_TSV = Path("plots/task_vector_norms.tsv")
MERGE_DIR = Path("merge")
METRICS_DIR = Path("metrics")
SAMPLES_DIR = Path("samples")
REPORT_DIR = Path("reports")
CHECKPOINT_DIR = Path(".dtm/checkpoints")
EVAL_MODELS = ("pretrained", "shared", "merged", "ensemble")


def range_dir(i: int) -> Path:
    return Path(f"models/range-{i}")


def checkpoint_dir(name: str, params: Params, sections: tuple[str, ...], inputs: tuple[Path, ...]) -> Path:
    """Where a training stage keeps resumable state, keyed by what it trains from.

    A checkpoint is resumed only by a run with the same params sections and
    the same input files; checkpoints of other settings are dropped.
    """
    h = hashlib.sha256()
    selected = {k: v for s in sections for k, v in flatten(params.section(s), s).items()}
    h.update(json.dumps(selected, sort_keys=True, default=str).encode())
    for path in inputs:
        h.update(dir_digest(path).encode() if path.is_dir() else path.read_bytes())
    root = CHECKPOINT_DIR / name
    for stale in root.glob("*"):
        if stale.name != h.hexdigest()[:16]:
            shutil.rmtree(stale, ignore_errors=True)
    return root / h.hexdigest()[:16]


class NullRun:
    """A StageRun stand-in that logs nothing (library use, unit tests)."""

    run_id = parent_id = None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


# ---------------------------------------------------------------- prepare
def prepare(params: Params, run: Any = NullRun()) -> dict:
    dataset = data_mod.load_source(params.data)
    train_ds, held_ds = data_mod.split(dataset, params.data.holdout_fraction, derive_seed(params.seed, "prepare"))
    data_mod.save_splits(DATA_DIR, train_ds, held_ds)
    return {
        "train_images": len(train_ds),
        "heldout_images": len(held_ds),
        "classes": len(dataset.classes),
        "image_shape": list(dataset.images.shape[1:]),
    }


# ------------------------------------------------------------- classifier
def classifier(params: Params, run: Any = NullRun()) -> dict:
    """Train the feature classifier; reference features of the real data; the floor."""
    ev = params.evaluate
    if ev.features == "inception":
        metrics_mod.inception_weights(ev.inception_dir)  # fail before any work
    train_ds = data_mod.load_split(DATA_DIR, "train")
    held_ds = data_mod.load_split(DATA_DIR, "heldout")
    cfg = ev.classifier
    res = metrics_mod.train_classifier(
        train_ds.images, train_ds.labels, held_ds.images, held_ds.labels,
        len(train_ds.classes), cfg, derive_seed(params.seed, "classifier"),
    )
    extract = metrics_mod.feature_extractor(ev.features, res.model, ev.inception_dir)
    train_feats, held_feats = extract(train_ds.images), extract(held_ds.images)
    class_freq = np.bincount(train_ds.labels, minlength=len(train_ds.classes)) / len(train_ds)
    with atomic_dir(CLASSIFIER_DIR) as tmp:
        metrics_mod.save_classifier(res.model, tmp / "classifier", {"classes": list(train_ds.classes)})
        # Reference statistics of the real data, once per data version.
        np.savez(tmp / REFERENCE_FILE.name, train=train_feats, heldout=held_feats, class_freq=class_freq,
                 features=np.asarray(ev.features))
    floor = metrics_mod.distances(held_feats, train_feats, ev.kid_subsets, ev.kid_subset_size,
                                  ev.bootstrap_rounds, derive_seed(params.seed, "kid"))
    return {
        "heldout_accuracy": res.heldout_accuracy,
        "train_accuracy": res.train_accuracy,
        "dead_feature_fraction": res.dead_feature_fraction,
        "features": ev.features,
        "feature_dim": int(train_feats.shape[1]),
        # the real-vs-real floor: held-out vs train images, same features
        **{f"floor_{k}": v for k, v in floor.items()},
        "floor_num_samples": len(held_feats),
    }


# --------------------------------------------------------------- pretrain
def pretrain(params: Params, run: Any = NullRun()) -> dict:
    train_ds = data_mod.load_split(DATA_DIR, "train")
    shape = train_ds.images.shape[1:]
    if params.model.pretrained_path:
        return _import_pretrained(params, shape)
    # Some imported library reseeds torch's global generator at random, so the
    # initial weights must be seeded here, not inherited from the process.
    torch.manual_seed(derive_seed(params.seed, "pretrain-init"))
    unet = build_unet(params.model, sample_size=shape[-1], channels=shape[0])
    scheduler = build_scheduler(params.model)
    ckpt = checkpoint_dir("pretrain", params, ("seed", "model", "pretrain"), (DATA_DIR,))
    res = train(unet, scheduler, torch.as_tensor(train_ds.images), params.pretrain,
                seed=derive_seed(params.seed, "pretrain"), checkpoint_dir=ckpt,
                checkpoint_every=params.pretrain.checkpoint_every, desc="pretrain")
    run.log_curve("train/loss", res.losses)
    save_model(res.model, scheduler, PRETRAINED_DIR, {"source": "embedded", "steps": res.steps})
    clear_checkpoints(ckpt)
    return {
        "source": "embedded",
        "final_loss": smoothed(res.losses),
        "steps": res.steps,
        "steps_per_second": res.steps_per_second,
        "train_seconds": res.seconds,
        "parameters": num_parameters(res.model),
    }


def _import_pretrained(params: Params, shape: tuple) -> dict:
    src = Path(params.model.pretrained_path).expanduser()
    unet = load_unet(src, what="model.pretrained_path")
    if has_projection(unet):
        raise ValueError(
            f"model.pretrained_path '{src}' already has channel-projection layers; "
            "start DeMe from a plain UNet2DModel checkpoint."
        )
    cfg = unet.config
    if cfg.in_channels != shape[0] or cfg.sample_size != shape[-1]:
        raise ValueError(
            f"model.pretrained_path '{src}' expects {cfg.in_channels}x{cfg.sample_size}px images but the data "
            f"are {shape[0]}x{shape[-1]}px: set data.channels / data.image_size to match the checkpoint."
        )
    scheduler = load_scheduler(src, fallback=params.model)
    T = scheduler.config.num_train_timesteps
    if T != params.model.num_train_timesteps:
        raise ValueError(
            f"model.pretrained_path '{src}' was trained with {T} timesteps but model.num_train_timesteps is "
            f"{params.model.num_train_timesteps}: set model.num_train_timesteps: {T}."
        )
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"model.pretrained_path '{src}': only epsilon-prediction checkpoints are supported")
    save_model(unet, scheduler, PRETRAINED_DIR, {"source": str(src)})
    return {"source": "imported", "parameters": num_parameters(unet)}


# -------------------------------------------------------------- partition
def partition(params: Params, run: Any = NullRun()) -> dict:
    ranges = ranges_from_params(params)
    save_partition(PARTITION_FILE, ranges, params.model.num_train_timesteps)
    return {"num_ranges": len(ranges), "ranges": [list(r) for r in ranges]}


# --------------------------------------------------------------- finetune
def _finetune_common(params: Params):
    train_ds = data_mod.load_split(DATA_DIR, "train")
    base = load_unet(PRETRAINED_DIR, what="pretrained model")
    scheduler = load_scheduler(PRETRAINED_DIR)
    return torch.as_tensor(train_ds.images), base, scheduler


def _finetune_metrics(res, out_dir: Path) -> dict:
    return {
        "final_loss": smoothed(res.losses),
        "final_consistency_loss": smoothed(res.consistency),
        "steps": res.steps,
        "steps_per_second": res.steps_per_second,
        "train_seconds": res.seconds,
        "resumed_from_step": res.resumed_from,
        "parameters": num_parameters(res.model),
        "model_digest": dir_digest(out_dir),
    }


def finetune_range(params: Params, index: int, run: Any = NullRun(), stop_after: Optional[int] = None) -> dict:
    """Fine-tune a copy of the pretrained model for timestep range ``index`` (DeMe)."""
    ranges, T = load_partition(PARTITION_FILE)
    if not 0 <= index < len(ranges):
        raise ValueError(f"range index {index} is outside the partition's {len(ranges)} ranges (partition.ranges)")
    lo, hi = ranges[index]
    ft = params.finetune
    images, base, scheduler = _finetune_common(params)
    model = with_projection(base, enabled=ft.channel_projection)

    def draw(batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return sample_timesteps(batch_size, lo, hi, T, ft.p, generator, ft.antithetic)[0]

    ckpt = checkpoint_dir(f"range-{index}", params, ("seed", "finetune"), (DATA_DIR, PRETRAINED_DIR, PARTITION_FILE))
    res = train(
        model, scheduler, images, ft, seed=derive_seed(params.seed, f"finetune-{index}"),
        timestep_sampler=draw, teacher=base, consistency_weight=ft.consistency_weight,
        checkpoint_dir=ckpt, checkpoint_every=ft.checkpoint_every, stop_after=stop_after,
        desc=f"finetune range {index} [{lo},{hi})",
    )
    if stop_after is not None and res.steps < ft.steps:
        return {"stopped_at": res.steps}
    run.log_curve("train/loss", res.losses)
    run.log_curve("train/consistency_loss", res.consistency)
    out = range_dir(index)
    save_model(res.model, scheduler, out, {"range": [lo, hi], "index": index, "steps": res.steps})
    clear_checkpoints(ckpt)
    return {"range": [lo, hi], "index": index, **_finetune_metrics(res, out)}


def finetune_shared(params: Params, run: Any = NullRun(), stop_after: Optional[int] = None) -> dict:
    """The baseline: the same optimiser recipe on all of [0, T), N x the per-range steps."""
    ft = params.finetune
    steps = params.num_ranges * ft.steps
    images, base, scheduler = _finetune_common(params)
    ckpt = checkpoint_dir("shared", params, ("seed", "finetune", "partition"), (DATA_DIR, PRETRAINED_DIR))
    res = train(
        base, scheduler, images, ft, seed=derive_seed(params.seed, "finetune-shared"), steps=steps,
        checkpoint_dir=ckpt, checkpoint_every=ft.checkpoint_every, stop_after=stop_after,
        desc="finetune shared",
    )
    if stop_after is not None and res.steps < steps:
        return {"stopped_at": res.steps}
    run.log_curve("train/loss", res.losses)
    save_model(res.model, scheduler, SHARED_DIR, {"steps": res.steps, "baseline": "shared"})
    clear_checkpoints(ckpt)
    return _finetune_metrics(res, SHARED_DIR)


# ----------------------------------------------------------- task vectors
def _base_like(ranged_model) -> dict[str, torch.Tensor]:
    """The pretrained weights in the range models' architecture (identity projections)."""
    base = load_unet(PRETRAINED_DIR, what="pretrained model")
    if has_projection(ranged_model):
        base = with_projection(base, enabled=True)
    return float_state(base)


def task_vectors(params: Params, run: Any = NullRun()) -> dict:
    """tau_i = theta_i - theta per range; norms, per-layer norms, cosines and their plots."""
    ranges, _ = load_partition(PARTITION_FILE)
    with atomic_dir(TASK_VECTOR_DIR) as tmp:
        base = None
        for i in range(len(ranges)):
            model = load_unet(range_dir(i), what=f"range model {i}")
            if base is None:
                base = _base_like(model)
            tv = TaskVector.from_states(base, float_state(model), what=f"range model {i} ({range_dir(i)})")
            tv.save(tmp / f"range-{i}.safetensors")
            del tv, model  # one task vector in memory at a time
        files = [tmp / f"range-{i}.safetensors" for i in range(len(ranges))]
        stats = analysis.write_analysis(files, ranges, tmp)
        write_json(tmp / "norms.json", {"total": stats["total_norm"], "per_tensor": stats["per_tensor"],
                                        "per_layer": stats["per_layer"]})
    with atomic_file(TASK_VECTOR_NORMS_TSV) as handle:
        handle.write("range\tlo\thi\tnorm\n")
        for i, ((lo, hi), norm) in enumerate(zip(ranges, stats["total_norm"])):
            handle.write(f"{i}\t{lo}\t{hi}\t{norm:.6g}\n")
    for name in ("norms.json", "cosine.json", "tv_norms.png", "tv_layer_heatmap.png", "tv_cosine.png"):
        run.log_artifact(TASK_VECTOR_DIR / name, "task_vectors")
    out = {f"norm_range_{i}": v for i, v in enumerate(stats["total_norm"])}
    n = len(ranges)
    out.update({f"cosine_{i}_{j}": stats["cosine"][i][j] for i in range(n) for j in range(i + 1, n)})
    return out


# ------------------------------------------------------------------ merge
def _search_scorer(params: Params, template, scheduler, build):
    """Validation FD of a candidate merge: its own noise seed, classifier features."""
    sc = params.merge.search
    clf = metrics_mod.load_classifier(CLASSIFIER_DIR / "classifier")
    ref = load_reference(params.evaluate.features)["train"] if params.evaluate.features == "classifier" else \
        metrics_mod.extract_features(clf, data_mod.load_split(DATA_DIR, "train").images)
    cfg = template.config
    noise = initial_noise(derive_seed(params.seed, "merge-search"), sc.num_samples,
                          (cfg.in_channels, cfg.sample_size, cfg.sample_size))
    full = template.state_dict()

    def score(weights: list[float]) -> float:
        full.update(build(weights))
        template.load_state_dict(full)
        images = sample([template], scheduler, noise, sc.ddim_steps, batch_size=params.evaluate.batch_size,
                        desc=f"search {[round(w, 3) for w in weights]}")
        return metrics_mod.frechet_distance(metrics_mod.extract_features(clf, images), ref)

    return score


def merge(params: Params, run: Any = NullRun()) -> dict:
    """theta + scale * merge(tau_1..tau_N), weights fixed or searched."""
    ranges, _ = load_partition(PARTITION_FILE)
    n, mc = len(ranges), params.merge
    weights = params.merge_weights
    if len(weights) != n:
        raise ValueError(f"merge.weights has {len(weights)} values for the partition's {n} ranges")
    template = load_unet(range_dir(0), what="range model 0")
    base = _base_like(template)
    scheduler = load_scheduler(PRETRAINED_DIR)
    files = [TASK_VECTOR_DIR / f"range-{i}.safetensors" for i in range(n)]
    seed = derive_seed(params.seed, "merge")

    def build(w: list[float]) -> dict:
        return merge_files(base, files, w, mc.method, density=mc.density, scale=mc.scale, seed=seed)

    search_info = None
    with atomic_dir(MERGE_DIR) as tmp:
        if mc.search.strategy != "none":
            result = search_weights(n, _search_scorer(params, template, scheduler, build), mc.search, start=weights)
            weights = list(result.best_weights)
            write_candidates_tsv(result, tmp / "search.tsv")
            plot_search(result, tmp / "search.png")
            run.log_curve("search/score", [(c["index"], c["score"]) for c in result.candidates])
            search_info = {"strategy": result.strategy, "evaluations": result.evaluations,
                           "best_weights": weights, "best_score": result.best_score,
                           "num_samples": mc.search.num_samples, "ddim_steps": mc.search.ddim_steps}
        write_json(tmp / "weights.json", {"weights": weights, "method": mc.method, "scale": mc.scale,
                                          "density": mc.density, "search": search_info})
    for name in ("search.tsv", "search.png", "weights.json"):
        run.log_artifact(MERGE_DIR / name, "merge")
    merged_state = build(weights)
    full = template.state_dict()
    full.update(merged_state)
    template.load_state_dict(full)
    tau_norms = read_json(TASK_VECTOR_DIR / "norms.json", "task-vector norms")["total"]
    applied = [mc.scale * w for w in weights]
    info = {"method": mc.method, "weights": weights, "scale": mc.scale, "density": mc.density,
            "ranges": [list(r) for r in ranges], "search": search_info}
    save_model(template, scheduler, MERGED_DIR, info)  # the chosen weights sit next to the model
    return {
        "method": mc.method,
        "weights": weights,
        "weight_sum": float(sum(weights)),
        "applied_scale": applied,
        "tau_norms": tau_norms,
        "applied_tau_norms": [a * t for a, t in zip(applied, tau_norms)],
        "distance_from_pretrained": parameter_distance(merged_state, base),
        "search": search_info,
        **({"search_best_score": search_info["best_score"]} if search_info else {}),
    }


# --------------------------------------------------------------- evaluate
def _load_eval_models(name: str):
    if name == "ensemble":
        ranges, _ = load_partition(PARTITION_FILE)
        models = [load_unet(range_dir(i), what=f"range model {i}") for i in range(len(ranges))]
        return models, ranges, load_scheduler(range_dir(0))
    if name not in EVAL_MODELS:
        raise ValueError(f"unknown model '{name}' to evaluate; choose one of {EVAL_MODELS}")
    path = Path("models") / name
    return [load_unet(path, what=f"{name} model")], None, load_scheduler(path)


def load_reference(features: str) -> dict:
    if not REFERENCE_FILE.is_file():
        raise FileNotFoundError(f"reference features '{REFERENCE_FILE}' are missing: run dvc repro classifier")
    with np.load(REFERENCE_FILE) as ref:
        out = {k: ref[k] for k in ref.files}
    if str(out["features"]) != features:
        raise ValueError(
            f"'{REFERENCE_FILE}' holds {out['features']} features but evaluate.features is '{features}': "
            "run dvc repro classifier"
        )
    return out


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


# ----------------------------------------------------------------- report
def _paired_difference(params: Params, model: str, reference: np.ndarray) -> dict:
    """FD(model) - FD(shared) with a paired bootstrap CI (both sampled from the same noise)."""
    with np.load(SAMPLES_DIR / f"{model}.npz") as a, np.load(SAMPLES_DIR / "shared.npz") as b:
        fa, fb = a["features"], b["features"]
    fd = metrics_mod.frechet_distance
    low, high = metrics_mod.bootstrap_ci(fa, reference, fd, params.evaluate.bootstrap_rounds,
                                         derive_seed(params.seed, f"paired-{model}"), paired_with=fb)
    delta = fd(fa, reference) - fd(fb, reference)
    verdict = "better" if high < 0 else "worse" if low > 0 else "not distinguishable"
    return {"fd_delta": delta, "fd_delta_ci": [low, high], "verdict": verdict}


def report(params: Params, run: Any = NullRun()) -> dict:
    results = {name: read_json(METRICS_DIR / f"{name}.json", f"evaluation of {name}") for name in EVAL_MODELS}
    clf = read_json(METRICS_DIR / "classifier.json", "classifier metrics")
    merge_info = read_json(METRICS_DIR / "merge.json", "merge metrics")
    reference = load_reference(params.evaluate.features)["train"]
    base_fd, base_kid = results["shared"]["fd"], results["shared"]["kid"]
    table = {}
    for name, r in results.items():
        table[name] = {
            **{k: r[k] for k in ("fd", "kid", "fd_ci", "kid_ci", "fd_seed_std", "kid_seed_std", "fd_at_floor_n",
                                 "class_tv_distance", "class_kl_divergence", "mean_confidence")},
            "fd_vs_shared": (r["fd"] - base_fd) / base_fd if base_fd else None,
            "kid_vs_shared": (r["kid"] - base_kid) / abs(base_kid) if base_kid else None,
        }
    for name in ("merged", "ensemble", "pretrained"):
        table[name]["vs_shared"] = _paired_difference(params, name, reference)
    comparison = {
        **table,
        "floor": {"fd": clf["floor_fd"], "kid": clf["floor_kid"], "fd_ci": clf["floor_fd_ci"],
                  "num_samples": clf["floor_num_samples"]},
        "merge": {k: merge_info.get(k) for k in ("method", "weights", "applied_scale", "tau_norms",
                                                  "distance_from_pretrained", "search")},
        "settings": {
            "features": params.evaluate.features,
            "num_samples": params.evaluate.num_samples,
            "noise_seeds": params.evaluate.noise_seeds,
            "ddim_steps": params.evaluate.ddim_steps,
            "bootstrap_rounds": params.evaluate.bootstrap_rounds,
            "num_ranges": params.num_ranges,
            "finetune_steps_per_range": params.finetune.steps,
            "shared_steps": params.num_ranges * params.finetune.steps,
            "classifier_heldout_accuracy": clf["heldout_accuracy"],
            "seed": params.seed,
        },
        "params": flatten(params),
        "mlflow": {"parent_run_id": run.parent_id, "report_run_id": run.run_id},
    }
    write_json(REPORT_DIR / "comparison.json", comparison)
    with atomic_file(REPORT_DIR / "comparison.md") as handle:
        handle.write(render_markdown(comparison))
    summary = {f"{name}/{k}": table[name][k] for name in EVAL_MODELS for k in ("fd", "kid")}
    summary["merged_minus_shared/fd"] = table["merged"]["vs_shared"]["fd_delta"]
    summary["floor/fd"] = clf["floor_fd"]
    run.log_parent_metrics(summary)
    for name in ("comparison.json", "comparison.md"):
        run.log_parent_artifact(REPORT_DIR / name, "report")
    for name in EVAL_MODELS:
        run.log_parent_artifact(SAMPLES_DIR / f"{name}.png", "samples")
    for plot in sorted(Path(TASK_VECTOR_DIR).glob("*.png")):
        run.log_parent_artifact(plot, "task_vectors")
    return {f"{name}_fd": table[name]["fd"] for name in EVAL_MODELS}


def render_markdown(c: dict) -> str:
    s, f, m = c["settings"], c["floor"], c["merge"]
    fmt_ci = lambda ci, d=4: f"[{ci[0]:.{d}f}, {ci[1]:.{d}f}]"  # noqa: E731
    pct = lambda v: "–" if v is None else f"{100 * v:+.1f}%"  # noqa: E731
    space = "digit classifier" if s["features"] == "classifier" else "Inception (clean-fid, mode clean)"
    lines = [
        "# DeMe comparison",
        "",
        f"N = {s['num_ranges']} range models x {s['finetune_steps_per_range']} steps against a shared fine-tune of "
        f"{s['shared_steps']} steps (equal compute). {s['num_samples']} samples per model x {s['noise_seeds']} noise "
        f"seed(s), DDIM {s['ddim_steps']} steps, identical initial noise for every model. Feature space: {space} "
        f"(classifier held-out accuracy {s['classifier_heldout_accuracy']:.3f}). Intervals are 95% bootstrap "
        f"intervals over samples ({s['bootstrap_rounds']} resamples).",
        "",
        f"| model | FD [95% CI] | KID [95% CI] | FD vs shared | KID vs shared | FD at n={f['num_samples']} "
        "| class TV | class KL | confidence |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in EVAL_MODELS:
        r = c[name]
        seed_sd = f" ± {r['fd_seed_std']:.4f}" if s["noise_seeds"] > 1 else ""
        lines.append(
            f"| {name} | {r['fd']:.4f}{seed_sd} {fmt_ci(r['fd_ci'])} | {r['kid']:.5f} {fmt_ci(r['kid_ci'], 5)} "
            f"| {pct(r['fd_vs_shared'])} | {pct(r['kid_vs_shared'])} | {r['fd_at_floor_n']:.4f} "
            f"| {r['class_tv_distance']:.3f} | {r['class_kl_divergence']:.4f} | {r['mean_confidence']:.3f} |"
        )
    lines += [
        f"| real held-out vs train (floor) | | | | | {f['fd']:.4f} {fmt_ci(f['fd_ci'])} | | | |",
        "",
        "## Against the shared baseline (paired bootstrap: same noise, same resampled indices)",
        "",
        "| model | FD − FD(shared) | 95% CI | verdict |",
        "|---|---|---|---|",
    ]
    for name in ("merged", "ensemble", "pretrained"):
        v = c[name]["vs_shared"]
        lines.append(f"| {name} | {v['fd_delta']:+.4f} | {fmt_ci(v['fd_delta_ci'])} | {v['verdict']} |")
    weights = [round(w, 4) for w in (m.get("weights") or [])]
    lines += ["", "## Merge", "", f"Method `{m.get('method')}`, weights {weights}."]
    if m.get("tau_norms"):
        lines.append(f"Task-vector norms by range (low t to high t): {[round(x, 4) for x in m['tau_norms']]}; "
                     f"applied scale per range: {[round(x, 4) for x in (m.get('applied_scale') or [])]}.")
    if m.get("distance_from_pretrained") is not None:
        lines.append(f"Parameter distance of the merged model from the pretrained one: "
                     f"{m['distance_from_pretrained']:.4f}.")
    search = m.get("search")
    if search:
        lines += ["", f"Weight search ({search['strategy']}, {search['evaluations']} candidates, scored by FD on "
                  f"{search['num_samples']} validation samples from the search seed): best {search['best_weights']} "
                  f"with validation FD {search['best_score']:.4f}. Candidates: `merge/search.tsv`; "
                  "plot: `merge/search.png`."]
    lines += ["", "## Task vectors", ""]
    for png, title in (("tv_norms.png", "norm by range"), ("tv_layer_heatmap.png", "per-layer norms"),
                       ("tv_cosine.png", "cosine similarity")):
        if (TASK_VECTOR_DIR / png).exists():
            lines.append(f"![{title}](../{TASK_VECTOR_DIR}/{png})")
    lines += ["", "## Samples (same initial noise)", "", "| " + " | ".join(EVAL_MODELS) + " |",
              "|" + "---|" * len(EVAL_MODELS),
              "| " + " | ".join(f"![{n}](../{SAMPLES_DIR}/{n}.png)" for n in EVAL_MODELS) + " |", ""]
    lines += ["## Provenance", "", f"MLflow parent run `{c['mlflow']['parent_run_id']}`, report run "
              f"`{c['mlflow']['report_run_id']}`.", "", "<details><summary>params</summary>", "", "```"]
    lines += [f"{k}: {v}" for k, v in sorted(c["params"].items())]
    lines += ["```", "", "</details>", ""]
    return "\n".join(lines)
