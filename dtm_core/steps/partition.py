"""partition: the N timestep ranges that tile [0, T)."""

from __future__ import annotations

from typing import Any

from ..config import Params
from ..partition import ranges_from_params, save_partition
from .common import PARTITION_FILE, NullRun


def partition(params: Params, run: Any = NullRun()) -> dict:
    ranges = ranges_from_params(params)
    save_partition(PARTITION_FILE, ranges, params.model.num_train_timesteps)
    return {"num_ranges": len(ranges), "ranges": [list(r) for r in ranges]}
