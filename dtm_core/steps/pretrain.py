"""pretrain: train the small base model, or import a local diffusers checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import data as data_mod
from ..config import Params, derive_seed
from ..model import build_scheduler, build_unet, has_projection, load_scheduler, load_unet, num_parameters, save_model
from ..train import clear_checkpoints, smoothed, train
from .common import DATA_DIR, PRETRAINED_DIR, NullRun, checkpoint_dir


def pretrain(params: Params, run: Any = NullRun()) -> dict:
    train_ds = data_mod.load_split(DATA_DIR, "train")
    shape = train_ds.images.shape[1:]
    if params.model.pretrained_path:
        return _import_pretrained(params, shape)
    # Some imported library reseeds torch's global generator at random, so the
    # initial weights must be seeded here, not inherited from the process.
    torch.manual_seed(derive_seed(params.seed, "pretrain-init"))
    unet = build_unet(params.model, sample_size=shape[-1], channels=shape[0])
    scheduler = build_scheduler(params.model)
    ckpt = checkpoint_dir("pretrain", params, ("seed", "model", "pretrain"), (DATA_DIR,))
    res = train(unet, scheduler, torch.as_tensor(train_ds.images), params.pretrain,
                seed=derive_seed(params.seed, "pretrain"), checkpoint_dir=ckpt,
                checkpoint_every=params.pretrain.checkpoint_every, desc="pretrain")
    run.log_curve("train/loss", res.losses)
    save_model(res.model, scheduler, PRETRAINED_DIR, {"source": "embedded", "steps": res.steps})
    clear_checkpoints(ckpt)
    return {
        "source": "embedded",
        "final_loss": smoothed(res.losses),
        "steps": res.steps,
        "steps_per_second": res.steps_per_second,
        "train_seconds": res.seconds,
        "parameters": num_parameters(res.model),
    }


def _import_pretrained(params: Params, shape: tuple) -> dict:
    src = Path(params.model.pretrained_path).expanduser()
    unet = load_unet(src, what="model.pretrained_path")
    if has_projection(unet):
        raise ValueError(
            f"model.pretrained_path '{src}' already has channel-projection layers; "
            "start DeMe from a plain UNet2DModel checkpoint."
        )
    cfg = unet.config
    if cfg.in_channels != shape[0] or cfg.sample_size != shape[-1]:
        raise ValueError(
            f"model.pretrained_path '{src}' expects {cfg.in_channels}x{cfg.sample_size}px images but the data "
            f"are {shape[0]}x{shape[-1]}px: set data.channels / data.image_size to match the checkpoint."
        )
    scheduler = load_scheduler(src, fallback=params.model)
    T = scheduler.config.num_train_timesteps
    if T != params.model.num_train_timesteps:
        raise ValueError(
            f"model.pretrained_path '{src}' was trained with {T} timesteps but model.num_train_timesteps is "
            f"{params.model.num_train_timesteps}: set model.num_train_timesteps: {T}."
        )
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"model.pretrained_path '{src}': only epsilon-prediction checkpoints are supported")
    save_model(unet, scheduler, PRETRAINED_DIR, {"source": str(src)})
    return {"source": "imported", "parameters": num_parameters(unet)}
