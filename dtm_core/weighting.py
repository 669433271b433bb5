"""Timestep loss weightings: the Table 1 baselines that reweight the loss instead of decoupling timesteps.

Each weighting multiplies the per-sample eps-MSE at timestep t by w(t), with
SNR(t) = alpha_bar_t / (1 - alpha_bar_t), and is normalised so that its mean
over t in [0, T) is 1 (the loss keeps its scale, so the learning rate means
the same thing):

- ``snr_plus_one``: (SNR + 1) / SNR (the eps-loss form of v-prediction's weighting);
- ``trunc_snr``: max(SNR, 1) / SNR (truncated SNR);
- ``min_snr``: min(SNR, gamma) / SNR (Min-SNR-gamma, Hang et al. 2023; gamma 5 by default);
- ``p2``: 1 / (k + SNR)^gamma with k = 1 (P2, Choi et al. 2022; gamma 1 by default);
- ``none``: 1 everywhere.
"""

from __future__ import annotations

from typing import Optional

import torch

DEFAULT_GAMMA = {"min_snr": 5.0, "p2": 1.0}
# w(SNR, gamma) by finetune.weighting (the config checks the name)
WEIGHTINGS = {
    "none": lambda s, g: torch.ones_like(s),
    "snr_plus_one": lambda s, g: (s + 1.0) / s,
    "trunc_snr": lambda s, g: torch.clamp(s, min=1.0) / s,
    "min_snr": lambda s, g: torch.clamp(s, max=g) / s,
    "p2": lambda s, g: 1.0 / (1.0 + s) ** g,
}


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.double()
    return a / (1.0 - a)


def raw_weights(name: str, alphas_cumprod: torch.Tensor, gamma: Optional[float] = None) -> torch.Tensor:
    """w(t) for every t in [0, T), before normalisation (float64)."""
    return WEIGHTINGS[name](snr(alphas_cumprod), DEFAULT_GAMMA.get(name) if gamma is None else gamma)


def timestep_weights(name: str, alphas_cumprod: torch.Tensor, gamma: Optional[float] = None) -> torch.Tensor:
    """w(t) normalised to mean 1 over [0, T), as float32 (index it with the batch's timesteps)."""
    w = raw_weights(name, alphas_cumprod, gamma)
    return (w / w.mean()).float()
