"""DVC stage finetune_shared: the shared-parameter baseline -> models/shared/.

The paper's N = 1 row: the range models' optimiser recipe but its own lr
(``finetune.shared_lr``, chosen on validation noise like theirs) on all of
[0, T), plain eps-MSE, no projection, no consistency loss, t drawn uniformly
and independently (``finetune.antithetic``'s mirrored draws are the range
models' and the soup's), for N x ``finetune.steps`` steps (equal steps: the
same batches seen; a DeMe step also runs the frozen base forward for its
consistency loss) or ``finetune.shared_steps`` (its
own budget, e.g. an early stop chosen on validation noise with
``python -m tools.sweep finetune.shared_steps ... -S evaluate.seed=1``). ``finetune.weighting`` turns it into one of the
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


def finetune_shared(params: Params, run=NullRun()) -> dict:
    ft = params.finetune.shared
    images, base, scheduler = load_inputs()
    ckpt = checkpoint_dir("finetune_shared", params)
    weights = None
    if ft.weighting != "none":
        weights = timestep_weights(ft.weighting, scheduler.alphas_cumprod, ft.weighting_gamma)
    model = trainee(base, ft, projection=False) if ft.adapter == "lora" else frozen_prompts(base)
    res = train(model, scheduler, images, ft, seed=derive_seed(params.seed, "finetune-shared"),
                steps=ft.shared_total_steps(params.num_ranges), loss_weights=weights, desc="finetune shared",
                checkpoint_dir=ckpt, checkpoint_every=ft.checkpoint_every, **prompting(base, ft))
    info = {"baseline": "shared", "weighting": ft.weighting, "lr": ft.lr}
    log_data_version(run, params, "training")
    return finish(res, scheduler, SHARED_DIR, ckpt, info, run)


if __name__ == "__main__":
    sys.exit(main("finetune_shared", finetune_shared, trains=lambda params: True))
