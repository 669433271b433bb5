"""DVC stage analysis: the paper's analyses of a finished run -> analysis/.

- **Loss along the task vector** (``analysis.lambdas``): the held-out eps-MSE
  of theta + lambda tau for each range's task vector and for the shared
  fine-tune's, on evaluate's held-out images, timesteps and noise (so lambda =
  1 of the shared fine-tune is its ``heldout_loss``; ``analysis.heldout_images``
  takes fewer), over all of [0, T) and, for a range, over its own timesteps.
- **Gradient conflict** (``analysis.gradient_bins``, paper Fig. 1): the
  bins x bins cosine of the eps-loss gradients of the pretrained and of the
  merged model, with the mean cosine between different bins of each.

Fig. 6b (task-vector norms and cosines) is the task_vectors stage's. With no
lambdas and no bins (the digits default) it writes an empty summary.
"""

from __future__ import annotations

import sys

import numpy as np

from dtm_core import data as data_mod
from dtm_core.config import Params
from dtm_core.denoising import heldout_losses
from dtm_core.io import atomic_dir, write_json
from dtm_core.model import float_state, load_scheduler, load_unet, pretrained_like
from dtm_core.partition import load_partition, range_columns
from dtm_core.task_vector import TaskVector
from dtm_core.tracking import NullRun
from stages.common import (
    ANALYSIS_DIR,
    DATA_DIR,
    MERGED_DIR,
    PARTITION_FILE,
    PRETRAINED_DIR,
    SHARED_DIR,
    TASK_VECTOR_DIR,
    main,
    range_dir,
)


def loss_along_tau(params: Params, ranges) -> dict:
    """Held-out loss of theta + lambda tau per source (range i, shared) and lambda; λ = 0 is the base for all."""
    scheduler = load_scheduler(PRETRAINED_DIR)
    images = data_mod.load_split(DATA_DIR, "heldout").images[: params.analysis.heldout_images
                                                              or params.evaluate.heldout_images]
    sources = {f"range-{i}": (load_unet(range_dir(i), what=f"range model {i}"),
                              TaskVector.load(TASK_VECTOR_DIR / f"range-{i}.safetensors")) for i in range(len(ranges))}
    shared = load_unet(SHARED_DIR, what="shared model")
    sources["shared"] = (shared, TaskVector.from_states(float_state(load_unet(PRETRAINED_DIR)), float_state(shared)))
    out = {"lambdas": list(params.analysis.lambdas), "sources": {}}
    at_zero = None  # lambda = 0 is the base for every source: scored once
    for name, (template, tau) in sources.items():
        base = pretrained_like(PRETRAINED_DIR, template)
        rows = {"all_t": []}
        for lam in params.analysis.lambdas:
            if lam == 0 and at_zero is not None:
                res = at_zero
            else:
                template.load_state_dict({**template.state_dict(), **tau.apply_to(base, lam)})
                res = heldout_losses(params.evaluate, [template], None, scheduler, images)
                at_zero = res if lam == 0 else at_zero
            rows["all_t"].append(float(res["losses"].mean()))
            if name != "shared":
                cols = range_columns(res["timesteps"], ranges)[int(name.split("-")[1])]
                rows.setdefault("own_range", []).append(float(res["losses"][:, cols].mean()))
        out["sources"][name] = rows
    return out


def gradient_conflict(params: Params, ranges, tmp) -> dict:
    """The gradient-affinity matrix of the pretrained and the merged model (same images, bins, sketch)."""
    from dtm_core.affinity import gradient_affinity
    from dtm_core.plots import plot_affinity

    pc, bins = params.partition, params.analysis.gradient_bins
    images = data_mod.load_split(DATA_DIR, "train").images[: pc.affinity_images]
    scheduler = load_scheduler(PRETRAINED_DIR)
    out = {}
    for name, path in (("pretrained", PRETRAINED_DIR), ("merged", MERGED_DIR)):
        res = gradient_affinity(load_unet(path, what=f"{name} model"), scheduler, images, bins,
                                params.seed, pc.sketch_dim)
        A = res["affinity"]
        off = A[~np.eye(len(A), dtype=bool)]
        out[name] = {"affinity": np.round(A, 6).tolist(), "bin_edges": res["bin_edges"],
                     "mean_cosine_between_bins": float(off.mean()), "negative_share": float((off < 0).mean())}
        plot_affinity(A, res["bin_edges"], ranges, tmp / f"gradient_conflict_{name}.png")
    return out


def analyse(params: Params, run=NullRun()) -> dict:
    ranges, _ = load_partition(PARTITION_FILE)
    summary, metrics = {}, {}
    with atomic_dir(ANALYSIS_DIR) as tmp:
        if params.analysis.lambdas:
            summary["loss_along_tau"] = loss_along_tau(params, ranges)
        if params.analysis.gradient_bins:
            summary["gradient_conflict"] = conflict = gradient_conflict(params, ranges, tmp)
            metrics = {f"mean_gradient_cosine_{k}": v["mean_cosine_between_bins"] for k, v in conflict.items()}
        write_json(tmp / "summary.json", summary)
    for path in sorted(ANALYSIS_DIR.iterdir()):
        run.log_artifact(path, "analysis")
    return metrics


if __name__ == "__main__":
    sys.exit(main("analysis", analyse))
