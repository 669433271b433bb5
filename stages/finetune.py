"""DVC stage finetune@i: DeMe fine-tune of the pretrained model for timestep range i -> models/ranges/range-<i>/.

Probabilistic timestep sampling (paper Eq. 6), the consistency loss to the
frozen pretrained model (Eq. 5) and identity-initialised channel-wise
projections, all switchable in params.yaml's ``finetune`` section.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from dtm_core import adapters
from dtm_core import data as data_mod
from dtm_core.config import FinetuneConfig, Params
from dtm_core.errors import PartitionError
from dtm_core.model import (
    PromptUNet2DModel,
    has_projection,
    load_scheduler,
    load_unet,
    save_model,
    with_projection,
)
from dtm_core.partition import load_partition, sample_timesteps
from dtm_core.seeding import derive_seed
from dtm_core.tracking import NullRun
from dtm_core.train import TrainResult, clear_checkpoints, smoothed, train
from stages.common import DATA_DIR, PARTITION_FILE, PRETRAINED_DIR, checkpoint_dir, log_data_version, main, range_dir


def load_inputs():
    """The train images, the pretrained model and its noise schedule: what every fine-tune starts from."""
    images = torch.as_tensor(data_mod.load_split(DATA_DIR, "train").images)
    return images, load_unet(PRETRAINED_DIR, what="pretrained model"), load_scheduler(PRETRAINED_DIR)


def prompting(base, ft: FinetuneConfig) -> dict:
    """train()'s prompt arguments for a prompt-conditioned base: the train labels, the prompt dropout."""
    if not isinstance(base, PromptUNet2DModel):
        return {}
    return {"labels": torch.as_tensor(data_mod.load_split(DATA_DIR, "train").labels),
            "prompt_dropout": ft.prompt_dropout}


def trainee(base, ft: FinetuneConfig, projection: bool):
    """The model a fine-tune trains: a copy of ``base`` (with identity projections if asked, its prompt
    encoder frozen), with a LoRA adapter on it and the rest frozen when ``finetune.adapter`` is lora."""
    model = frozen_prompts(with_projection(base, enabled=projection))
    return adapters.attach(model, ft.lora) if ft.adapter == "lora" else model


def frozen_prompts(model):
    """``model`` with its prompt encoder frozen, if it has one: fine-tunes adapt the UNet to fixed prompt
    embeddings, as a Stable Diffusion fine-tune keeps its text encoder."""
    if isinstance(model, PromptUNet2DModel):
        model.prompt_encoder.requires_grad_(False)
    return model


def finish(res: TrainResult, scheduler, out: Path, ckpt: Path, info: dict, run) -> dict:
    """Log the loss curves, save the EMA weights with ``info``, drop the resumable state; the stage's numbers.

    A LoRA fine-tune saves its adapter alone, with the base and the adapter's
    configuration in dtm_info.json (dtm_core/adapters.py).
    """
    run.log_curve("train/loss", res.losses)
    info = {**info, "steps": res.steps, "final_loss": smoothed(res.losses), "parameters": res.model.num_parameters(),
            "trained_parameters": res.model.num_parameters(only_trainable=True)}
    if adapters.has_adapter(res.model):
        lora = res.model.peft_config["default"]
        info.update(base=PRETRAINED_DIR.as_posix(), channel_projection=has_projection(res.model),
                    lora={"rank": lora.r, "alpha": lora.lora_alpha, "targets": sorted(lora.target_modules)})
    if res.consistency:
        run.log_curve("train/consistency_loss", res.consistency)
        info["final_consistency_loss"] = smoothed(res.consistency)
    save_model(res.model, scheduler, out, info)
    clear_checkpoints(ckpt)
    disk = sum(f.stat().st_size for f in Path(out).iterdir() if f.name.endswith(".safetensors"))
    return {**info, "weights_bytes": disk, "steps_per_second": res.steps_per_second,
            "resumed_from_step": res.resumed_from}


def finetune_range(params: Params, run=NullRun(), index: int = 0) -> dict:
    """Fine-tune a copy of the pretrained model for timestep range ``index`` (DeMe)."""
    ranges, T = load_partition(PARTITION_FILE)
    if not 0 <= index < len(ranges):
        raise PartitionError(
            f"range index {index} is outside the partition's {len(ranges)} ranges (partition.ranges)"
        )
    lo, hi = ranges[index]
    ft = params.finetune
    images, base, scheduler = load_inputs()
    model = trainee(base, ft, ft.channel_projection)

    def draw(batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return sample_timesteps(batch_size, lo, hi, T, ft.p, generator, ft.antithetic)[0]

    ckpt = checkpoint_dir("finetune", params, index)
    res = train(
        model, scheduler, images, ft, seed=derive_seed(params.seed, f"finetune-{index}"),
        timestep_sampler=draw, teacher=base, consistency_weight=ft.consistency_weight,
        checkpoint_dir=ckpt, checkpoint_every=ft.checkpoint_every, desc=f"finetune range {index} [{lo},{hi})",
        **prompting(base, ft),
    )
    log_data_version(run, params, "training")
    return finish(res, scheduler, range_dir(index), ckpt, {"range": [lo, hi], "index": index}, run)


if __name__ == "__main__":
    sys.exit(main("finetune", finetune_range, trains=lambda params: True))
