"""DVC stage merge_weights: the weights w_1..w_N the merge uses -> merge/weights.json (+ merge/search/).

``merge.search.strategy: none`` passes ``merge.weights`` (or uniform 1/N)
through. ``grid``, ``coordinate`` and ``cmaes`` score candidate merges by FD
on one fixed bank of validation noise (common random numbers; its own seed,
never the test noise) in the classifier's feature space, optionally by
successive halving (``cheap_samples``, then the best ``rescore_top`` at full
size). ``distill`` learns the weights by matching each range model on its
own timesteps (no sampling), then scores the result once. merge/weights.json
is the one record of the weights a run merged with.
"""

from __future__ import annotations

import sys
import time

from dtm_core import distances, features
from dtm_core.config import Params
from dtm_core.io import atomic_dir, write_json
from dtm_core.merge_search import search_weights, write_candidates_tsv
from dtm_core.model import load_scheduler
from dtm_core.partition import load_partition
from dtm_core.plots import plot_search
from dtm_core.sampling import initial_noise, state_scorer
from dtm_core.seeding import derive_seed
from dtm_core.tracking import NullRun
from stages.common import (
    CLASSIFIER_DIR,
    DATA_DIR,
    PARTITION_FILE,
    PRETRAINED_DIR,
    SEARCH_DIR,
    WEIGHTS_FILE,
    load_reference,
    main,
    range_dir,
    validation_reference,
)
from stages.merge import merge_inputs, merged_state


def validation_scorer(params: Params, template, base, files, num_samples: int):
    """Validation FD of a merge: the first ``num_samples`` of one fixed validation noise bank, classifier features."""
    sc = params.merge.search
    clf = features.load_classifier(CLASSIFIER_DIR / "classifier")
    ref = validation_reference(load_reference())
    cfg = template.config
    bank = initial_noise(derive_seed(params.evaluate.seed, "validation"), sc.num_samples,
                         (cfg.in_channels, cfg.sample_size, cfg.sample_size))
    score_state = state_scorer(template, load_scheduler(PRETRAINED_DIR), bank[:num_samples], sc.sampling_steps,
                               sc.sampler, params.evaluate.batch_size,
                               lambda images: distances.frechet_distance(features.extract_features(clf, images), ref))

    def score(weights: list[float], block_weights: dict | None = None) -> float:
        return score_state(merged_state(params, base, files, weights, block_weights),
                           desc=f"search {[round(w, 3) for w in weights]}")

    return score


def distill(params: Params, template, base, files, ranges, start: list[float], run) -> dict:
    from dtm_core import data as data_mod
    from dtm_core.merge_distill import distill_weights
    from dtm_core.model import load_unet
    from dtm_core.task_vector import TaskVector

    sc = params.merge.search
    taus = [TaskVector.load(f).vector for f in files]
    teachers = [load_unet(range_dir(i), what=f"range model {i}") for i in range(len(ranges))]
    res = distill_weights(template, base, taus, teachers, load_scheduler(PRETRAINED_DIR),
                          data_mod.load_split(DATA_DIR, "train").images, ranges, start, steps=sc.distill_steps,
                          lr=sc.distill_lr, batch_size=sc.distill_batch_size, per_block=sc.per_block,
                          seed=derive_seed(params.seed, "distill"))
    run.log_curve("distill/loss", list(enumerate(res["losses"])))
    return res


def merge_weights(params: Params, run=NullRun()) -> dict:
    ranges, _ = load_partition(PARTITION_FILE)
    n, sc = len(ranges), params.merge.search
    weights, block_weights, record = params.merge_weights, None, {"strategy": sc.strategy}
    start = time.perf_counter()
    with atomic_dir(SEARCH_DIR) as tmp:
        if sc.strategy != "none":
            template, base, files = merge_inputs(n)
            score = validation_scorer(params, template, base, files, sc.num_samples)
            if sc.strategy == "distill":
                res = distill(params, template, base, files, ranges, weights, run)
                weights, block_weights = res["weights"], res.get("block_weights")
                record.update({"evaluations": 1, "best_score": score(weights, block_weights),
                               "final_distill_loss": res["losses"][-1]})
            else:
                cheap = None
                if sc.cheap_samples is not None:
                    cheap = validation_scorer(params, template, base, files, sc.cheap_samples)
                result = search_weights(n, score, sc, start=weights, cheap_score=cheap,
                                        seed=derive_seed(params.seed, "search"))
                weights = list(result.best_weights)
                write_candidates_tsv(result, tmp / "search.tsv")
                plot_search(result, tmp / "search.png")
                run.log_curve("search/score", [(c["index"], c["score"]) for c in result.candidates])
                record.update({"evaluations": result.evaluations, "best_score": result.best_score,
                               "full_evaluations": sum(c["fidelity"] == "full" for c in result.candidates)})
            record.update({"num_samples": sc.num_samples, "sampler": sc.sampler, "sampling_steps": sc.sampling_steps,
                           "cheap_samples": sc.cheap_samples})
        write_json(tmp / "search.json", record)
    run.log_metrics({"search_seconds": time.perf_counter() - start})
    out = {"weights": weights, "search": record}
    if block_weights is not None:
        out["block_weights"] = block_weights
    write_json(WEIGHTS_FILE, out)
    run.log_artifact(WEIGHTS_FILE, "merge")
    for name in ("search.tsv", "search.png"):
        if (SEARCH_DIR / name).exists():
            run.log_artifact(SEARCH_DIR / name, "merge")
    return {f"weight_{i}": w for i, w in enumerate(weights)}


if __name__ == "__main__":
    sys.exit(main("merge_weights", merge_weights))
