"""Task-vector analysis (the paper's Fig. 6b) and the project's PNG plotting helpers.

:func:`task_vector_stats` reads the task-vector safetensors files one tensor
key at a time (never a whole task vector in memory) and returns each range's
total L2 norm, per-tensor and per-layer norms, and the N x N cosine
similarity between the flattened task vectors. :func:`write_analysis` also
draws them. Figures use matplotlib's object API on the Agg canvas (no pyplot,
no global backend switch) and are written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .io import atomic_path, write_json
from .merge import open_task_vectors, stacked

Range = Sequence[int]


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


def range_labels(n: int, ranges: Optional[Sequence[Range]] = None) -> list[str]:
    """``[lo, hi)`` per range when the bounds are known, else ``range i``."""
    if ranges is None:
        return [f"range {i}" for i in range(n)]
    if len(ranges) != n:
        raise ValueError(f"{len(ranges)} timestep ranges for {n} task vectors; the partition and task vectors disagree")
    return [f"[{lo}, {hi})" for lo, hi in ranges]


def new_figure(width: float, height: float):
    """A matplotlib Figure on an Agg canvas and its single Axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def save_figure(fig, path: str | Path, dpi: int = 120) -> None:
    """Write ``fig`` as a PNG at ``path``, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")


def plot_norms(stats: dict, path: str | Path, ranges: Optional[Sequence[Range]] = None) -> None:
    """Bar chart of the total norm ||tau_i|| by timestep range."""
    norms = stats["total_norm"]
    labels = range_labels(len(norms), ranges)
    fig, ax = new_figure(max(4.0, 0.9 * len(norms) + 1.5), 3.5)
    ax.bar(range(len(norms)), norms, color="tab:blue")
    ax.set_xticks(range(len(norms)), labels, rotation=30 if len(norms) > 4 else 0)
    ax.set_xlabel("timestep range")
    ax.set_ylabel("||tau_i|| (L2)")
    ax.set_title("task vector norm by range")
    save_figure(fig, path)


def plot_layer_heatmap(stats: dict, path: str | Path, ranges: Optional[Sequence[Range]] = None) -> None:
    """Heatmap of per-layer task-vector norms, layers x ranges."""
    layers = list(stats["per_layer"])
    n = stats["num_vectors"]
    values = [stats["per_layer"][layer] for layer in layers]
    fig, ax = new_figure(max(4.0, 0.7 * n + 4.0), min(40.0, max(3.0, 0.16 * len(layers) + 1.0)))
    image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="per-layer L2 norm")
    ax.set_xticks(range(n), range_labels(n, ranges), rotation=30 if n > 4 else 0)
    step = max(1, math.ceil(len(layers) / 80))  # at most ~80 readable labels
    ax.set_yticks(range(0, len(layers), step), layers[::step], fontsize=6)
    ax.set_xlabel("timestep range")
    ax.set_title("task vector norm per layer")
    save_figure(fig, path)


def plot_cosine(stats: dict, path: str | Path, ranges: Optional[Sequence[Range]] = None) -> None:
    """The N x N cosine-similarity matrix between task vectors, values annotated."""
    cosine = stats["cosine"]
    n = len(cosine)
    labels = range_labels(n, ranges)
    fig, ax = new_figure(max(3.5, 0.8 * n + 2.0), max(3.0, 0.8 * n + 1.5))
    image = ax.imshow(cosine, vmin=-1.0, vmax=1.0, cmap="RdBu_r", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="cosine similarity")
    for i in range(n):
        for j in range(n):
            v = cosine[i][j]
            text = "n/a" if math.isnan(v) else f"{v:.2f}"
            color = "white" if not math.isnan(v) and abs(v) > 0.6 else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(n), labels, rotation=30 if n > 4 else 0)
    ax.set_yticks(range(n), labels)
    ax.set_title("cosine similarity of task vectors")
    save_figure(fig, path)


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
