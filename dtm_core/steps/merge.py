"""merge: the task vectors merged back into one model, weights fixed or searched."""

from __future__ import annotations

from typing import Any

from .. import data as data_mod
from .. import metrics as metrics_mod
from ..config import Params, derive_seed
from ..io import atomic_dir, read_json, write_json
from ..merge import merge_files, parameter_distance
from ..merge_search import plot_search, search_weights, write_candidates_tsv
from ..model import load_scheduler, load_unet, pretrained_like, save_model
from ..partition import load_partition
from ..sampling import initial_noise, sample
from .common import (
    CLASSIFIER_DIR, DATA_DIR, MERGE_DIR, MERGED_DIR, PARTITION_FILE, PRETRAINED_DIR, TASK_VECTOR_DIR, NullRun,
    load_reference, range_dir,
)


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
    base = pretrained_like(PRETRAINED_DIR, template)
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
