"""Timestep ranges over [0, T) and the per-range timestep sampler.

A partition is a list of half-open ranges ``[lo, hi)`` that covers [0, T)
without gaps or overlap, ordered from low t to high t.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .config import Params
from .errors import PartitionError
from .io import read_json, write_json

Range = tuple[int, int]


def uniform_ranges(T: int, n: int) -> list[Range]:
    """The paper's split: ``[(i-1)T/N, iT/N)`` for i = 1..N (integer bounds; the config keeps 1 <= N <= T)."""
    return [(i * T // n, (i + 1) * T // n) for i in range(n)]


def validate_ranges(ranges: Sequence[Sequence[int]], T: int) -> list[Range]:
    out = [(int(lo), int(hi)) for lo, hi in ranges]
    if not out:
        raise PartitionError("a partition needs at least one range")
    expected_lo = 0
    for i, (lo, hi) in enumerate(out):
        if hi <= lo:
            raise PartitionError(f"range {i} [{lo}, {hi}) is empty or reversed")
        if lo < expected_lo:
            raise PartitionError(f"range {i} [{lo}, {hi}) overlaps the range before it (which ends at {expected_lo})")
        if lo > expected_lo:
            raise PartitionError(f"range {i} [{lo}, {hi}) leaves the gap [{expected_lo}, {lo}) uncovered")
        expected_lo = hi
    if expected_lo != T:
        raise PartitionError(f"the ranges end at {expected_lo}, not at T={T}: [{expected_lo}, {T}) is uncovered")
    return out


def ranges_from_params(params: Params) -> list[Range]:
    T = params.model.num_train_timesteps
    if params.partition.boundaries is not None:
        b = params.partition.boundaries
        return validate_ranges(list(zip(b[:-1], b[1:])), T)
    return uniform_ranges(T, params.num_ranges)


def save_partition(path: str | Path, ranges: Sequence[Range], T: int, method: str = "uniform") -> None:
    ranges = validate_ranges(ranges, T)
    write_json(path, {"num_train_timesteps": T, "num_ranges": len(ranges), "method": method,
                      "ranges": [list(r) for r in ranges]})


def load_partition(path: str | Path) -> tuple[list[Range], int]:
    data = read_json(path, "partition file")
    try:
        T = int(data["num_train_timesteps"])
        return validate_ranges(data["ranges"], T), T
    except (KeyError, TypeError) as exc:
        raise PartitionError(f"partition file '{path}' is malformed ({exc}); re-run dvc repro partition") from exc


def range_of(t: int, ranges: Sequence[Range]) -> int:
    for i, (lo, hi) in enumerate(ranges):
        if lo <= t < hi:
            return i
    raise PartitionError(f"timestep {t} lies outside every range")


def sample_timesteps(
    batch_size: int,
    lo: int,
    hi: int,
    T: int,
    p: float,
    generator: torch.Generator,
    antithetic: bool = True,
) -> tuple[torch.Tensor, bool]:
    """DeMe's probabilistic timestep sampling (paper Eq. 6, authors' code).

    One coin per batch: with probability ``p`` the whole batch draws t from
    all of [0, T), otherwise from the model's own range [lo, hi). With
    ``antithetic`` half the batch is drawn and the other half mirrored as
    ``low + high - 1 - t``. Returns the timesteps and whether the batch
    used the full range.
    """
    use_global = bool(torch.rand((), generator=generator).item() < p)
    low, high = (0, T) if use_global else (lo, hi)
    if antithetic:
        half = (batch_size + 1) // 2
        t = torch.randint(low, high, (half,), generator=generator)
        t = torch.cat([t, low + high - 1 - t])[:batch_size]
    else:
        t = torch.randint(low, high, (batch_size,), generator=generator)
    return t.long(), use_global


def range_columns(timesteps: np.ndarray, ranges: Sequence[Range]) -> list[np.ndarray]:
    """For each range, the indices of the grid's timesteps inside it."""
    return [np.flatnonzero((timesteps >= lo) & (timesteps < hi)) for lo, hi in ranges]


# ------------------------------------------------------------ automatic partitions
def snr_ranges(alphas_cumprod: torch.Tensor, n: int) -> list[Range]:
    """N contiguous ranges of equal width in log-SNR, log SNR(t) = log(alpha_bar_t / (1 - alpha_bar_t)).

    log-SNR falls monotonically with t; the boundaries are the first
    timesteps below N - 1 equally spaced log-SNR levels between log SNR(0)
    and log SNR(T - 1). Where several levels fall between two adjacent
    timesteps the boundaries are spread so every range keeps at least one t.
    """
    a = alphas_cumprod.double()
    log_snr = torch.log(a / (1.0 - a)).numpy()
    T = len(log_snr)
    if np.any(np.diff(log_snr) >= 0):
        raise PartitionError(
            "the noise schedule's log-SNR is not strictly decreasing in t; use partition.method: uniform"
        )
    levels = np.linspace(log_snr[0], log_snr[-1], n + 1)[1:-1]
    cuts = [int(np.argmax(log_snr < level)) for level in levels]
    edges = [0]
    for i, c in enumerate(cuts):
        edges.append(min(max(c, edges[-1] + 1), T - (n - 1 - i)))  # keep every range non-empty
    edges.append(T)
    return validate_ranges(list(zip(edges[:-1], edges[1:])), T)


def _block_sums(A: np.ndarray) -> np.ndarray:
    """2-D prefix sums: S[a, b] - ... gives any square block's sum in O(1)."""
    S = np.zeros((A.shape[0] + 1, A.shape[1] + 1))
    S[1:, 1:] = A.cumsum(0).cumsum(1)
    return S


def interval_affinity(S: np.ndarray, lo: int, hi: int) -> float:
    """Sum of A over the bins [lo, hi) x [lo, hi), divided by the interval's width."""
    total = S[hi, hi] - S[lo, hi] - S[hi, lo] + S[lo, lo]
    return float(total / (hi - lo))


def partition_score(A: np.ndarray, edges: Sequence[int]) -> float:
    """The mean within-interval affinity of the bin partition ``edges`` ([0, e1, ..., M]).

    For each bin, the mean affinity to the bins of its own interval (itself
    included), averaged over all bins: (1/M) * sum_k sum_{i,j in I_k} A_ij / |I_k|.
    A constant affinity scores the same for every partition; block structure
    is rewarded where the intervals follow the blocks.
    """
    S = _block_sums(np.asarray(A, dtype=np.float64))
    return sum(interval_affinity(S, lo, hi) for lo, hi in zip(edges[:-1], edges[1:])) / A.shape[0]


def best_intervals(A: np.ndarray, n: int, min_width: int = 1) -> list[int]:
    """The N contiguous bin intervals maximising :func:`partition_score`, by dynamic programming.

    O(N * M^2) over M bins. Returns the bin edges [0, e1, ..., M]; every
    interval holds at least ``min_width`` bins (the config checks that N of them fit).
    """
    A = np.asarray(A, dtype=np.float64)
    M = A.shape[0]
    if A.shape != (M, M):
        raise ValueError(f"the affinity matrix must be square (got {A.shape})")
    S = _block_sums(A)
    best = np.full((n + 1, M + 1), -np.inf)
    back = np.zeros((n + 1, M + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for k in range(1, n + 1):
        for hi in range(k * min_width, M - (n - k) * min_width + 1):
            for lo in range((k - 1) * min_width, hi - min_width + 1):
                if best[k - 1, lo] == -np.inf:
                    continue
                value = best[k - 1, lo] + interval_affinity(S, lo, hi)
                if value > best[k, hi]:
                    best[k, hi], back[k, hi] = value, lo
    edges = [M]
    for k in range(n, 0, -1):
        edges.append(int(back[k, edges[-1]]))
    return edges[::-1]


def bin_edges_to_ranges(edges: Sequence[int], T: int, bins: int) -> list[Range]:
    """Bin edges over ``bins`` equal bins of [0, T) to timestep ranges."""
    bounds = [round(e * T / bins) for e in edges]
    return validate_ranges(list(zip(bounds[:-1], bounds[1:])), T)
