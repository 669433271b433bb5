"""DVC stage finetune_shared: the shared-parameter baseline -> models/shared/.

The paper's N = 1 row: the same optimiser recipe as the range models on all
of [0, T), plain eps-MSE, no projection, no consistency loss, for N x
``finetune.steps`` steps (equal compute) or ``finetune.shared_steps`` (its
own budget, e.g. an early stop chosen on validation noise by
benchmarks/shared_budget.py). ``finetune.shared_lr`` gives it a learning
rate of its own; ``finetune.weighting`` turns it into one of the
paper's Table 1 loss-reweighting baselines (SNR+1, truncated SNR,
Min-SNR-gamma, P2).
"""

from __future__ import annotations

import sys

from dtm_core.config import Params
from dtm_core.seeding import derive_seed
from dtm_core.tracking import NullRun
from dtm_core.train import train
from dtm_core.weighting import timestep_weights
from stages.common import SHARED_DIR, checkpoint_dir, log_data_version, main
from stages.finetune import finish, frozen_prompts, load_inputs, prompting, trainee


def train_shared(params: Params, images, base, scheduler, steps: int, **extra):
    """The shared baseline's training run of ``steps`` steps (``extra``: train()'s checkpoint/snapshot hooks).

    The stage and benchmarks/shared_budget.py (which scores its snapshots)
    both train through here, so the budget that benchmark picks is the model
    ``finetune.shared_steps`` then trains.
    """
    ft = params.finetune.shared
    weights = None
    if ft.weighting != "none":
        weights = timestep_weights(ft.weighting, scheduler.alphas_cumprod, ft.weighting_gamma)
    model = trainee(base, ft, projection=False) if ft.adapter == "lora" else frozen_prompts(base)
    return train(model, scheduler, images, ft, seed=derive_seed(params.seed, "finetune-shared"), steps=steps,
                 loss_weights=weights, desc="finetune shared", **prompting(base, ft), **extra)


def finetune_shared(params: Params, run=NullRun()) -> dict:
    ft = params.finetune.shared
    images, base, scheduler = load_inputs()
    ckpt = checkpoint_dir("finetune_shared", params)
    res = train_shared(params, images, base, scheduler, ft.shared_total_steps(params.num_ranges),
                       checkpoint_dir=ckpt, checkpoint_every=ft.checkpoint_every)
    info = {"baseline": "shared", "weighting": ft.weighting, "lr": ft.lr}
    log_data_version(run, params, "training")
    return finish(res, scheduler, SHARED_DIR, ckpt, info, run)


if __name__ == "__main__":
    sys.exit(main("finetune_shared", finetune_shared, trains=lambda params: True))
