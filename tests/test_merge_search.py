import math

import pytest
from PIL import Image

from dtm_core.config import SearchConfig
from dtm_core.merge_search import SearchResult, search_weights, write_candidates_tsv
from dtm_core.plots import plot_search

VALUES = [0.0, 0.25, 0.5, 0.75, 1.0]


def _bowl(target, coupling=0.0):
    """A quadratic bowl with its minimum (0) at ``target``; coupling > 0 makes it non-separable."""
    calls = []

    def score(w):
        calls.append(list(w))
        d = [wi - ti for wi, ti in zip(w, target)]
        return sum(x * x for x in d) + coupling * d[0] * d[1]

    return score, calls


def _cfg(**kw):
    return SearchConfig(**{"values": VALUES, "strategy": "coordinate", **kw})


def test_grid_finds_exact_optimum_in_product_order():
    score, calls = _bowl([0.25, 0.75, 0.5])
    res = search_weights(3, score, _cfg(strategy="grid", max_evaluations=125), start=[1 / 3] * 3)
    assert res.best_weights == [0.25, 0.75, 0.5] and res.best_score == 0.0
    assert res.evaluations == len(calls) == 125
    assert res.candidates[0]["weights"] == [0.0, 0.0, 0.0]
    assert res.candidates[1]["weights"] == [0.0, 0.0, 0.25]
    assert res.candidates[-1]["weights"] == [1.0, 1.0, 1.0]


def test_coordinate_finds_optimum_of_separable_bowl():
    target = [0.25, 1.0, 0.0, 0.75]
    score, calls = _bowl(target)
    res = search_weights(4, score, _cfg(max_evaluations=100), start=[0.5] * 4)
    assert res.strategy == "coordinate"
    assert res.best_weights == target and res.best_score == 0.0
    assert res.candidates[0]["weights"] == [0.5] * 4  # the start is scored first
    # one sweep moves every coordinate to its optimum, a second confirms: far fewer than the grid's 625
    assert res.evaluations == len(calls) <= 1 + 2 * 4 * len(VALUES)


def test_coordinate_respects_budget():
    score, calls = _bowl([1.0, 1.0, 1.0], coupling=0.5)
    res = search_weights(3, score, _cfg(max_evaluations=7), start=[0.0, 0.0, 0.0])
    assert res.evaluations == len(calls) == 7
    assert res.best_score == min(c["score"] for c in res.candidates)


def test_memoised_candidates_are_scored_once():
    score, calls = _bowl([0.5, 0.5])
    # sweep 1: start + 4 new on range 0 (moves to 0.5) + 4 new on range 1 (moves to 0.5);
    # sweep 2: 4 new on range 0, range 1's line was all seen in sweep 1; no improvement, stop.
    # A budget of exactly 13 suffices only if repeats are not counted.
    res = search_weights(2, score, _cfg(max_evaluations=13), start=[0.0, 0.0])
    keys = [tuple(c) for c in calls]
    assert len(keys) == len(set(keys)) == res.evaluations == 13
    assert res.best_weights == [0.5, 0.5]


def test_candidate_bookkeeping():
    score, _ = _bowl([0.25, 0.5], coupling=0.3)
    res = search_weights(2, score, _cfg(max_evaluations=30), start=[1.0, 0.0])
    assert [c["index"] for c in res.candidates] == list(range(res.evaluations))
    for c in res.candidates:
        assert c["score"] == pytest.approx(score(c["weights"]))
    best = min(res.candidates, key=lambda c: c["score"])
    assert res.best_score == best["score"] and res.best_weights == best["weights"]


def test_ties_go_to_the_first_candidate():
    res = search_weights(2, lambda w: 1.0, _cfg(strategy="grid", max_evaluations=25), start=[0.5, 0.5])
    assert res.best_weights == [0.0, 0.0] and res.candidates[0]["weights"] == [0.0, 0.0]
    res = search_weights(2, lambda w: 1.0, _cfg(), start=[0.5, 0.5])
    assert res.best_weights == [0.5, 0.5]
    assert res.evaluations == 1 + 2 * (len(VALUES) - 1)  # no improvement: one sweep only


def test_non_finite_scores_rank_last():
    res = search_weights(1, lambda w: math.nan if w[0] == 0.0 else w[0], _cfg(strategy="grid"), start=[0.5])
    assert res.best_weights == [0.25]
    assert math.isnan(res.candidates[0]["score"])


def test_rows_tsv_and_plot(tmp_path):
    score, _ = _bowl([0.25, 0.75])
    res = search_weights(2, score, _cfg(max_evaluations=12), start=[0.5, 0.5])
    rows = res.to_rows()
    assert list(rows[0]) == ["index", "w0", "w1", "score", "full"]
    tsv = tmp_path / "search.tsv"
    write_candidates_tsv(res, tsv)
    lines = tsv.read_text().splitlines()
    assert lines[0] == "index\tw0\tw1\tscore\tfull"
    assert len(lines) == 1 + res.evaluations
    assert lines[1].split("\t") == ["0", "0.5", "0.5", f"{score([0.5, 0.5]):.6g}", "1"]
    png = tmp_path / "plots" / "search.png"
    plot_search(res, png)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0
    assert not list(png.parent.glob(".*tmp*"))


def test_plot_with_only_non_finite_scores(tmp_path):
    res = SearchResult("grid", [{"index": 0, "weights": [1.0], "score": math.inf}], [1.0], math.inf, 1)
    plot_search(res, tmp_path / "s.png")
    with Image.open(tmp_path / "s.png") as im:
        assert im.format == "PNG" and min(im.size) > 100


def test_cmaes_gets_close_to_the_optimum_within_the_budget():
    score, calls = _bowl([0.3, 0.8, 0.55, 0.1], coupling=0.5)
    res = search_weights(4, score, _cfg(strategy="cmaes", max_evaluations=120, cmaes_sigma=0.3), start=[0.25] * 4,
                         seed=7)
    assert len(calls) <= 120 and res.evaluations == len(calls)
    assert res.best_score < 0.01  # the uniform start scores about 0.57
    assert all(0.0 <= w <= 1.0 for c in res.candidates for w in c["weights"])  # inside the values' box
    again = search_weights(4, _bowl([0.3, 0.8, 0.55, 0.1], coupling=0.5)[0],
                           _cfg(strategy="cmaes", max_evaluations=120, cmaes_sigma=0.3), start=[0.25] * 4, seed=7)
    assert again.best_weights == res.best_weights  # seeded


def test_successive_halving_rescores_the_cheap_best_at_full_size():
    full_score, full_calls = _bowl([0.25, 0.75])
    # a cheap score with an offset that reorders candidates near the optimum
    cheap_score, cheap_calls = _bowl([0.5, 0.75])
    res = search_weights(2, full_score, _cfg(strategy="grid", max_evaluations=25, rescore_top=3), start=[0.5, 0.5],
                         cheap_score=cheap_score)
    assert len(cheap_calls) == 25 and len(full_calls) == 3
    cheap = [c for c in res.candidates if c["fidelity"] == "cheap"]
    full = [c for c in res.candidates if c["fidelity"] == "full"]
    assert len(cheap) == 25 and len(full) == 3
    top3 = sorted(cheap, key=lambda c: c["score"])[:3]
    assert [c["weights"] for c in full] == [c["weights"] for c in top3]
    # the winner is the best of the re-scored three at full size, not the cheap best
    assert res.best_score == min(c["score"] for c in full)
    assert res.best_weights == [0.25, 0.75]
