"""Merge task vectors back into one model: theta_merged = theta + scale * merge(tau_1..tau_N).

Merge methods are small pure functions over the N task-vector tensors of one
parameter (stacked along dim 0) and their weights, ``MergeFn(task_tensors,
weights) -> Tensor``; knobs such as ``density`` are bound with
:func:`get_method`. Besides :func:`task_arithmetic` (Eq. 8 of the paper) they are
TIES, DARE and magnitude pruning as PEFT's ``peft.utils.merge_utils`` defines
them (the same numbers, bit for bit; written out because importing peft costs
every stage ~2 s).

:func:`merge_files` streams tensor by tensor from the saved task-vector files,
so peak memory is the merged model plus N copies of a single tensor, whatever
N is. The DARE methods drop entries at random; each tensor's mask is drawn
from a generator seeded by (merge seed, tensor key), so a merge is
reproducible and does not depend on the order tensors are visited in.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from .errors import TaskVectorError
from .seeding import derive_seed
from .task_vector import StateDict, open_task_vectors, stacked

MergeFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _shaped(weights: torch.Tensor, task_tensors: torch.Tensor) -> torch.Tensor:
    return weights.to(task_tensors.dtype).view(-1, *([1] * (task_tensors.dim() - 1)))


def task_arithmetic(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 8 of the paper: sum_i w_i tau_i."""
    return (_shaped(weights, task_tensors) * task_tensors).sum(dim=0)


def _trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """``tau`` with all but its ``int(density * numel)`` largest-magnitude entries set to zero."""
    if density >= 1:
        return tau
    flat = tau.reshape(-1)
    keep = torch.zeros_like(flat)
    keep[flat.abs().topk(int(density * flat.numel())).indices] = 1
    return tau * keep.view_as(tau)


def _drop(tau: torch.Tensor, density: float) -> torch.Tensor:
    """DARE's drop: each entry kept with probability ``density`` (global RNG), the kept ones scaled by 1/density."""
    if density >= 1:
        return tau
    return tau * torch.bernoulli(torch.full_like(tau, density)) / density


def _each(task_tensors: torch.Tensor, prune: Callable[[torch.Tensor, float], torch.Tensor],
          density: float) -> torch.Tensor:
    """``prune`` applied to every task vector on its own, tau_1 first (the order DARE's masks are drawn in)."""
    return torch.stack([prune(tau, density) for tau in task_tensors.unbind(0)])


def _elect_and_average(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TIES' last two steps: elect each entry's sign by the summed mass of the (unweighted) taus, average the
    weighted entries that agree with it (entries where none agrees become 0)."""
    signs = task_tensors.sign()
    agree = signs == torch.where(task_tensors.sum(dim=0) >= 0, 1, -1)
    weighted = _shaped(weights, task_tensors) * task_tensors
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def ties(task_tensors: torch.Tensor, weights: torch.Tensor, *, density: float = 0.5) -> torch.Tensor:
    """TIES: keep each tau_i's top-``density`` entries by magnitude, elect a sign per
    entry (sign of the summed trimmed taus), average the weighted entries that agree."""
    return _elect_and_average(_each(task_tensors, _trim, density), weights)


def dare_linear(task_tensors: torch.Tensor, weights: torch.Tensor, *, density: float = 0.5) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, rescale by 1/density, weighted sum."""
    return task_arithmetic(_each(task_tensors, _drop, density), weights)


def dare_ties(task_tensors: torch.Tensor, weights: torch.Tensor, *, density: float = 0.5) -> torch.Tensor:
    """DARE's random drop and rescale, then TIES' sign election and disjoint mean."""
    return _elect_and_average(_each(task_tensors, _drop, density), weights)


def magnitude_prune(task_tensors: torch.Tensor, weights: torch.Tensor, *, density: float = 0.5) -> torch.Tensor:
    """Keep each tau_i's top-``density`` fraction of entries by magnitude, weighted sum.

    ``int(density * numel)`` entries survive (as in PEFT), so a tensor smaller
    than 1/density entries is pruned to zero.
    """
    return task_arithmetic(_each(task_tensors, _trim, density), weights)


METHODS: dict[str, Callable[..., torch.Tensor]] = {
    fn.__name__: fn for fn in (task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune)}
# Methods that take merge.density, and those that draw random numbers.
USES_DENSITY = frozenset({"ties", "dare_linear", "dare_ties", "magnitude_prune"})
STOCHASTIC = frozenset({"dare_linear", "dare_ties"})


def get_method(name: str, density: float = 0.5) -> MergeFn:
    """The merge function called ``name`` (merge.method, checked by the config) with ``density`` bound where it
    takes one."""
    fn = METHODS[name]
    return functools.partial(fn, density=density) if name in USES_DENSITY else fn


def merge_tensor(
    task_tensors: torch.Tensor,
    weights: torch.Tensor,
    method: str = "task_arithmetic",
    *,
    density: float = 0.5,
    seed: int = 0,
    key: str = "",
) -> torch.Tensor:
    """The combined task vector of one parameter, ``method(tau_1..tau_N)``.

    Random methods draw on the CPU from a generator seeded by (``seed``,
    ``key``) inside a forked RNG, so the result is the same whatever was drawn
    before, and the caller's global random state is left untouched.
    """
    fn = get_method(method, density)
    if method not in STOCHASTIC:
        return fn(task_tensors, weights)
    device = task_tensors.device
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(derive_seed(seed, f"merge:{key}"))
        return fn(task_tensors.cpu(), weights.cpu()).to(device)


def block_of(key: str) -> str:
    """The top-level UNet block a tensor belongs to: ``down_blocks.1``, ``mid_block``, ``conv_in`` ..."""
    parts = key.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0]


def merge_files(
    base: StateDict,
    task_vector_files: Sequence[str | Path],
    weights: Sequence[float],
    method: str = "task_arithmetic",
    *,
    density: float = 0.5,
    scale: float = 1.0,
    seed: int = 0,
    block_weights: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, torch.Tensor]:
    """``base + scale * method(tau_1..tau_N)`` for every tensor the task vectors cover.

    Tensors the task vectors do not cover are copied from ``base``. ``seed``
    only matters for the random (DARE) methods. ``block_weights`` (block ->
    N weights, :func:`block_of`) overrides ``weights`` for the tensors of the
    blocks it names.
    """
    w = torch.tensor(list(weights), dtype=torch.float32)
    merged = {k: v.clone() for k, v in base.items()}
    with open_task_vectors(task_vector_files) as (handles, keys):
        missing = set(keys) - set(base)
        if missing:
            raise TaskVectorError(f"the base model lacks tensors the task vectors cover: {sorted(missing)[:3]}")
        for key in keys:
            taus = stacked(handles, key)
            if taus.shape[1:] != base[key].shape:
                raise TaskVectorError(
                    f"tensor '{key}': task vectors have shape {tuple(taus.shape[1:])}, "
                    f"base has {tuple(base[key].shape)}"
                )
            wk = w
            if block_weights is not None and block_of(key) in block_weights:
                wk = torch.tensor(list(block_weights[block_of(key)]), dtype=torch.float32)
            combined = merge_tensor(taus, wk, method, density=density, seed=seed, key=key)
            merged[key] = (base[key].float() + scale * combined).to(base[key].dtype)
    return merged


def parameter_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """L2 distance over the floating-point tensors both state dicts share."""
    total = torch.zeros((), dtype=torch.float64)
    for k, v in a.items():
        if k in b and torch.is_floating_point(v):
            total += ((v.double() - b[k].double()) ** 2).sum()
    return float(total.sqrt())
