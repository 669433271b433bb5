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


def test_uniform_rejects_bad_n():
    with pytest.raises(PartitionError):
        uniform_ranges(10, 11)
    with pytest.raises(PartitionError):
        uniform_ranges(10, 0)


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
