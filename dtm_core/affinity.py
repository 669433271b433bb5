"""Gradient affinity between timestep bins: which parts of [0, T) pull the weights the same way.

The pretrained model's denoising-loss gradient is computed for each of M
bins of [0, T) on one fixed batch of train images and noise, with timesteps
drawn inside the bin. Each gradient is sketched at once to ``dim`` numbers
with a seeded CountSketch (a sparse random projection that preserves inner
products in expectation: every parameter goes to one bucket with a random
sign), so no more than one full gradient is ever held. The M x M cosine
similarity of the sketches is the affinity that
:func:`dtm_core.partition.best_intervals` partitions (the paper's
gradient-conflict picture, turned into a split rule).
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from .seeding import derive_seed


def count_sketch(num_params: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded CountSketch of ``num_params`` coordinates into ``dim``: bucket and sign per coordinate."""
    g = torch.Generator().manual_seed(seed)
    buckets = torch.randint(0, dim, (num_params,), generator=g)
    signs = torch.randint(0, 2, (num_params,), generator=g).float() * 2.0 - 1.0
    return buckets, signs


def sketch(vector: torch.Tensor, buckets: torch.Tensor, signs: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.zeros(dim, dtype=torch.float64).index_add_(0, buckets, (vector.double() * signs.double()))


def gradient_affinity(
    model: UNet2DModel,
    scheduler: DDPMScheduler,
    images: np.ndarray,
    bins: int,
    seed: int,
    dim: int = 4096,
) -> dict:
    """The bins' gradient sketches and their cosine-similarity matrix.

    Returns ``affinity`` (bins x bins, float64), ``grad_norms`` (the full
    gradients' norms, per bin) and ``bin_edges`` (timestep edges, bins + 1).
    """
    T = scheduler.config.num_train_timesteps
    if not 2 <= bins <= T:
        raise ValueError(f"need 2 <= bins <= T={T} (got {bins})")
    model = model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    num = sum(p.numel() for p in params)
    buckets, signs = count_sketch(num, dim, derive_seed(seed, "count-sketch"))
    x0 = torch.as_tensor(images, dtype=torch.float32)
    g = torch.Generator().manual_seed(derive_seed(seed, "affinity-batch"))
    noise = torch.randn(x0.shape, generator=g)
    u = torch.rand(len(x0), generator=g)  # the same relative position inside every bin
    edges = np.linspace(0, T, bins + 1).round().astype(np.int64)
    sketches, norms = [], []
    for m in tqdm(range(bins), desc="gradient affinity", file=sys.stderr, mininterval=2.0, disable=None):
        lo, hi = int(edges[m]), int(edges[m + 1])
        t = (lo + (u * (hi - lo)).long()).clamp(max=hi - 1)
        x_t = scheduler.add_noise(x0, noise, t)
        loss = torch.nn.functional.mse_loss(model(x_t, t).sample, noise)
        grads = torch.autograd.grad(loss, params)
        flat = torch.cat([gr.reshape(-1) for gr in grads])
        norms.append(float(flat.norm()))
        sketches.append(sketch(flat, buckets, signs, dim))
        del grads, flat
    S = torch.stack(sketches)
    S = S / S.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return {"affinity": (S @ S.T).numpy(), "grad_norms": norms, "bin_edges": edges.tolist()}
