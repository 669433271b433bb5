"""Merge-weight search strategies against the full grid, on the default run's task vectors.

    python benchmarks/merge_search.py                    # after dvc repro: models, task vectors, classifier
    python benchmarks/merge_search.py --val-samples 500 --rescore-samples 2000

1. The full grid over merge.search.values (5^N candidates for N ranges) is
   scored on one fixed bank of validation noise (``--val-samples`` samples,
   ``--steps`` of merge.search.sampler; common random numbers, a seed of its own). Scores are
   cached in .dtm/cache/, keyed by the task vectors' digest and the budget,
   so the grid runs once.
2. Does validation transfer? The grid's best ``--top`` candidates by
   validation are scored on the test noise exactly as evaluate@merged scores
   a model (evaluate.num_samples, evaluate.sampler, evaluate.sampling_steps); Spearman's rank
   correlation between their validation and test FDs is reported, with the
   same at ``--rescore-samples`` validation samples (the successive-halving
   budget).
3. coordinate, cmaes (both with successive halving: ``--val-samples`` for
   every candidate, the best five re-scored at ``--rescore-samples``) and
   distill run as the merge_weights stage runs them; each reports its
   evaluations, best validation score, the test FD of its chosen weights and
   its wall time.

Writes docs/results/merge_search.json and prints a table. Target: within 1%
of the grid's best test FD using at most 10% of its evaluations.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dtm_core import distances, features  # noqa: E402
from dtm_core.config import load_params  # noqa: E402
from dtm_core.io import dir_digest, write_json  # noqa: E402
from dtm_core.merge_search import search_weights  # noqa: E402
from dtm_core.model import load_scheduler  # noqa: E402
from dtm_core.partition import load_partition  # noqa: E402
from dtm_core.sampling import initial_noise, sample  # noqa: E402
from dtm_core.seeding import derive_seed  # noqa: E402
from dtm_core.tracking import NullRun  # noqa: E402
from stages.common import (  # noqa: E402
    CLASSIFIER_DIR,
    PARTITION_FILE,
    PRETRAINED_DIR,
    TASK_VECTOR_DIR,
    load_reference,
)
from stages.evaluate import noise_seed  # noqa: E402
from stages.merge import merge_inputs, merged_state  # noqa: E402


class Scorer:
    """FD of a merge on the first n noises of a bank (validation or test), in classifier features."""

    def __init__(self, params, template, base, files, bank: torch.Tensor, steps: int, sampler: str,
                 reference: np.ndarray, clf):
        self.params, self.template, self.base, self.files = params, template, base, files
        self.bank, self.steps, self.sampler, self.reference, self.clf = bank, steps, sampler, reference, clf
        self.scheduler = load_scheduler(PRETRAINED_DIR)
        self.full = template.state_dict()
        self.calls = 0

    def __call__(self, weights, n: int, block_weights=None) -> float:
        self.calls += 1
        self.full.update(merged_state(self.params, self.base, self.files, list(weights), block_weights))
        self.template.load_state_dict(self.full)
        images = sample([self.template], self.scheduler, self.bank[:n], self.steps, batch_size=1000, desc="merge",
                        sampler=self.sampler)
        return distances.frechet_distance(features.extract_features(self.clf, images), self.reference)


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--val-samples", type=int, default=500)
    ap.add_argument("--rescore-samples", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=None,
                    help="validation sampling steps (default merge.search.sampling_steps)")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "merge_search.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    params = load_params(ROOT / "params.yaml")
    sc, ev = params.merge.search, params.evaluate
    args.steps = args.steps or sc.sampling_steps
    ranges, _ = load_partition(PARTITION_FILE)
    n = len(ranges)
    template, base, files = merge_inputs(n)
    clf = features.load_classifier(CLASSIFIER_DIR / "classifier")
    ref = load_reference()
    shape = (template.config.in_channels, template.config.sample_size, template.config.sample_size)
    val_bank = initial_noise(derive_seed(ev.seed, "validation"), max(args.val_samples, args.rescore_samples), shape)
    test_bank = initial_noise(noise_seed(params, 0), ev.num_samples, shape)
    val = Scorer(params, template, base, files, val_bank, args.steps, sc.sampler, ref["train_classifier"], clf)
    test = Scorer(params, template, base, files, test_bank, ev.sampling_steps, ev.sampler, ref["train"], clf)

    # 1. the full grid, cached
    key = hashlib.sha256(json.dumps([dir_digest(TASK_VECTOR_DIR), sc.values, args.val_samples, args.steps, sc.sampler,
                                     params.merge.method, ev.seed]).encode()).hexdigest()[:16]
    cache = ROOT / ".dtm" / "cache" / f"merge-grid-{key}.json"
    grid = json.loads(cache.read_text()) if cache.is_file() else None
    if grid is None:
        start, scores = time.perf_counter(), []
        for i, w in enumerate(itertools.product(sc.values, repeat=n)):
            scores.append({"weights": list(w), "score": val(w, args.val_samples)})
            if i % 50 == 0:
                print(f"grid {i}/{len(sc.values) ** n}", flush=True)
        grid = {"scores": scores, "seconds": time.perf_counter() - start}
        write_json(cache, grid)
    ranked = sorted(grid["scores"], key=lambda c: c["score"])
    top = ranked[: args.top]
    # 2. does validation transfer?
    top_test = [test(c["weights"], ev.num_samples) for c in top]
    top_rescored = [val(c["weights"], args.rescore_samples) for c in top]
    transfer = {
        "candidates": [{"weights": c["weights"], "val_fd": c["score"], "val_fd_rescored": r, "test_fd": t}
                       for c, r, t in zip(top, top_rescored, top_test)],
        "spearman_val_vs_test": spearman([c["score"] for c in top], top_test),
        "spearman_rescored_vs_test": spearman(top_rescored, top_test),
    }
    grid_best_test = top_test[0]
    uniform = [1.0 / n] * n
    result = {
        "settings": {"values": sc.values, "n": n, "val_samples": args.val_samples,
                     "rescore_samples": args.rescore_samples, "sampler": sc.sampler, "sampling_steps": args.steps,
                     "test_samples": ev.num_samples, "test_sampler": ev.sampler,
                     "test_sampling_steps": ev.sampling_steps},
        "grid": {"evaluations": len(grid["scores"]), "best_weights": top[0]["weights"],
                 "best_val_fd": top[0]["score"], "best_test_fd": grid_best_test,
                 "best_test_fd_of_top": min(top_test), "seconds": grid["seconds"]},
        "uniform": {"weights": uniform, "test_fd": test(uniform, ev.num_samples)},
        "transfer": transfer,
    }
    # 3. the strategies, as merge_weights runs them
    for strategy, budget in (("coordinate", 24), ("cmaes", 48)):
        cfg = sc.model_copy(update={"strategy": strategy, "max_evaluations": budget,
                                    "num_samples": args.rescore_samples, "cheap_samples": args.val_samples,
                                    "rescore_top": args.top})
        val.calls = 0
        start = time.perf_counter()
        res = search_weights(n, lambda w: val(w, args.rescore_samples), cfg, start=params.merge_weights,
                             cheap_score=lambda w: val(w, args.val_samples), seed=derive_seed(params.seed, "search"))
        seconds = time.perf_counter() - start
        cheap = sum(c["fidelity"] == "cheap" for c in res.candidates)
        full = res.evaluations - cheap
        result[strategy] = {"evaluations": res.evaluations, "cheap_evaluations": cheap, "full_evaluations": full,
                            "cost_in_cheap_evaluations": cheap + full * args.rescore_samples / args.val_samples,
                            "weights": res.best_weights, "val_fd": res.best_score, "seconds": seconds,
                            "test_fd": test(res.best_weights, ev.num_samples)}
    from stages.merge_weights import distill

    start = time.perf_counter()
    d = distill(params, template, base, files, ranges, params.merge_weights, NullRun())
    seconds = time.perf_counter() - start
    result["distill"] = {"evaluations": 0, "weights": d["weights"], "seconds": seconds,
                         "val_fd": val(d["weights"], args.rescore_samples),
                         "test_fd": test(d["weights"], ev.num_samples), "final_distill_loss": d["losses"][-1]}
    for name in ("coordinate", "cmaes", "distill"):
        r = result[name]
        r["test_fd_vs_grid_best"] = r["test_fd"] / grid_best_test - 1.0
        r["evaluation_share_of_grid"] = r.get("cost_in_cheap_evaluations", 0) / len(grid["scores"])
    write_json(args.out, result)
    print(f"\n{'strategy':<11} {'evaluations':>11} {'share':>6} {'val FD':>8} {'test FD':>8} {'vs grid':>8} "
          f"{'seconds':>8}  weights")
    print(f"{'grid':<11} {len(grid['scores']):>11} {1:>6.0%} {top[0]['score']:>8.4f} {grid_best_test:>8.4f} "
          f"{0:>+8.1%} {grid['seconds']:>8.0f}  {top[0]['weights']}")
    for name in ("coordinate", "cmaes", "distill"):
        r = result[name]
        print(f"{name:<11} {r['evaluations']:>11} {r['evaluation_share_of_grid']:>6.1%} {r['val_fd']:>8.4f} "
              f"{r['test_fd']:>8.4f} {r['test_fd_vs_grid_best']:>+8.1%} {r['seconds']:>8.0f}  "
              f"{[round(w, 3) for w in r['weights']]}")
    print(f"uniform weights: test FD {result['uniform']['test_fd']:.4f}")
    print(f"validation -> test rank correlation of the grid's top {args.top}: "
          f"{transfer['spearman_val_vs_test']:+.2f} at {args.val_samples} samples, "
          f"{transfer['spearman_rescored_vs_test']:+.2f} at {args.rescore_samples}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
