"""Task vectors as values: tau = theta_finetuned - theta_base.

Only floating-point tensors take part (integer buffers are skipped). A task
vector supports ``+``, unary ``-``, scaling by a number, and ``apply_to`` a
base state dict; it is saved as one safetensors file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .io import atomic_path
from .errors import TaskVectorError

StateDict = Mapping[str, torch.Tensor]


def _float_items(state: StateDict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if torch.is_floating_point(v)}


class TaskVector:
    def __init__(self, vector: Mapping[str, torch.Tensor]):
        self.vector = {k: v.detach().to(torch.float32) for k, v in vector.items()}

    @classmethod
    def from_states(cls, base: StateDict, finetuned: StateDict, what: str = "fine-tuned model") -> "TaskVector":
        base_f, ft_f = _float_items(base), _float_items(finetuned)
        if set(base_f) != set(ft_f):
            missing = sorted(set(base_f) - set(ft_f))[:3]
            extra = sorted(set(ft_f) - set(base_f))[:3]
            raise TaskVectorError(
                f"{what} and the pretrained model have different tensors (missing {missing}, extra {extra}); "
                "were they built with the same model config?"
            )
        out = {}
        for k in sorted(base_f):
            if base_f[k].shape != ft_f[k].shape:
                raise TaskVectorError(
                    f"{what}: tensor '{k}' has shape {tuple(ft_f[k].shape)} but the pretrained model's is "
                    f"{tuple(base_f[k].shape)}; fine-tune from the same pretrained model."
                )
            out[k] = ft_f[k].float() - base_f[k].float()
        return cls(out)

    def _check_keys(self, other: "TaskVector") -> None:
        if set(self.vector) != set(other.vector):
            raise TaskVectorError("task vectors cover different tensors")

    def __add__(self, other: "TaskVector") -> "TaskVector":
        self._check_keys(other)
        return TaskVector({k: v + other.vector[k] for k, v in self.vector.items()})

    def __radd__(self, other):
        return self if other in (0, None) else self.__add__(other)

    def __neg__(self) -> "TaskVector":
        return TaskVector({k: -v for k, v in self.vector.items()})

    def __sub__(self, other: "TaskVector") -> "TaskVector":
        return self + (-other)

    def __mul__(self, scale: float) -> "TaskVector":
        return TaskVector({k: v * float(scale) for k, v in self.vector.items()})

    __rmul__ = __mul__

    def apply_to(self, base: StateDict, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """``base + scale * tau`` for the tensors the vector covers; others copied."""
        out = {}
        for k, v in base.items():
            if k in self.vector:
                if v.shape != self.vector[k].shape:
                    raise TaskVectorError(f"tensor '{k}': base shape {tuple(v.shape)} != task vector shape")
                out[k] = (v.float() + scale * self.vector[k]).to(v.dtype)
            else:
                out[k] = v.clone()
        missing = set(self.vector) - set(base)
        if missing:
            raise TaskVectorError(f"base model lacks tensors of the task vector: {sorted(missing)[:3]}")
        return out

    def norms(self) -> dict[str, float]:
        return {k: float(v.norm()) for k, v in self.vector.items()}

    def total_norm(self) -> float:
        return float(torch.sqrt(sum((v.double() ** 2).sum() for v in self.vector.values())))

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.vector.items()}, str(tmp))

    @classmethod
    def load(cls, path: str | Path) -> "TaskVector":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"task vector '{path}' is missing: run dvc repro task_vectors")
        try:
            return cls(load_file(str(path)))
        except (SafetensorError, OSError) as exc:
            raise TaskVectorError(f"task vector '{path}' is corrupt ({exc}); re-run dvc repro task_vectors") from exc
