"""DVC stage pretrain: import model.pretrained_path, or train the small base model -> models/pretrained/.

The default imports the converged base checkpoint that ships in base/ (see
base/README.md for the one command that regenerates it bit for bit); a user's
own diffusers checkpoint is imported the same way. With
``model.pretrained_path: null`` the stage trains a base model from scratch on
the prepared train split.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from dtm_core import data as data_mod
from dtm_core.conditioning import class_prompts
from dtm_core.config import Params
from dtm_core.errors import ModelLoadError
from dtm_core.model import (
    PromptUNet2DModel,
    build_prompt_unet,
    build_scheduler,
    build_unet,
    find_scheduler,
    has_projection,
    load_unet,
    save_model,
)
from dtm_core.seeding import derive_seed
from dtm_core.tracking import NullRun
from dtm_core.train import clear_checkpoints, smoothed, train
from stages.common import DATA_DIR, PRETRAINED_DIR, checkpoint_dir, log_data_version, main

log = logging.getLogger("dtm.pretrain")


def pretrain(params: Params, run=NullRun()) -> dict:
    if params.model.pretrained_path:
        return import_pretrained(params, run)  # prepare checked its image shape against the data
    train_ds = data_mod.load_split(DATA_DIR, "train")
    # Some imported library reseeds torch's global generator at random, so the
    # initial weights must be seeded here, not inherited from the process.
    torch.manual_seed(derive_seed(params.seed, "pretrain-init"))
    shape = train_ds.images.shape[1:]
    cond = {}
    if params.model.conditioning == "prompt":
        unet = build_prompt_unet(params.model, shape[-1], shape[0], class_prompts(train_ds.classes),
                                 params.model.cross_attention_dim)
        cond = {"labels": torch.as_tensor(train_ds.labels), "prompt_dropout": params.pretrain.prompt_dropout}
    else:
        unet = build_unet(params.model, sample_size=shape[-1], channels=shape[0])
    scheduler = build_scheduler(params.model)
    ckpt = checkpoint_dir("pretrain", params)
    res = train(unet, scheduler, torch.as_tensor(train_ds.images), params.pretrain,
                seed=derive_seed(params.seed, "pretrain"), checkpoint_dir=ckpt,
                checkpoint_every=params.pretrain.checkpoint_every, desc="pretrain",
                # the shipped base (base/) was trained in the contiguous layout, and make base
                # regenerates it with this stage bit for bit
                channels_last=False, **cond)
    run.log_curve("train/loss", res.losses)
    log_data_version(run, params, "training")
    info = {"source": "embedded", "steps": res.steps, "final_loss": smoothed(res.losses),
            "parameters": res.model.num_parameters()}
    save_model(res.model, scheduler, PRETRAINED_DIR, info)
    clear_checkpoints(ckpt)
    return {**info, "steps_per_second": res.steps_per_second}


def import_pretrained(params: Params, run=NullRun()) -> dict:
    """Validate and copy a local diffusers checkpoint (model or pipeline directory); never a hub."""
    src = Path(params.model.pretrained_path).expanduser()
    unet = load_unet(src, what="model.pretrained_path", user_supplied=True)
    prompted = isinstance(unet, PromptUNet2DModel)
    if prompted != (params.model.conditioning == "prompt"):
        raise ModelLoadError(
            f"model.pretrained_path '{src}' holds a {type(unet).__name__} but model.conditioning is "
            f"{params.model.conditioning}: set model.conditioning: {'prompt' if prompted else 'none'}"
            + ("" if prompted else ", or model.pretrained_path: null to train a prompt-conditioned base here")
        )
    if has_projection(unet):
        raise ModelLoadError(
            f"model.pretrained_path '{src}' already has channel-projection layers; "
            "start DeMe from a plain UNet2DModel checkpoint."
        )
    scheduler = find_scheduler(src)
    if scheduler is None:
        # Say it loudly and record it: the schedule then comes from params, and
        # nothing can check it against how the checkpoint was trained.
        log.warning(
            "model.pretrained_path '%s' has no scheduler_config.json (nor scheduler/): building the noise "
            "schedule from params.yaml's model section (num_train_timesteps=%d, beta_schedule=%s). If the "
            "checkpoint was trained with another schedule, save its scheduler beside it.",
            src, params.model.num_train_timesteps, params.model.beta_schedule,
        )
        scheduler, schedule_source = build_scheduler(params.model), "params (the checkpoint has none)"
    else:
        schedule_source = "checkpoint"
        T = scheduler.config.num_train_timesteps
        if T != params.model.num_train_timesteps:
            raise ModelLoadError(
                f"model.pretrained_path '{src}' was trained with {T} timesteps but model.num_train_timesteps is "
                f"{params.model.num_train_timesteps}: set model.num_train_timesteps: {T}."
            )
        if scheduler.config.prediction_type != "epsilon":
            raise ModelLoadError(
                f"model.pretrained_path '{src}' predicts '{scheduler.config.prediction_type}'; only "
                "epsilon-prediction checkpoints are supported"
            )
    run.set_tags({"dtm.schedule_source": schedule_source})
    info = {"source": str(src), "schedule_source": schedule_source, "parameters": unet.num_parameters()}
    save_model(unet, scheduler, PRETRAINED_DIR, info)
    return info


if __name__ == "__main__":
    sys.exit(main("pretrain", pretrain, trains=lambda params: not params.model.pretrained_path))
