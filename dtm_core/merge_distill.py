"""Learn the merge weights by distilling the range experts into the merged model.

AdaMerging's idea with DeMe's range models as teachers: the merged weights
are theta + sum_i w_i tau_i (one w per range, or per range and top-level
UNet block), and w is trained by gradient descent so that, on train images
at timesteps drawn uniformly from [0, T), the merged model's eps-prediction
matches the prediction of the range model that owns that t. No sampling and
no FD: a few hundred small forward/backward passes.
"""

from __future__ import annotations

import sys
from typing import Mapping, Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch.func import functional_call
from tqdm.auto import tqdm

from .merge import block_of, task_arithmetic
from .partition import Range, range_of


def distill_weights(
    template: UNet2DModel,
    base: Mapping[str, torch.Tensor],
    taus: Sequence[Mapping[str, torch.Tensor]],
    teachers: Sequence[UNet2DModel],
    scheduler: DDPMScheduler,
    images: np.ndarray,
    ranges: Sequence[Range],
    start: Sequence[float],
    steps: int = 200,
    lr: float = 0.05,
    batch_size: int = 64,
    per_block: bool = False,
    seed: int = 0,
) -> dict:
    """Learned weights: ``weights`` (per range; per-block weights averaged), ``block_weights``, ``losses``."""
    if not (len(taus) == len(teachers) == len(ranges) == len(start)):
        raise ValueError("one task vector, teacher, range and start weight per range")
    keys = sorted(taus[0])
    blocks = sorted({block_of(k) for k in keys}) if per_block else ["all"]
    column = torch.tensor([blocks.index(block_of(k)) if per_block else 0 for k in keys])
    W = torch.tensor([[float(w)] * len(blocks) for w in start], dtype=torch.float32, requires_grad=True)
    base_t = [base[k].float() for k in keys]
    tau_t = [torch.stack([tv[k].float() for tv in taus]) for k in keys]  # (N, *shape) per key
    template = template.eval().requires_grad_(False)
    teachers = [m.eval().requires_grad_(False) for m in teachers]
    x_all = torch.as_tensor(images, dtype=torch.float32)
    T = scheduler.config.num_train_timesteps
    owner_of = torch.tensor([range_of(t, ranges) for t in range(T)])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([W], lr=lr)
    losses = []
    for _ in tqdm(range(steps), desc="distill merge weights", file=sys.stderr, mininterval=2.0, disable=None):
        x0 = x_all[torch.randint(0, len(x_all), (batch_size,), generator=g)]
        t = torch.randint(0, T, (batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = scheduler.add_noise(x0, noise, t)
        owner = owner_of[t]
        with torch.no_grad():
            target = torch.empty_like(x_t)
            for i, teacher in enumerate(teachers):
                mask = owner == i
                if mask.any():
                    target[mask] = teacher(x_t[mask], t[mask]).sample
        params = {k: base_t[j] + task_arithmetic(tau_t[j], W[:, column[j]]) for j, k in enumerate(keys)}
        pred = functional_call(template, params, (x_t, t)).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    learned = W.detach()
    out = {"weights": learned.mean(dim=1).tolist(), "losses": losses}
    if per_block:
        out["block_weights"] = {b: learned[:, j].tolist() for j, b in enumerate(blocks)}
    return out
