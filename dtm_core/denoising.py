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
    bar = tqdm(total=len(timesteps), desc=desc, file=sys.stderr, mininterval=2.0, disable=None)

    def column(j: int) -> None:  # timestep j for every image: its own column of ``out``
        t = int(timesteps[j])
        model = models[0] if len(models) == 1 else models[range_of(t, ranges)]
        noise = _noise(seed, t, tuple(x0.shape))
        a = alphas[t]
        for i in range(0, len(x0), batch_size):
            xb, nb = x0[i : i + batch_size], noise[i : i + batch_size]
            x_t = (a.sqrt() * xb + (1 - a).sqrt() * nb).to(device)
            tt = torch.full((len(xb),), t, dtype=torch.long, device=device)
            pred = model(x_t, tt).sample.float().cpu()
            out[i : i + len(xb), j] = ((pred - nb) ** 2).flatten(1).mean(dim=1).double().numpy()
        bar.update(1)

    with computing(models):
        inference_map(column, range(len(timesteps)), device)
    bar.close()
    return out
