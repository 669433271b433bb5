"""Search for merge weights: which w_1..w_N give the best merged model.

Pure bookkeeping: the caller supplies ``score(weights) -> float`` (lower is
better, e.g. the merged model's FD on a small validation sample) and this
module decides which weight vectors to score, remembers every candidate, and
reports the best. Each distinct weight vector is scored at most once.

- ``grid``: every combination of ``merge.search.values`` over the N ranges,
  in ``itertools.product`` order.
- ``coordinate``: coordinate descent from a start vector. A sweep visits the
  ranges from low t to high t; for each it tries every candidate value with
  the other weights held fixed and keeps the best. Sweeps repeat until one
  makes no improvement or ``max_evaluations`` distinct vectors were scored.
- ``cmaes``: CMA-ES (the maintained ``cma`` package) in the box spanned by
  ``merge.search.values``, from the start vector, within the budget.
- Successive halving (``cheap_score``): the strategy runs on a cheap score,
  and the best few candidates are re-scored at full size before one wins.

Ties go to the candidate scored first. Non-finite scores (a merge whose
samples diverged) are recorded as they are but rank as +inf.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from .errors import ConfigError
from .io import atomic_file

if TYPE_CHECKING:  # only its fields strategy, values and max_evaluations are read
    from .config import SearchConfig

ScoreFn = Callable[[list[float]], float]


@dataclass
class SearchResult:
    strategy: str
    candidates: list[dict] = field(default_factory=list)  # {"index", "weights", "score"} in evaluation order
    best_weights: list[float] = field(default_factory=list)
    best_score: float = math.inf
    evaluations: int = 0

    def to_rows(self) -> list[dict]:
        """One flat row per candidate: index, w0..w{N-1}, score, full (1 for a full-size score)."""
        return [{"index": c["index"], **{f"w{i}": w for i, w in enumerate(c["weights"])}, "score": c["score"],
                 "full": int(c.get("fidelity", "full") == "full")} for c in self.candidates]


def _rank(score: float) -> float:
    return score if math.isfinite(score) else math.inf


def best_candidate(candidates: list[dict]) -> dict | None:
    """The lowest-scoring candidate; among equals, the one scored first."""
    return min(candidates, key=lambda c: (_rank(c["score"]), c["index"]), default=None)


class _Scorer:
    """Memoised, budgeted calls of ``score``, recorded in order."""

    def __init__(self, score: ScoreFn, budget: int):
        self.score, self.budget = score, budget
        self.memo: dict[tuple[float, ...], float] = {}
        self.candidates: list[dict] = []

    @property
    def exhausted(self) -> bool:
        return len(self.candidates) >= self.budget

    def __call__(self, weights: Sequence[float]) -> float | None:
        """The score of ``weights`` (rank value); None when it is new and the budget is spent."""
        key = tuple(float(w) for w in weights)
        if key in self.memo:
            return self.memo[key]
        if self.exhausted:
            return None
        value = float(self.score(list(key)))
        self.candidates.append({"index": len(self.candidates), "weights": list(key), "score": value})
        self.memo[key] = _rank(value)
        return self.memo[key]


def _coordinate(scorer: _Scorer, cfg: SearchConfig, start: list[float]) -> None:
    current = list(start)
    current_rank = scorer(current)
    improved = True
    while improved and not scorer.exhausted:
        improved = False
        for i in range(len(current)):
            best_value, best_rank = current[i], current_rank
            for value in cfg.values:
                rank = scorer(current[:i] + [value] + current[i + 1 :])
                if rank is None:  # budget spent
                    break
                if rank < best_rank:
                    best_value, best_rank = value, rank
            if best_rank < current_rank:
                current[i], current_rank, improved = best_value, best_rank, True
            if scorer.exhausted:
                break


def _cmaes(scorer: _Scorer, cfg: SearchConfig, start: list[float], seed: int) -> None:
    """CMA-ES (pycma) over the box [min(values), max(values)]^N from ``start``, within the budget."""
    if len(start) == 1:  # CMA-ES needs two dimensions or more; a scalar is a coordinate search
        _coordinate(scorer, cfg, start)
        return
    import cma

    lo, hi = min(cfg.values), max(cfg.values)
    x0 = [min(max(w, lo), hi) for w in start]
    es = cma.CMAEvolutionStrategy(x0, cfg.cmaes_sigma, {"bounds": [lo, hi], "seed": seed + 1, "verbose": -9})
    while not es.stop() and not scorer.exhausted:
        xs = es.ask()
        ranks = []
        for x in xs:
            rank = scorer([round(float(v), 6) for v in x])
            if rank is None:  # budget spent mid-generation
                return
            ranks.append(rank if math.isfinite(rank) else 1e12)
        es.tell(xs, ranks)


def search_weights(n: int, score: ScoreFn, cfg: SearchConfig, start: Sequence[float],
                   cheap_score: ScoreFn | None = None, seed: int = 0) -> SearchResult:
    """Search merge weights for ``n`` ranges; ``score`` is lower-is-better.

    ``start`` (where coordinate descent and CMA-ES begin; merge.weights or
    uniform 1/N, one per range) is ignored by the grid, which the config keeps within
    ``max_evaluations``. With
    ``cheap_score`` (successive halving) the strategy runs on cheap scores,
    the best ``cfg.rescore_top`` candidates are re-scored with ``score``, and
    the best re-scored one wins; re-scores are recorded with fidelity "full".
    """
    scorer = _Scorer(cheap_score or score, cfg.max_evaluations)
    if cfg.strategy == "grid":
        for weights in itertools.product(cfg.values, repeat=n):
            scorer(weights)
    elif cfg.strategy == "coordinate":
        _coordinate(scorer, cfg, [float(w) for w in start])
    elif cfg.strategy == "cmaes":
        _cmaes(scorer, cfg, [float(w) for w in start], seed)
    else:
        raise ConfigError(f"merge.search.strategy '{cfg.strategy}' is unknown; choose one of grid, coordinate, cmaes")
    fidelity = "cheap" if cheap_score is not None else "full"
    candidates = [{**c, "fidelity": fidelity} for c in scorer.candidates]
    finalists = candidates
    if cheap_score is not None:
        top = sorted(candidates, key=lambda c: (_rank(c["score"]), c["index"]))[: cfg.rescore_top]
        finalists = [{"index": len(candidates) + j, "weights": c["weights"], "score": float(score(c["weights"])),
                      "fidelity": "full"} for j, c in enumerate(top)]
        candidates += finalists
    best = best_candidate(finalists)
    assert best is not None  # the start or the first grid point is always scored
    return SearchResult(
        strategy=cfg.strategy,
        candidates=candidates,
        best_weights=list(best["weights"]),
        best_score=best["score"],
        evaluations=len(candidates),
    )


def write_candidates_tsv(result: SearchResult, path: str | Path) -> None:
    """The candidates as TSV (index, w0..w{N-1}, score), e.g. for ``dvc plots``."""
    rows = result.to_rows()
    columns = list(rows[0]) if rows else ["index", "score"]
    with atomic_file(path) as handle:
        handle.write("\t".join(columns) + "\n")
        for row in rows:
            handle.write("\t".join(str(row[c]) if c in ("index", "full") else f"{row[c]:.6g}" for c in columns)
                         + "\n")
