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

from .distributed import inference_map
from .model import computing
from .partition import Range, range_of
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
) -> np.ndarray:
    """eps-MSE of ``models`` per held-out image (rows) and timestep (columns), float64.

    The noise at timestep t depends only on (``seed``, t) and the images'
    shape, so every model sees the same noisy inputs.
    """
    if len(models) > 1 and (ranges is None or len(ranges) != len(models)):
        raise ValueError("ensemble losses need one range per model")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = [m.to(device).eval() for m in models]
    x0 = torch.as_tensor(images, dtype=torch.float32)
    alphas = scheduler.alphas_cumprod
    out = np.zeros((len(x0), len(timesteps)), dtype=np.float64)
    # (image, timestep) pairs in batches across timesteps: a model with few held-out images still runs full
    # batches. A batch holds the timesteps of one model (the ensemble's range model i answers range i).
    owner = [0 if len(models) == 1 else range_of(int(t), ranges) for t in timesteps]
    batches = []
    for k in range(len(models)):
        pairs = [(j, i) for j in range(len(timesteps)) if owner[j] == k for i in range(len(x0))]
        batches += [(k, pairs[b : b + batch_size]) for b in range(0, len(pairs), batch_size)]
    noise = {}
    bar = tqdm(total=len(batches), desc=desc, file=sys.stderr, mininterval=2.0, disable=None)

    def run(batch) -> None:  # one batch of pairs: each fills its own cell of ``out``
        k, pairs = batch
        cols = torch.as_tensor([j for j, _ in pairs])
        rows = torch.as_tensor([i for _, i in pairs])
        t = torch.as_tensor(timesteps, dtype=torch.long)[cols]
        nb = torch.stack([noise[j][i] for j, i in pairs])
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = (a.sqrt() * x0[rows] + (1 - a).sqrt() * nb).to(device)
        pred = models[k](x_t, t.to(device)).sample.float().cpu()
        out[rows.numpy(), cols.numpy()] = ((pred - nb) ** 2).flatten(1).mean(dim=1).double().numpy()
        bar.update(1)

    for j, t in enumerate(timesteps):
        noise[j] = _noise(seed, int(t), tuple(x0.shape))
    with computing(models):
        inference_map(run, batches, device)
    bar.close()
    return out
