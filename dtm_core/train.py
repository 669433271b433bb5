"""One training loop for pretraining, per-range DeMe fine-tunes and the shared baseline.

The loop is Accelerate-driven (CPU, one GPU or many, chosen at run time),
keeps an EMA of the weights with diffusers' ``EMAModel`` and returns the EMA
weights, which are the ones saved and merged. DeMe's pieces are switches:

- ``timestep_sampler``: how a batch's t is drawn (uniform, or the per-range
  probabilistic sampler of :func:`dtm_core.partition.sample_timesteps`);
- ``teacher`` + ``consistency_weight``: the consistency loss
  ``||eps_teacher(x_t, t) - eps_model(x_t, t)||^2`` to the frozen pretrained model;
- the channel-wise projection lives in the model itself (:mod:`dtm_core.model`).

With ``checkpoint_dir`` the loop saves Accelerate state (model, optimizer,
EMA, its own random streams, step) every ``checkpoint_every`` steps and
resumes from the newest checkpoint there, so a killed run continues where it
stopped and ends as an uninterrupted run would.

Under ``accelerate launch`` with P processes every process draws the same
global batch (same seeded streams) and trains on its slice; DDP averages the
gradients, so P processes reproduce one process's run up to rounding. The
non-main processes raise :class:`dtm_core.distributed.WorkerDone` at the end
(see :mod:`dtm_core.distributed`).
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from . import distributed
from .conditioning import drop_prompts
from .config import OptimConfig
from .data import BatchSampler
from .errors import TrainingDivergedError
from .model import compute_layout, storage_layout

log = logging.getLogger(__name__)

TimestepSampler = Callable[[int, torch.Generator], torch.Tensor]


@dataclass
class TrainResult:
    model: UNet2DModel  # EMA weights, on the CPU, in eval mode
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss over the interval)
    consistency: list[tuple[int, float]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    resumed_from: int = 0

    @property
    def steps_per_second(self) -> float:
        """The steps this run took (after its resume, if any) per second of it."""
        return (self.steps - self.resumed_from) / self.seconds if self.seconds > 0 else float("nan")


class _LoopState:
    """Random streams and position of the loop, checkpointed with Accelerate."""

    def __init__(self, seed: int, sampler: BatchSampler):
        self.generator = torch.Generator().manual_seed(seed)
        self.sampler = sampler
        self.step = 0
        self.losses: list[tuple[int, float]] = []
        self.consistency: list[tuple[int, float]] = []
        self.running = [0.0, 0.0, 0]  # loss sum, consistency sum, count since the last log point

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "sampler": self.sampler.state_dict(),
            "step": self.step,
            "losses": list(self.losses),
            "consistency": list(self.consistency),
            "running": list(self.running),
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.losses = [tuple(x) for x in state["losses"]]
        self.consistency = [tuple(x) for x in state["consistency"]]
        self.running = list(state["running"])


def lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """The learning-rate multiplier at ``step`` (0-based) of ``total``: linear warm-up, then constant or cosine to 0."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _latest_checkpoint(checkpoint_dir: Path) -> Optional[Path]:
    done = [p for p in checkpoint_dir.glob("step-*") if (p / "COMPLETE").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def train(
    model: UNet2DModel,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    cfg: OptimConfig,
    seed: int,
    steps: Optional[int] = None,
    timestep_sampler: Optional[TimestepSampler] = None,
    teacher: Optional[UNet2DModel] = None,
    consistency_weight: float = 0.0,
    loss_weights: Optional[torch.Tensor] = None,
    checkpoint_dir: Optional[Path] = None,
    checkpoint_every: int = 0,
    snapshot_every: int = 0,
    on_snapshot: Optional[Callable[[int, UNet2DModel], None]] = None,
    desc: str = "train",
    channels_last: bool = True,
    labels: Optional[torch.Tensor] = None,
    prompt_dropout: float = 0.0,
) -> TrainResult:
    """Train ``model`` (in place) and return its EMA weights.

    ``loss_weights`` (length T) weights each sample's eps-MSE by its
    timestep (the loss-reweighting baselines, :mod:`dtm_core.weighting`).
    ``channels_last`` holds the weights of ``model`` and ``teacher`` in that
    layout while training (:func:`dtm_core.model.compute_layout`: faster
    convolutions, other rounding); off, the run is the one this project's
    shipped base was trained with, which ``make base`` must regenerate bit
    for bit.
    ``labels`` (one per image) trains a prompt-conditioned model
    (:class:`dtm_core.model.PromptUNet2DModel`): each batch's labels, each
    replaced by the empty prompt with probability ``prompt_dropout``
    (classifier-free guidance); the teacher sees the same labels.
    ``on_snapshot(step, ema_model)`` is called every ``snapshot_every`` steps
    with a CPU copy holding the EMA weights (convergence curves); it draws no
    random numbers from the loop's streams, so the run is unchanged by it.
    """
    steps = cfg.steps if steps is None else steps
    T = scheduler.config.num_train_timesteps
    timestep_sampler = timestep_sampler or (lambda batch_size, g: torch.randint(0, T, (batch_size,), generator=g))
    use_teacher = teacher is not None and consistency_weight > 0

    torch.manual_seed(seed)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    device = accelerator.device
    # Only what trains has optimiser state and an EMA copy: with a LoRA adapter
    # that is the adapter alone (dtm_core/adapters.py), the rest stays frozen.
    trainable = _trainable(model)
    optimizer = torch.optim.AdamW(
        trainable, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay
    )
    ema = EMAModel(
        trainable,
        decay=cfg.ema_max_decay,
        use_ema_warmup=True,
        inv_gamma=cfg.ema_inv_gamma,
        power=cfg.ema_power,
    )
    state = _LoopState(seed, BatchSampler(images, cfg.batch_size, torch.Generator().manual_seed(seed + 1)))
    model.train()
    layout = compute_layout if channels_last else storage_layout
    layout(model)  # channels-last: faster convolutions; the weights' values are untouched (model.compute_layout)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.to(device)
    accelerator.register_for_checkpointing(ema)
    accelerator.register_for_checkpointing(state)
    if use_teacher:  # a copy: the caller's model keeps its device, layout and flags (controls reuse the base)
        teacher = layout(copy.deepcopy(teacher).to(device).eval().requires_grad_(False))
    if loss_weights is not None:
        loss_weights = loss_weights.to(device)

    resumed_from = 0
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        latest = _latest_checkpoint(checkpoint_dir)
        if latest is not None:
            accelerator.load_state(str(latest))
            resumed_from = state.step
            log.info("%s: resumed from %s (step %d)", desc, latest, state.step)

    start = time.perf_counter()
    part = distributed.shard(cfg.batch_size) if accelerator.num_processes > 1 else slice(None)
    bar = tqdm(total=steps, initial=state.step, desc=desc, file=sys.stderr, mininterval=2.0,
               disable=None if accelerator.is_main_process else True)
    while state.step < steps:
        for group in optimizer.param_groups:  # a function of the step alone, so a resumed run continues it exactly
            group["lr"] = cfg.lr * lr_factor(state.step, steps, cfg.lr_schedule, cfg.warmup_steps)
        idx = state.sampler.next_indices()
        x0 = state.sampler.images[idx]
        t = timestep_sampler(x0.shape[0], state.generator)
        noise = torch.randn(x0.shape, generator=state.generator)
        x0, t, noise = x0[part].to(device), t[part].to(device), noise[part].to(device)
        x_t = scheduler.add_noise(x0, noise, t)  # sqrt(a_t) x0 + sqrt(1 - a_t) eps, bit for bit the same on CPU
        cond = {}
        if labels is not None:  # drawn after the noise: an unconditional run's random streams are unchanged
            cond = {"class_labels": drop_prompts(labels[idx], prompt_dropout, state.generator)[part].to(device)}
        with accelerator.autocast():
            pred = model(x_t, t, **cond).sample
            if loss_weights is None:
                loss = F.mse_loss(pred.float(), noise)
            else:
                per_sample = ((pred.float() - noise) ** 2).flatten(1).mean(dim=1)
                loss = (loss_weights[t] * per_sample).mean()
            total = loss
            if use_teacher:
                with torch.no_grad():
                    target = teacher(x_t, t, **cond).sample
                c_loss = F.mse_loss(pred.float(), target.float())
                total = loss + consistency_weight * c_loss
        if not torch.isfinite(total):
            raise TrainingDivergedError(
                f"{desc}: loss became {total.item()} at step {state.step + 1}; lower the learning rate (lr)"
            )
        accelerator.backward(total)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(trainable)
        state.step += 1
        bar.update(1)
        r = state.running
        r[0] += loss.item()
        r[1] += c_loss.item() if use_teacher else 0.0
        r[2] += 1
        if state.step % cfg.log_every == 0 or state.step == steps:
            state.losses.append((state.step, r[0] / r[2]))
            if use_teacher:
                state.consistency.append((state.step, r[1] / r[2]))
            state.running = [0.0, 0.0, 0]
        due = checkpoint_every and state.step % checkpoint_every == 0 and state.step < steps
        if checkpoint_dir is not None and due:
            _save_checkpoint(accelerator, checkpoint_dir, state.step)
        if on_snapshot is not None and snapshot_every and state.step % snapshot_every == 0:
            snap = copy.deepcopy(accelerator.unwrap_model(model))
            ema.copy_to(_trainable(snap))
            on_snapshot(state.step, storage_layout(snap.to("cpu").eval()))
    bar.close()
    seconds = time.perf_counter() - start
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        raise distributed.WorkerDone(desc)

    final = accelerator.unwrap_model(model)
    ema.copy_to(_trainable(final))
    final = storage_layout(final.to("cpu").eval())
    return TrainResult(
        model=final,
        losses=state.losses,
        consistency=state.consistency,
        steps=steps,
        seconds=seconds,
        resumed_from=resumed_from,
    )


def _save_checkpoint(accelerator: Accelerator, checkpoint_dir: Path, step: int) -> None:
    """Write step-<n>/ under a temporary name, mark it COMPLETE, keep only the newest.

    Every process calls this (each saves its own random states); the main
    process prepares the folder and renames it once all have written.
    """
    final = checkpoint_dir / f"step-{step}"
    tmp = checkpoint_dir / f".step-{step}.tmp"
    if accelerator.is_main_process:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    # torch.save, not safetensors: the weights are held channels-last while training (model.compute_layout),
    # which safetensors refuses; these files are this run's own and deleted when it finishes
    accelerator.save_state(str(tmp), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "COMPLETE").write_text(str(step))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dir.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def clear_checkpoints(checkpoint_dir: Optional[Path]) -> None:
    if checkpoint_dir is not None:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


def smoothed(values: list[tuple[int, float]]) -> float:
    """Mean of the last quarter of logged losses (a stable 'final loss')."""
    if not values:
        return math.nan
    tail = values[-max(1, len(values) // 4) :]
    return sum(v for _, v in tail) / len(tail)
