"""Sampling from one model, or from range models by timestep (the ensemble).

Three deterministic samplers (at eta = 0), diffusers schedulers built from
the model's own training schedule: ``dpmsolver`` (DPMSolverMultistepScheduler,
DPM-Solver++ of order 2, a solver of the probability-flow ODE: its samples
converge as the steps grow), ``unipc`` (UniPCMultistepScheduler: the same
solver with a corrector, for fewer steps) and ``ddim`` (DDIMScheduler, first order; eta > 0
adds DDIM's stochasticity). DDIM with the model's ``clip_sample`` clips every
step's x0 prediction, so it does not solve the ODE and its samples move away
from the solution as its steps grow (docs/RESULTS.md "A faster sampler").

Every model in a comparison starts from the same initial noise (common random
numbers): :func:`initial_noise` depends only on the seed, count and shape,
and with eta = 0 both samplers are deterministic given that noise.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel, UniPCMultistepScheduler
from tqdm.auto import tqdm

from .conditioning import guided_eps
from .data import to_uint8
from .distributed import inference_map
from .io import atomic_file
from .model import computing
from .partition import Range, range_of
from .seeding import derive_seed


def initial_noise(seed: int, count: int, shape: tuple[int, int, int]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((count, *shape), generator=generator)


SAMPLERS = ("ddim", "dpmsolver", "unipc")


def sampling_scheduler(train_scheduler: DDPMScheduler, steps: int, sampler: str = "ddim"):
    """A fresh sampling scheduler with ``steps`` timesteps (schedulers keep state: one per batch)."""
    if sampler == "ddim":
        scheduler = DDIMScheduler.from_config(train_scheduler.config)
    elif sampler == "dpmsolver":
        # timesteps spread over the whole of [0, T) from t = T - 1 (DPM-Solver's own default): a
        # model's "leading" training spacing would start 20 steps at t = 940, off the pure-noise end
        scheduler = DPMSolverMultistepScheduler.from_config(
            train_scheduler.config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="linspace")
    elif sampler == "unipc":
        # UniPC (bh2, order 2, data prediction): DPM-Solver++'s steps plus a corrector that reuses each new
        # model output, meant for ~10 steps; the same timesteps as dpmsolver
        scheduler = UniPCMultistepScheduler.from_config(
            train_scheduler.config, predict_x0=True, solver_order=2, solver_type="bh2", timestep_spacing="linspace")
    else:
        raise ValueError(f"unknown sampler '{sampler}': use one of {', '.join(SAMPLERS)}")
    scheduler.set_timesteps(steps)
    return scheduler


def sample(
    models: Sequence[UNet2DModel],
    train_scheduler: DDPMScheduler,
    noise: torch.Tensor,
    steps: int,
    ranges: Sequence[Range] | None = None,
    eta: float = 0.0,
    batch_size: int = 500,
    seed: int = 0,
    desc: str = "sample",
    sampler: str = "ddim",
    labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> np.ndarray:
    """Denoise ``noise`` with ``sampler`` in ``steps`` steps; returns float32 images in [-1, 1] (N, C, H, W).

    With one model it is used at every step. With several, ``ranges`` must be
    given and model i denoises the steps whose t lies in range i (the paper's
    ensemble-before-merge, Eq. 7). ``eta`` > 0 (DDIM's noise) is for ``ddim`` alone (the config checks it).
    ``labels`` (one per noise row) prompt a prompt-conditioned model, with classifier-free guidance at
    ``guidance_scale`` (:func:`dtm_core.conditioning.guided_eps`).
    """
    if len(models) > 1 and (ranges is None or len(ranges) != len(models)):
        raise ValueError("ensemble sampling needs one range per model")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = [m.to(device).eval() for m in models]
    starts = range(0, len(noise), batch_size)
    bar = tqdm(total=len(starts) * steps, desc=desc, file=sys.stderr, mininterval=2.0, disable=None)

    def denoise(start: int) -> torch.Tensor:
        scheduler = sampling_scheduler(train_scheduler, steps, sampler)
        x = noise[start : start + batch_size].to(device)
        # only used when eta > 0: per batch, so batches may run in any order
        generator = torch.Generator().manual_seed(derive_seed(seed, f"batch-{start}"))
        for t in scheduler.timesteps:
            model = models[0] if len(models) == 1 else models[range_of(int(t), ranges)]
            if labels is None:
                eps = model(x, t.to(device)).sample
            else:
                eps = guided_eps(model, x, t.to(device), labels[start : start + batch_size].to(device),
                                 guidance_scale)
            ddim = {}
            if sampler == "ddim":
                noise_t = torch.randn(x.shape, generator=generator).to(device) if eta > 0 else None
                ddim = {"eta": eta, "variance_noise": noise_t}
            x = scheduler.step(eps, t, x, **ddim).prev_sample
            bar.update(1)
        return x.clamp(-1, 1).float().cpu()

    with computing(models):
        out = inference_map(denoise, starts, device)
    bar.close()
    return torch.cat(out).numpy()


def state_scorer(template: UNet2DModel, train_scheduler: DDPMScheduler, noise: torch.Tensor, steps: int,
                 sampler: str, batch_size: int, score_images: Callable[[np.ndarray], float]):
    """``score(state, desc)``: ``state`` loaded into ``template``, its samples from ``noise`` scored by
    ``score_images`` (a validation FD). The weights ``state`` leaves out stay as the template had them."""
    full = template.state_dict()

    def score(state: dict, desc: str = "validation") -> float:
        full.update(state)
        template.load_state_dict(full)
        return score_images(sample([template], train_scheduler, noise, steps, sampler=sampler,
                                   batch_size=batch_size, desc=desc))

    return score


def save_grid(images: np.ndarray, path, nrow: int = 8, scale: int = 4) -> None:
    """Save the first nrow x nrow images as one PNG (nearest-neighbour upscaled)."""
    from PIL import Image

    arr = to_uint8(images[: nrow * nrow])
    n, h, w, c = arr.shape
    rows = (n + nrow - 1) // nrow
    grid = np.zeros((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), dtype=np.uint8)
    for i, img in enumerate(arr):
        r, col = divmod(i, nrow)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = img
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    with atomic_file(path, "wb") as handle:
        image.save(handle, format="PNG")
