"""Task-vector analysis (the paper's Fig. 6b): norms, per-layer norms, cosines, and their plots.

:func:`task_vector_stats` reads the task-vector safetensors files one tensor
key at a time (never a whole task vector in memory) and returns each range's
total L2 norm, per-tensor and per-layer norms, and the N x N cosine
similarity between the flattened task vectors. :func:`write_analysis` also
draws them (:mod:`dtm_core.plots`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .io import write_json
from .plots import Range, plot_cosine, plot_layer_heatmap, plot_norms, range_labels
from .task_vector import open_task_vectors, stacked


def layer_of(key: str) -> str:
    """The module path of a tensor key: ``a.b.conv.weight`` -> ``a.b.conv``."""
    return key.rsplit(".", 1)[0] if "." in key else key


def task_vector_stats(files: Sequence[str | Path]) -> dict[str, Any]:
    """Norms and cosine similarities of N task vectors, streamed key by key.

    Returns ``num_vectors``; ``total_norm`` (N floats); ``per_tensor`` and
    ``per_layer`` (name -> N norms; layers in order of first appearance in
    the sorted keys); ``cosine`` (N x N nested lists; NaN where a task
    vector is all zeros).
    """
    n = len(files)
    gram = torch.zeros(n, n, dtype=torch.float64)
    per_tensor: dict[str, list[float]] = {}
    layer_sq: dict[str, torch.Tensor] = {}
    with open_task_vectors(files) as (handles, keys):
        for key in keys:
            flat = stacked(handles, key).reshape(n, -1).double()
            g = flat @ flat.T
            gram += g
            sq = g.diagonal()
            per_tensor[key] = sq.sqrt().tolist()
            layer = layer_of(key)
            layer_sq[layer] = layer_sq.get(layer, torch.zeros(n, dtype=torch.float64)) + sq
    norms = gram.diagonal().sqrt()
    cosine = gram / torch.outer(norms, norms)  # 0/0 -> NaN for an all-zero task vector
    return {
        "num_vectors": n,
        "total_norm": norms.tolist(),
        "per_tensor": per_tensor,
        "per_layer": {layer: v.sqrt().tolist() for layer, v in layer_sq.items()},
        "cosine": cosine.tolist(),
    }


def write_analysis(
    files: Sequence[str | Path], ranges: Optional[Sequence[Range]], out_dir: str | Path
) -> dict[str, Any]:
    """Compute :func:`task_vector_stats` and write ``tv_norms.png``,
    ``tv_layer_heatmap.png``, ``tv_cosine.png`` and ``cosine.json`` to ``out_dir``."""
    stats = task_vector_stats(files)
    labels = range_labels(stats["num_vectors"], ranges)  # checks ranges against N before writing anything
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_norms(stats, out / "tv_norms.png", ranges)
    plot_layer_heatmap(stats, out / "tv_layer_heatmap.png", ranges)
    plot_cosine(stats, out / "tv_cosine.png", ranges)
    write_json(
        out / "cosine.json",
        {
            "labels": labels,
            "ranges": [list(r) for r in ranges] if ranges is not None else None,
            "total_norm": stats["total_norm"],
            "cosine": stats["cosine"],
        },
    )
    return stats
