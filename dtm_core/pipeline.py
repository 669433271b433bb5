"""One function per DVC stage: what the stage computes and where its outs land.

Stage scripts in ``stages/`` only parse arguments and call these through
:func:`dtm_core.cli.main`. Every function takes the parsed params and a
:class:`~dtm_core.tracking.StageRun` (or :class:`NullRun`) to log to, writes
its outs atomically, and returns the metrics that land in the stage's
DVC-tracked metrics JSON.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import data as data_mod
from . import metrics as metrics_mod
from .config import Params, derive_seed
from .io import atomic_dir, atomic_file, atomic_path, dir_digest, read_json, write_json
from .merge import merge_files, parameter_distance
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
REFERENCE_FILE = CLASSIFIER_DIR / "reference_features.npz"
PRETRAINED_DIR = Path("models/pretrained")
SHARED_DIR = Path("models/shared")
MERGED_DIR = Path("models/merged")
PARTITION_FILE = Path("partition/ranges.json")
TASK_VECTOR_DIR = Path("task_vectors")
FINETUNE_METRICS_DIR = Path("metrics/finetune")
TASK_VECTOR_NORMS_TSV = Path("plots/task_vector_norms.tsv")
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
    import hashlib
    import json
    import shutil

    from .config import flatten

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
    train_ds = data_mod.load_split(DATA_DIR, "train")
    held_ds = data_mod.load_split(DATA_DIR, "heldout")
    cfg = params.evaluate.classifier
    res = metrics_mod.train_classifier(
        train_ds.images, train_ds.labels, held_ds.images, held_ds.labels,
        len(train_ds.classes), cfg, derive_seed(params.seed, "classifier"),
    )
    train_feats = metrics_mod.extract_features(res.model, train_ds.images)
    held_feats = metrics_mod.extract_features(res.model, held_ds.images)
    class_freq = np.bincount(train_ds.labels, minlength=len(train_ds.classes)) / len(train_ds)
    metrics_mod.save_classifier(res.model, CLASSIFIER_DIR, {"classes": list(train_ds.classes)})
    # Reference statistics of the real data, once per data version.
    with atomic_path(REFERENCE_FILE) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, train=train_feats, heldout=held_feats, class_freq=class_freq)
    ev = params.evaluate
    return {
        "heldout_accuracy": res.heldout_accuracy,
        "train_accuracy": res.train_accuracy,
        "dead_feature_fraction": res.dead_feature_fraction,
        "feature_dim": cfg.feature_dim,
        # the real-vs-real floor: held-out vs train images, same features
        "floor_fd": metrics_mod.frechet_distance(held_feats, train_feats),
        "floor_kid": metrics_mod.kernel_distance(
            held_feats, train_feats, ev.kid_subsets, ev.kid_subset_size, derive_seed(params.seed, "kid")
        ),
        "floor_num_samples": len(held_feats),
    }


# --------------------------------------------------------------- pretrain
def pretrain(params: Params, run: Any = NullRun()) -> dict:
    train_ds = data_mod.load_split(DATA_DIR, "train")
    shape = train_ds.images.shape[1:]
    if params.model.pretrained_path:
        return _import_pretrained(params, shape)
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
    ranges, _ = load_partition(PARTITION_FILE)
    norms_rows, totals, layer_norms = [], {}, {}
    with atomic_dir(TASK_VECTOR_DIR) as tmp:
        base = None
        for i, (lo, hi) in enumerate(ranges):
            model = load_unet(range_dir(i), what=f"range model {i}")
            if base is None:
                base = _base_like(model)
            tv = TaskVector.from_states(base, float_state(model), what=f"range model {i} ({range_dir(i)})")
            tv.save(tmp / f"range-{i}.safetensors")
            totals[f"range-{i}"] = tv.total_norm()
            per = tv.norms()
            layer_norms[f"range-{i}"] = per
            norms_rows.append({"range": i, "lo": lo, "hi": hi, "norm": totals[f"range-{i}"]})
        write_json(tmp / "norms.json", {"total": totals, "per_tensor": layer_norms})
    with atomic_file(TASK_VECTOR_NORMS_TSV) as handle:
        handle.write("range\tlo\thi\tnorm\n")
        for row in norms_rows:
            handle.write(f"{row['range']}\t{row['lo']}\t{row['hi']}\t{row['norm']:.6g}\n")
    run.log_artifact(TASK_VECTOR_DIR / "norms.json")
    run.log_artifact(TASK_VECTOR_NORMS_TSV)
    return {f"norm_range_{i}": totals[f"range-{i}"] for i in range(len(ranges))}


# ------------------------------------------------------------------ merge
def merge(params: Params, run: Any = NullRun()) -> dict:
    ranges, _ = load_partition(PARTITION_FILE)
    n = len(ranges)
    weights = params.merge_weights
    if len(weights) != n:
        raise ValueError(f"merge.weights has {len(weights)} values for the partition's {n} ranges")
    template = load_unet(range_dir(0), what="range model 0")
    base = _base_like(template)
    files = [TASK_VECTOR_DIR / f"range-{i}.safetensors" for i in range(n)]
    merged_state = merge_files(base, files, weights, params.merge.method)
    full = template.state_dict()
    full.update(merged_state)
    template.load_state_dict(full)
    scheduler = load_scheduler(PRETRAINED_DIR)
    info = {"method": params.merge.method, "weights": weights, "ranges": [list(r) for r in ranges]}
    save_model(template, scheduler, MERGED_DIR, info)
    return {
        "method": params.merge.method,
        "weights": weights,
        "weight_sum": float(sum(weights)),
        "distance_from_pretrained": parameter_distance(merged_state, base),
    }


# --------------------------------------------------------------- evaluate
def _load_eval_models(name: str):
    if name == "ensemble":
        ranges, _ = load_partition(PARTITION_FILE)
        models = [load_unet(range_dir(i), what=f"range model {i}") for i in range(len(ranges))]
        return models, ranges
    if name not in EVAL_MODELS:
        raise ValueError(f"unknown model '{name}' to evaluate; choose one of {EVAL_MODELS}")
    return [load_unet(Path("models") / name, what=f"{name} model")], None


def evaluate(params: Params, name: str, run: Any = NullRun()) -> dict:
    ev = params.evaluate
    models, ranges = _load_eval_models(name)
    scheduler = load_scheduler(range_dir(0) if name == "ensemble" else Path("models") / name)
    classifier_model = metrics_mod.load_classifier(CLASSIFIER_DIR)
    with np.load(REFERENCE_FILE) as ref:
        train_feats, class_freq, n_floor = ref["train"], ref["class_freq"], len(ref["heldout"])
    cfg = models[0].config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    # Common random numbers: the seed does not depend on the model name.
    noise = initial_noise(derive_seed(params.seed, "evaluate"), ev.num_samples, shape)
    start = time.perf_counter()
    images = sample(models, scheduler, noise, ev.ddim_steps, ranges=ranges, eta=ev.eta,
                    batch_size=ev.batch_size, seed=derive_seed(params.seed, "evaluate-eta"), desc=f"sample {name}")
    seconds = time.perf_counter() - start
    feats = metrics_mod.extract_features(classifier_model, images)
    probs = torch.softmax(torch.as_tensor(metrics_mod.predict(classifier_model, images)), dim=1).numpy()
    hist = np.bincount(probs.argmax(1), minlength=len(class_freq)) / len(probs)
    grid = SAMPLES_DIR / f"{name}.png"
    save_grid(images, grid, nrow=ev.grid_size)
    run.log_artifact(grid, "samples")
    return {
        "model": name,
        "fd": metrics_mod.frechet_distance(feats, train_feats),
        "kid": metrics_mod.kernel_distance(
            feats, train_feats, ev.kid_subsets, ev.kid_subset_size, derive_seed(params.seed, "kid")
        ),
        # FD is biased upwards at small n: this one is comparable with the
        # real-vs-real floor, which only has the held-out images.
        "fd_at_floor_n": metrics_mod.frechet_distance(feats[:n_floor], train_feats),
        "class_tv_distance": float(0.5 * np.abs(hist - class_freq).sum()),
        "mean_confidence": float(probs.max(1).mean()),
        "class_histogram": hist.tolist(),
        "num_samples": ev.num_samples,
        "ddim_steps": ev.ddim_steps,
        "sample_seconds": seconds,
        "images_per_second": ev.num_samples / seconds if seconds > 0 else None,
    }


# ----------------------------------------------------------------- report
def report(params: Params, run: Any = NullRun()) -> dict:
    results = {name: read_json(METRICS_DIR / f"{name}.json", f"evaluation of {name}") for name in EVAL_MODELS}
    classifier_metrics = read_json(METRICS_DIR / "classifier.json", "classifier metrics")
    base_fd, base_kid = results["shared"]["fd"], results["shared"]["kid"]
    table = {}
    for name, r in results.items():
        table[name] = {
            "fd": r["fd"],
            "kid": r["kid"],
            "fd_at_floor_n": r["fd_at_floor_n"],
            "fd_vs_shared": (r["fd"] - base_fd) / base_fd if base_fd else None,
            "kid_vs_shared": (r["kid"] - base_kid) / abs(base_kid) if base_kid else None,
            "class_tv_distance": r["class_tv_distance"],
            "mean_confidence": r["mean_confidence"],
        }
    comparison = {
        **table,
        "floor": {
            "fd": classifier_metrics["floor_fd"],
            "kid": classifier_metrics["floor_kid"],
            "num_samples": classifier_metrics["floor_num_samples"],
        },
        "settings": {
            "num_samples": params.evaluate.num_samples,
            "ddim_steps": params.evaluate.ddim_steps,
            "num_ranges": params.num_ranges,
            "finetune_steps_per_range": params.finetune.steps,
            "shared_steps": params.num_ranges * params.finetune.steps,
            "merge_method": params.merge.method,
            "merge_weights": params.merge_weights,
            "classifier_heldout_accuracy": classifier_metrics["heldout_accuracy"],
        },
        "mlflow": {"parent_run_id": run.parent_id, "report_run_id": run.run_id},
    }
    write_json(REPORT_DIR / "comparison.json", comparison)
    with atomic_file(REPORT_DIR / "comparison.md") as handle:
        handle.write(render_markdown(comparison))
    summary = {}
    for name in EVAL_MODELS:
        summary[f"{name}/fd"] = table[name]["fd"]
        summary[f"{name}/kid"] = table[name]["kid"]
    summary["merged_minus_shared/fd"] = table["merged"]["fd"] - base_fd
    summary["floor/fd"] = classifier_metrics["floor_fd"]
    run.log_parent_metrics(summary)
    for name in ("comparison.json", "comparison.md"):
        run.log_parent_artifact(REPORT_DIR / name, "report")
    for name in EVAL_MODELS:
        run.log_parent_artifact(SAMPLES_DIR / f"{name}.png", "samples")
    return {f"{name}_fd": table[name]["fd"] for name in EVAL_MODELS}


def render_markdown(c: dict) -> str:
    s = c["settings"]
    lines = [
        "# DeMe comparison",
        "",
        f"N = {s['num_ranges']} ranges x {s['finetune_steps_per_range']} steps vs. shared fine-tune of "
        f"{s['shared_steps']} steps (equal compute). {s['num_samples']} samples per model, DDIM {s['ddim_steps']} "
        "steps, identical initial noise for every model. Features: digit classifier "
        f"(held-out accuracy {s['classifier_heldout_accuracy']:.3f}).",
        "",
        f"| model | FD | KID | FD vs shared | KID vs shared | FD at n={c['floor']['num_samples']} | class TV "
        "| mean confidence |",
        "|---|---|---|---|---|---|---|---|",
    ]
    pct = lambda v: "–" if v is None else f"{100 * v:+.1f}%"  # noqa: E731
    for name in EVAL_MODELS:
        r = c[name]
        lines.append(
            f"| {name} | {r['fd']:.4f} | {r['kid']:.5f} | {pct(r['fd_vs_shared'])} | {pct(r['kid_vs_shared'])} "
            f"| {r['fd_at_floor_n']:.4f} | {r['class_tv_distance']:.3f} | {r['mean_confidence']:.3f} |"
        )
    f = c["floor"]
    lines += [
        f"| real held-out vs train (floor) | | | | | {f['fd']:.4f} (KID {f['kid']:.5f}) | | |",
        "",
        f"Merge: {s['merge_method']} with weights {[round(w, 4) for w in s['merge_weights']]}.",
        "",
        f"MLflow parent run: `{c['mlflow']['parent_run_id']}`.",
        "",
    ]
    return "\n".join(lines)
