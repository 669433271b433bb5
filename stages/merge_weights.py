"""DVC stage merge_weights: the weights w_1..w_N the merge uses -> merge/weights.json (+ merge/search/).

``merge.search.strategy: none`` passes ``merge.weights`` (or uniform 1/N)
through; a search scores candidate merges by FD on validation samples drawn
from noise of their own seed (never the test noise), in the classifier's
feature space, and keeps the best. ``merge/weights.json`` is the one record
of the weights a run merged with.
"""

from __future__ import annotations

import sys

from dtm_core import distances, features
from dtm_core.config import Params
from dtm_core.io import atomic_dir, write_json
from dtm_core.merge_search import search_weights, write_candidates_tsv
from dtm_core.model import load_scheduler
from dtm_core.partition import load_partition
from dtm_core.plots import plot_search
from dtm_core.sampling import initial_noise, sample
from dtm_core.seeding import derive_seed
from dtm_core.tracking import NullRun
from stages.common import CLASSIFIER_DIR, PARTITION_FILE, PRETRAINED_DIR, SEARCH_DIR, WEIGHTS_FILE, load_reference, main
from stages.merge import merge_inputs, merged_state


def validation_scorer(params: Params, n: int):
    """Validation FD of the merge with given weights: its own noise seed, classifier features."""
    sc = params.merge.search
    template, base, files = merge_inputs(n)
    scheduler = load_scheduler(PRETRAINED_DIR)
    clf = features.load_classifier(CLASSIFIER_DIR / "classifier")
    ref = load_reference()["train_classifier"]
    cfg = template.config
    noise = initial_noise(derive_seed(params.evaluate.seed, "validation"), sc.num_samples,
                          (cfg.in_channels, cfg.sample_size, cfg.sample_size))
    full = template.state_dict()

    def score(weights: list[float]) -> float:
        full.update(merged_state(params, base, files, weights))
        template.load_state_dict(full)
        images = sample([template], scheduler, noise, sc.ddim_steps, batch_size=params.evaluate.batch_size,
                        desc=f"search {[round(w, 3) for w in weights]}")
        return distances.frechet_distance(features.extract_features(clf, images), ref)

    return score


def merge_weights(params: Params, run=NullRun()) -> dict:
    ranges, _ = load_partition(PARTITION_FILE)
    n, sc = len(ranges), params.merge.search
    weights, record = params.merge_weights, {"strategy": sc.strategy}
    with atomic_dir(SEARCH_DIR) as tmp:
        if sc.strategy != "none":
            result = search_weights(n, validation_scorer(params, n), sc, start=weights)
            weights = list(result.best_weights)
            write_candidates_tsv(result, tmp / "search.tsv")
            plot_search(result, tmp / "search.png")
            run.log_curve("search/score", [(c["index"], c["score"]) for c in result.candidates])
            record.update({"evaluations": result.evaluations, "best_score": result.best_score,
                           "num_samples": sc.num_samples, "ddim_steps": sc.ddim_steps})
        write_json(tmp / "search.json", record)
    write_json(WEIGHTS_FILE, {"weights": weights, "search": record})
    run.log_artifact(WEIGHTS_FILE, "merge")
    if sc.strategy != "none":
        for name in ("search.tsv", "search.png"):
            run.log_artifact(SEARCH_DIR / name, "merge")
    return {f"weight_{i}": w for i, w in enumerate(weights)}


if __name__ == "__main__":
    sys.exit(main("merge_weights", merge_weights))
