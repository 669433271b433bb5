"""DVC stage partition: the N timestep ranges that tile [0, T) -> partition/ranges.json."""

from __future__ import annotations

import sys

from dtm_core.config import Params
from dtm_core.partition import ranges_from_params, save_partition
from dtm_core.tracking import NullRun
from stages.common import PARTITION_FILE, main


def partition(params: Params, run=NullRun()) -> dict:
    ranges = ranges_from_params(params)
    save_partition(PARTITION_FILE, ranges, params.model.num_train_timesteps)
    run.set_tags({"dtm.boundaries": [lo for lo, _ in ranges] + [ranges[-1][1]]})
    return {"num_ranges": len(ranges)}


if __name__ == "__main__":
    sys.exit(main("partition", partition))
