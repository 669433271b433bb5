"""finetune@i (DeMe, one range) and finetune_shared (the equal-compute baseline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from .. import data as data_mod
from ..config import Params, derive_seed
from ..io import dir_digest
from ..model import load_scheduler, load_unet, num_parameters, save_model, with_projection
from ..partition import load_partition, sample_timesteps
from ..train import clear_checkpoints, smoothed, train
from .common import DATA_DIR, PARTITION_FILE, PRETRAINED_DIR, SHARED_DIR, NullRun, checkpoint_dir, range_dir


def _finetune_common(params: Params):
    train_ds = data_mod.load_split(DATA_DIR, "train")
    base = load_unet(PRETRAINED_DIR, what="pretrained model")
    scheduler = load_scheduler(PRETRAINED_DIR)
    return torch.as_tensor(train_ds.images), base, scheduler


def _finetune_metrics(res, out_dir: Path) -> dict:
    return {
        "final_loss": smoothed(res.losses),
        "final_consistency_loss": smoothed(res.consistency),
        "steps": res.steps,
        "steps_per_second": res.steps_per_second,
        "train_seconds": res.seconds,
        "resumed_from_step": res.resumed_from,
        "parameters": num_parameters(res.model),
        "model_digest": dir_digest(out_dir),
    }


def finetune_range(params: Params, index: int, run: Any = NullRun(), stop_after: Optional[int] = None) -> dict:
    """Fine-tune a copy of the pretrained model for timestep range ``index`` (DeMe)."""
    ranges, T = load_partition(PARTITION_FILE)
    if not 0 <= index < len(ranges):
        raise ValueError(f"range index {index} is outside the partition's {len(ranges)} ranges (partition.ranges)")
    lo, hi = ranges[index]
    ft = params.finetune
    images, base, scheduler = _finetune_common(params)
    model = with_projection(base, enabled=ft.channel_projection)

    def draw(batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return sample_timesteps(batch_size, lo, hi, T, ft.p, generator, ft.antithetic)[0]

    ckpt = checkpoint_dir(f"range-{index}", params, ("seed", "finetune"), (DATA_DIR, PRETRAINED_DIR, PARTITION_FILE))
    res = train(
        model, scheduler, images, ft, seed=derive_seed(params.seed, f"finetune-{index}"),
        timestep_sampler=draw, teacher=base, consistency_weight=ft.consistency_weight,
        checkpoint_dir=ckpt, checkpoint_every=ft.checkpoint_every, stop_after=stop_after,
        desc=f"finetune range {index} [{lo},{hi})",
    )
    if stop_after is not None and res.steps < ft.steps:
        return {"stopped_at": res.steps}
    run.log_curve("train/loss", res.losses)
    run.log_curve("train/consistency_loss", res.consistency)
    out = range_dir(index)
    save_model(res.model, scheduler, out, {"range": [lo, hi], "index": index, "steps": res.steps})
    clear_checkpoints(ckpt)
    return {"range": [lo, hi], "index": index, **_finetune_metrics(res, out)}


def finetune_shared(params: Params, run: Any = NullRun(), stop_after: Optional[int] = None) -> dict:
    """The baseline: the same optimiser recipe on all of [0, T), N x the per-range steps."""
    ft = params.finetune
    steps = params.num_ranges * ft.steps
    images, base, scheduler = _finetune_common(params)
    ckpt = checkpoint_dir("shared", params, ("seed", "finetune", "partition"), (DATA_DIR, PRETRAINED_DIR))
    res = train(
        base, scheduler, images, ft, seed=derive_seed(params.seed, "finetune-shared"), steps=steps,
        checkpoint_dir=ckpt, checkpoint_every=ft.checkpoint_every, stop_after=stop_after,
        desc="finetune shared",
    )
    if stop_after is not None and res.steps < steps:
        return {"stopped_at": res.steps}
    run.log_curve("train/loss", res.losses)
    save_model(res.model, scheduler, SHARED_DIR, {"steps": res.steps, "baseline": "shared"})
    clear_checkpoints(ckpt)
    return _finetune_metrics(res, SHARED_DIR)
