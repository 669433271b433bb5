"""Held-out denoising loss by timestep: a low-noise second signal beside FD.

Every model is scored on the same held-out images, at the same grid of
timesteps, with the same noise (drawn per timestep from a seeded generator,
so memory stays one timestep's worth). The result is a matrix of per-image,
per-timestep eps-prediction MSEs; models are compared on it pairwise (same
images, same noise), by timestep range or overall.

Several models with ``ranges`` act as the ensemble: the model whose range
holds t predicts at t.
"""

from __future__ import annotations

import sys
from typing import Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from .config import EvaluateConfig
from .distributed import inference_map
from .model import computing
from .partition import Range, range_columns, range_of
from .seeding import derive_seed


def timestep_grid(T: int, count: int) -> np.ndarray:
    """``count`` distinct integer timesteps spread evenly over [0, T), both ends included."""
    count = min(count, T)
    return np.unique(np.linspace(0, T - 1, count).round().astype(np.int64))


def _noise(seed: int, t: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(seed, f"heldout-noise-{t}")))


def denoising_losses(
    models: Sequence[UNet2DModel],
    scheduler: DDPMScheduler,
    images: np.ndarray,
    timesteps: np.ndarray,
    seed: int,
    ranges: Sequence[Range] | None = None,
    batch_size: int = 500,
    desc: str = "held-out loss",
    labels: torch.Tensor | None = None,
) -> np.ndarray:
    """eps-MSE of ``models`` per held-out image (rows) and timestep (columns), float64.

    The noise at timestep t depends only on (``seed``, t) and the images'
    shape, so every model sees the same noisy inputs. ``labels`` (one per
    image) prompt a prompt-conditioned model with each image's own class.
    """
    if len(models) > 1 and (ranges is None or len(ranges) != len(models)):
        raise ValueError("ensemble losses need one range per model")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = [m.to(device).eval() for m in models]
    x0 = torch.as_tensor(images, dtype=torch.float32)
    t_all = torch.as_tensor(timesteps, dtype=torch.long)
    noise = torch.stack([_noise(seed, int(t), tuple(x0.shape)) for t in timesteps])  # (timestep, image, ...)
    out = np.zeros((len(x0), len(timesteps)), dtype=np.float64)
    # (timestep, image) pairs in batches across timesteps: a model with few held-out images still runs full
    # batches. A batch holds the timesteps of one model (the ensemble's range model i answers range i).
    owner = torch.as_tensor([0 if len(models) == 1 else range_of(int(t), ranges) for t in timesteps])
    batches = []
    for k in range(len(models)):
        cols, rows = torch.meshgrid(torch.nonzero(owner == k).flatten(), torch.arange(len(x0)), indexing="ij")
        cols, rows = cols.flatten(), rows.flatten()
        batches += [(k, cols[b : b + batch_size], rows[b : b + batch_size]) for b in range(0, len(cols), batch_size)]
    bar = tqdm(total=len(batches), desc=desc, file=sys.stderr, mininterval=2.0, disable=None)

    def run(batch) -> None:  # one batch of pairs: each fills its own cell of ``out``
        k, cols, rows = batch
        t, nb = t_all[cols], noise[cols, rows]
        x_t = scheduler.add_noise(x0[rows], nb, t).to(device)
        cond = {} if labels is None else {"class_labels": labels[rows].to(device)}
        pred = models[k](x_t, t.to(device), **cond).sample.float().cpu()
        out[rows.numpy(), cols.numpy()] = ((pred - nb) ** 2).flatten(1).mean(dim=1).double().numpy()
        bar.update(1)

    with computing(models):
        inference_map(run, batches, device)
    bar.close()
    return out


def heldout_losses(ev: EvaluateConfig, models, ranges, scheduler, images: np.ndarray,
                   labels: torch.Tensor | None = None) -> dict:
    """Per held-out image x grid timestep eps-MSE at ``evaluate``'s settings (``ev``: its timesteps, noise
    seed, batch); for the ensemble (``ranges`` given) also every range model's own matrix. ``labels``:
    each image's class, for a prompt-conditioned model."""
    grid = timestep_grid(scheduler.config.num_train_timesteps, ev.heldout_timesteps)
    seed = derive_seed(ev.seed, "heldout")
    if ranges is None:  # one model at every t (the ensemble has ranges, even when N = 1)
        return {"timesteps": grid, "losses": denoising_losses(models, scheduler, images, grid, seed,
                                                              batch_size=ev.batch_size, labels=labels)}
    per_range = np.stack([denoising_losses([m], scheduler, images, grid, seed, batch_size=ev.batch_size,
                                           desc=f"held-out loss range {i}", labels=labels)
                          for i, m in enumerate(models)])
    ensemble = np.empty_like(per_range[0])
    for i, cols in enumerate(range_columns(grid, ranges)):
        ensemble[:, cols] = per_range[i][:, cols]  # range model i answers for its own timesteps
    return {"timesteps": grid, "losses": ensemble, "range_losses": per_range}
