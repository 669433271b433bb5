import pytest
import torch

from dtm_core.partition import (
    PartitionError,
    load_partition,
    range_of,
    sample_timesteps,
    save_partition,
    uniform_ranges,
    validate_ranges,
)


@pytest.mark.parametrize("T, n", [(1000, 1), (1000, 4), (1000, 8), (1000, 3), (7, 7), (1000, 1000)])
def test_uniform_ranges_tile_without_overlap(T, n):
    ranges = uniform_ranges(T, n)
    assert len(ranges) == n
    assert ranges[0][0] == 0 and ranges[-1][1] == T
    covered = [t for lo, hi in ranges for t in range(lo, hi)]
    assert covered == list(range(T))  # every t exactly once, in order


def test_paper_split():
    assert uniform_ranges(1000, 4) == [(0, 250), (250, 500), (500, 750), (750, 1000)]


@pytest.mark.parametrize(
    "ranges, message",
    [
        ([(0, 300), (250, 1000)], "overlaps"),
        ([(0, 200), (250, 1000)], "gap"),
        ([(0, 500), (500, 900)], "uncovered"),
        ([(0, 500), (500, 500), (500, 1000)], "empty"),
        ([], "at least one"),
    ],
)
def test_validate_ranges_rejects(ranges, message):
    with pytest.raises(PartitionError, match=message):
        validate_ranges(ranges, 1000)


def test_save_load_roundtrip(tmp_path):
    save_partition(tmp_path / "r.json", uniform_ranges(1000, 4), 1000)
    ranges, T = load_partition(tmp_path / "r.json")
    assert T == 1000 and ranges == uniform_ranges(1000, 4)


def test_range_of():
    ranges = uniform_ranges(1000, 4)
    assert [range_of(t, ranges) for t in (0, 249, 250, 999)] == [0, 0, 1, 3]
    with pytest.raises(PartitionError):
        range_of(1000, ranges)


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 1.0])
def test_probabilistic_sampling_honours_p(p):
    g = torch.Generator().manual_seed(0)
    lo, hi, T, trials = 250, 500, 1000, 4000
    n_global = 0
    for _ in range(trials):
        t, used_global = sample_timesteps(16, lo, hi, T, p, g)
        assert t.shape == (16,) and t.dtype == torch.long
        if used_global:
            n_global += 1
            assert ((t >= 0) & (t < T)).all()
        else:
            assert ((t >= lo) & (t < hi)).all()
    frac = n_global / trials
    sd = (p * (1 - p) / trials) ** 0.5
    assert abs(frac - p) <= 4 * sd + 1e-9


def test_global_batches_reach_outside_the_range():
    g = torch.Generator().manual_seed(1)
    outside = 0
    for _ in range(200):
        t, used_global = sample_timesteps(32, 0, 250, 1000, 1.0, g)
        outside += int((t >= 250).sum())
    assert outside > 0


def test_antithetic_pairs_mirror():
    g = torch.Generator().manual_seed(0)
    t, used_global = sample_timesteps(10, 250, 500, 1000, 0.0, g, antithetic=True)
    assert not used_global
    assert torch.equal(t[5:], 250 + 500 - 1 - t[:5])


def test_odd_batch_size_antithetic():
    g = torch.Generator().manual_seed(0)
    t, _ = sample_timesteps(7, 0, 10, 10, 0.0, g)
    assert t.shape == (7,)


# ------------------------------------------------------------ automatic partitions
import itertools  # noqa: E402

import numpy as np  # noqa: E402

from dtm_core.config import ModelConfig  # noqa: E402
from dtm_core.model import build_scheduler  # noqa: E402
from dtm_core.partition import (  # noqa: E402
    best_intervals,
    bin_edges_to_ranges,
    partition_score,
    snr_ranges,
)


def _brute_force(A, n, min_width):
    M = A.shape[0]
    best, best_edges = -np.inf, None
    for cuts in itertools.combinations(range(1, M), n - 1):
        edges = [0, *cuts, M]
        if min(b - a for a, b in zip(edges[:-1], edges[1:])) < min_width:
            continue
        score = partition_score(A, edges)
        if score > best + 1e-12:
            best, best_edges = score, edges
    return best, best_edges


@pytest.mark.parametrize("seed", range(12))
def test_dynamic_programming_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    M = int(rng.integers(5, 11))
    n = int(rng.integers(1, min(4, M) + 1))
    min_width = int(rng.integers(1, M // n + 1))
    X = rng.normal(size=(M, 3))
    A = X @ X.T / np.outer(np.linalg.norm(X, axis=1), np.linalg.norm(X, axis=1))
    edges = best_intervals(A, n, min_width)
    best, _ = _brute_force(A, n, min_width)
    assert partition_score(A, edges) == pytest.approx(best, abs=1e-12)
    widths = np.diff(edges)
    assert edges[0] == 0 and edges[-1] == M and len(edges) == n + 1 and widths.min() >= min_width


def test_dp_finds_planted_blocks_and_a_constant_affinity_is_neutral():
    blocks = [0] * 7 + [1] * 3 + [2] * 10
    A = np.array([[1.0 if a == b else -0.2 for b in blocks] for a in blocks])
    assert best_intervals(A, 3, 1) == [0, 7, 10, 20]
    flat = np.full((12, 12), 0.3) + 0.7 * np.eye(12)
    assert partition_score(flat, [0, 1, 12]) == pytest.approx(partition_score(flat, [0, 6, 12]))


def test_bins_to_ranges():
    assert bin_edges_to_ranges([0, 7, 10, 20], 1000, 20) == [(0, 350), (350, 500), (500, 1000)]


def test_snr_ranges_have_equal_log_snr_widths():
    alphas = build_scheduler(ModelConfig()).alphas_cumprod
    ranges = snr_ranges(alphas, 4)
    assert ranges[0][0] == 0 and ranges[-1][1] == 1000 and len(ranges) == 4
    log_snr = np.log((alphas / (1 - alphas)).double().numpy())
    spans = [log_snr[lo] - log_snr[hi - 1] for lo, hi in ranges]
    step = (log_snr[0] - log_snr[-1]) / 4
    assert all(abs(s - step) < 0.05 * step + 0.1 for s in spans)
    # the linear schedule's log-SNR falls fastest at low t: the low-t ranges are the narrow ones
    widths = [hi - lo for lo, hi in ranges]
    assert widths[0] < widths[-1]
    assert len(snr_ranges(alphas, 1000)) == 1000
