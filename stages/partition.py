"""DVC stage partition: the N timestep ranges that tile [0, T) -> partition/ranges.json.

``partition.boundaries`` win; otherwise ``partition.method`` chooses:
uniform (the paper's split), snr (equal widths in log-SNR, from the
pretrained model's noise schedule) or affinity (the pretrained model's
gradient affinity between timestep bins, partitioned into N contiguous
intervals by dynamic programming). partition/analysis/ holds the affinity
matrix and its picture for the affinity method.
"""

from __future__ import annotations

import sys

import numpy as np

from dtm_core import data as data_mod
from dtm_core.config import Params
from dtm_core.io import atomic_dir, write_json
from dtm_core.partition import ranges_from_params, save_partition, snr_ranges, uniform_ranges
from dtm_core.seeding import derive_seed
from dtm_core.tracking import NullRun
from stages.common import DATA_DIR, PARTITION_ANALYSIS_DIR, PARTITION_FILE, PRETRAINED_DIR, main


def affinity_partition(params: Params, out_dir, run) -> list:
    """Gradient-affinity interval clustering of the pretrained model; writes the matrix and its plot."""
    from dtm_core.affinity import gradient_affinity
    from dtm_core.model import load_scheduler, load_unet
    from dtm_core.partition import best_intervals, bin_edges_to_ranges, partition_score
    from dtm_core.plots import plot_affinity

    pc, T = params.partition, params.model.num_train_timesteps
    images = data_mod.load_split(DATA_DIR, "train").images[: pc.affinity_images]
    res = gradient_affinity(load_unet(PRETRAINED_DIR, what="pretrained model"), load_scheduler(PRETRAINED_DIR),
                            images, pc.bins, derive_seed(params.seed, "affinity"), pc.sketch_dim)
    A = res["affinity"]
    edges = best_intervals(A, params.num_ranges, pc.min_width)
    ranges = bin_edges_to_ranges(edges, T, pc.bins)
    uniform_edges = [round(i * pc.bins / params.num_ranges) for i in range(params.num_ranges + 1)]
    scores = {"chosen": partition_score(A, edges), "uniform": partition_score(A, uniform_edges)}
    write_json(out_dir / "affinity.json", {"affinity": np.round(A, 6).tolist(), "bin_edges": res["bin_edges"],
                                           "grad_norms": res["grad_norms"], "chosen_bin_edges": edges,
                                           "score": scores})
    plot_affinity(A, res["bin_edges"], ranges, out_dir / "affinity.png")
    run.log_metrics({"score_chosen": scores["chosen"], "score_uniform": scores["uniform"]})
    return ranges


def partition(params: Params, run=NullRun()) -> dict:
    pc, T = params.partition, params.model.num_train_timesteps
    method = "boundaries" if pc.boundaries is not None else pc.method
    with atomic_dir(PARTITION_ANALYSIS_DIR) as tmp:
        if method in ("boundaries", "uniform"):
            ranges = ranges_from_params(params)
        elif method == "snr":
            from dtm_core.model import load_scheduler

            ranges = snr_ranges(load_scheduler(PRETRAINED_DIR).alphas_cumprod, params.num_ranges)
        else:
            ranges = affinity_partition(params, tmp, run)
        write_json(tmp / "method.json", {"method": method, "ranges": [list(r) for r in ranges],
                                         "uniform": [list(r) for r in uniform_ranges(T, len(ranges))]})
    save_partition(PARTITION_FILE, ranges, T, method=method)
    if (PARTITION_ANALYSIS_DIR / "affinity.png").exists():
        run.log_artifact(PARTITION_ANALYSIS_DIR / "affinity.png", "partition")
    run.set_tags({"dtm.partition_method": method, "dtm.boundaries": [lo for lo, _ in ranges] + [T]})
    return {"num_ranges": len(ranges)}


if __name__ == "__main__":
    sys.exit(main("partition", partition))
