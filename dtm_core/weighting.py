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
WEIGHTINGS = ("none", "snr_plus_one", "trunc_snr", "min_snr", "p2")


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.double()
    return a / (1.0 - a)


def raw_weights(name: str, alphas_cumprod: torch.Tensor, gamma: Optional[float] = None) -> torch.Tensor:
    """w(t) for every t in [0, T), before normalisation (float64)."""
    s = snr(alphas_cumprod)
    g = DEFAULT_GAMMA.get(name) if gamma is None else gamma
    if name == "none":
        return torch.ones_like(s)
    if name == "snr_plus_one":
        return (s + 1.0) / s
    if name == "trunc_snr":
        return torch.clamp(s, min=1.0) / s
    if name == "min_snr":
        return torch.clamp(s, max=g) / s
    if name == "p2":
        return 1.0 / (1.0 + s) ** g
    raise ValueError(f"unknown weighting '{name}'; choose one of {WEIGHTINGS}")


def timestep_weights(name: str, alphas_cumprod: torch.Tensor, gamma: Optional[float] = None) -> torch.Tensor:
    """w(t) normalised to mean 1 over [0, T), as float32 (index it with the batch's timesteps)."""
    w = raw_weights(name, alphas_cumprod, gamma)
    return (w / w.mean()).float()
