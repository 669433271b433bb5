"""Merge task vectors back into one model: theta_merged = theta + merge(tau_1..tau_N).

Merge methods are small pure functions over the N task-vector tensors of one
parameter (stacked along dim 0) and their weights. :func:`merge_files`
streams tensor by tensor from the saved task-vector files, so peak memory is
the merged model plus N copies of a single tensor, whatever N is.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open

from .task_vector import StateDict, TaskVectorError

MergeFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def task_arithmetic(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 8 of the paper: sum_i w_i tau_i."""
    w = weights.to(task_tensors.dtype).view(-1, *([1] * (task_tensors.dim() - 1)))
    return (w * task_tensors).sum(dim=0)


METHODS: dict[str, MergeFn] = {"task_arithmetic": task_arithmetic}


def get_method(name: str) -> MergeFn:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"merge.method '{name}' is unknown; choose one of {sorted(METHODS)}") from None


def merge_files(
    base: StateDict,
    task_vector_files: Sequence[str | Path],
    weights: Sequence[float],
    method: str = "task_arithmetic",
) -> dict[str, torch.Tensor]:
    """``base + method(tau_1..tau_N)`` for every tensor the task vectors cover."""
    if len(weights) != len(task_vector_files):
        raise ValueError(f"{len(weights)} merge weights for {len(task_vector_files)} task vectors")
    fn = get_method(method)
    w = torch.tensor(list(weights), dtype=torch.float32)
    merged = {k: v.clone() for k, v in base.items()}
    with ExitStack() as stack:
        handles = []
        for path in task_vector_files:
            if not Path(path).is_file():
                raise FileNotFoundError(f"task vector '{path}' is missing: run dvc repro task_vectors")
            try:
                handles.append(stack.enter_context(safe_open(str(path), framework="pt")))
            except (SafetensorError, OSError) as exc:
                raise TaskVectorError(f"task vector '{path}' is corrupt ({exc}); re-run dvc repro task_vectors") from exc
        keys = set(handles[0].keys())
        for path, h in zip(task_vector_files, handles):
            if set(h.keys()) != keys:
                raise TaskVectorError(f"task vector '{path}' covers different tensors than '{task_vector_files[0]}'")
        missing = keys - set(base)
        if missing:
            raise TaskVectorError(f"the base model lacks tensors the task vectors cover: {sorted(missing)[:3]}")
        for key in sorted(keys):
            stacked = torch.stack([h.get_tensor(key).float() for h in handles])
            if stacked.shape[1:] != base[key].shape:
                raise TaskVectorError(
                    f"tensor '{key}': task vectors have shape {tuple(stacked.shape[1:])}, "
                    f"base has {tuple(base[key].shape)}"
                )
            merged[key] = (base[key].float() + fn(stacked, w)).to(base[key].dtype)
    return merged


def parameter_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """L2 distance over the floating-point tensors both state dicts share."""
    total = torch.zeros((), dtype=torch.float64)
    for k, v in a.items():
        if k in b and torch.is_floating_point(v):
            total += ((v.double() - b[k].double()) ** 2).sum()
    return float(total.sqrt())
