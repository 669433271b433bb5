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
    """The paper's split: ``[(i-1)T/N, iT/N)`` for i = 1..N (integer bounds)."""
    if not 1 <= n <= T:
        raise PartitionError(f"N={n} ranges cannot split T={T} timesteps; need 1 <= N <= T")
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


def save_partition(path: str | Path, ranges: Sequence[Range], T: int) -> None:
    ranges = validate_ranges(ranges, T)
    write_json(path, {"num_train_timesteps": T, "num_ranges": len(ranges), "ranges": [list(r) for r in ranges]})


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
