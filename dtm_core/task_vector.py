"""Task vectors as values, and their file format.

tau = theta_finetuned - theta_base over the floating-point tensors (integer
buffers are skipped); ``apply_to`` adds it, scaled, to a base state dict.

On disk a task vector is one safetensors file: tensor name -> float32 delta.
:func:`open_task_vectors` opens several lazily and :func:`stacked` reads one
tensor of each at a time, so merging and analysis never hold N whole task
vectors in memory.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import MissingInputError, TaskVectorError
from .io import atomic_path

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

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.vector.items()}, str(tmp))

    @classmethod
    def load(cls, path: str | Path) -> "TaskVector":
        path = Path(path)
        if not path.is_file():
            raise MissingInputError(f"task vector '{path}' is missing: run dvc repro task_vectors")
        try:
            return cls(load_file(str(path)))
        except (SafetensorError, OSError) as exc:
            raise TaskVectorError(f"task vector '{path}' is corrupt ({exc}); re-run dvc repro task_vectors") from exc


@contextlib.contextmanager
def open_task_vectors(files: Sequence[str | Path]) -> Iterator[tuple[list, list[str]]]:
    """Open task-vector safetensors files lazily; yield (handles, sorted keys).

    Every file must exist, be readable and cover the same tensors. Tensors are
    read one at a time with :func:`stacked`, never all at once.
    """
    if not files:
        raise MissingInputError("no task vector files given: run dvc repro task_vectors")
    with contextlib.ExitStack() as stack:
        handles = []
        for path in files:
            if not Path(path).is_file():
                raise MissingInputError(f"task vector '{path}' is missing: run dvc repro task_vectors")
            try:
                handles.append(stack.enter_context(safe_open(str(path), framework="pt")))
            except (SafetensorError, OSError) as exc:
                raise TaskVectorError(
                    f"task vector '{path}' is corrupt ({exc}); re-run dvc repro task_vectors"
                ) from exc
        keys = set(handles[0].keys())
        for path, h in zip(files, handles):
            if set(h.keys()) != keys:
                raise TaskVectorError(f"task vector '{path}' covers different tensors than '{files[0]}'")
        yield handles, sorted(keys)


def stacked(handles: Sequence, key: str) -> torch.Tensor:
    """Tensor ``key`` of every open task vector, as float32 stacked along dim 0."""
    return torch.stack([h.get_tensor(key).float() for h in handles])
