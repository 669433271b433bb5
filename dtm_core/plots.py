"""Every PNG the pipeline draws: task-vector analysis, weight search, held-out loss curves.

Figures use matplotlib's object API on the Agg canvas (no pyplot, no global
backend switch) and are written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import TaskVectorError
from .io import atomic_path

Range = Sequence[int]


def range_labels(n: int, ranges: Optional[Sequence[Range]] = None) -> list[str]:
    """``[lo, hi)`` per range when the bounds are known, else ``range i``."""
    if ranges is None:
        return [f"range {i}" for i in range(n)]
    if len(ranges) != n:
        raise TaskVectorError(
            f"{len(ranges)} timestep ranges for {n} task vectors: the partition and the task vectors disagree; "
            "re-run dvc repro"
        )
    return [f"[{lo}, {hi})" for lo, hi in ranges]


def new_figure(width: float, height: float, columns: int = 1):
    """A matplotlib Figure on an Agg canvas and its single Axes (or a row of ``columns`` Axes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot() if columns == 1 else fig.subplots(1, columns)


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
    ax.set(xlabel="timestep range", ylabel="||tau_i|| (L2)", title="task vector norm by range")
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
    ax.set(xlabel="timestep range", title="task vector norm per layer")
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


def plot_search(result, path: str | Path) -> None:
    """Score by evaluation index, the best candidate marked, as a PNG."""
    fig, ax = new_figure(6.0, 3.5)
    xs = [c["index"] for c in result.candidates]
    ys = [c["score"] if math.isfinite(c["score"]) else math.nan for c in result.candidates]
    ax.plot(xs, ys, "o", color="tab:blue", markersize=4, label="candidate")
    ax.step(xs, np.fmin.accumulate(np.array(ys, dtype=float)), where="post", color="tab:gray", linewidth=1,
            label="best so far")
    best = min(result.candidates, default=None,
               key=lambda c: (c["score"] if math.isfinite(c["score"]) else math.inf, c["index"]))
    if best is not None and math.isfinite(best["score"]):
        label = "best: w=[" + ", ".join(f"{w:.3g}" for w in best["weights"]) + f"], score {best['score']:.4g}"
        ax.plot([best["index"]], [best["score"]], "*", color="tab:red", markersize=14, label=label)
    ax.set(xlabel="evaluation", ylabel="score (lower is better)",
           title=f"merge weight search ({result.strategy}, {result.evaluations} evaluations)")
    ax.legend(fontsize=7, loc="best")
    save_figure(fig, path)


def plot_heldout_loss(curves: dict, ranges: Sequence[Range], path: str | Path) -> None:
    """Held-out eps-MSE by timestep: each model, and each model's difference to the pretrained one.

    ``curves`` has ``timesteps``, one curve per model name, and optionally
    ``range_models`` (one curve per range model over all t, drawn thin and
    dashed: how each range model does outside its own range).
    """
    t = curves["timesteps"]
    names = [k for k in curves if k not in ("timesteps", "range_models")]
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    fig, (ax_abs, ax_rel) = new_figure(11.0, 4.0, columns=2)
    base = curves.get("pretrained")
    for name in names:
        ax_abs.plot(t, curves[name], label=name, color=colors[name], linewidth=1.4)
        if base is not None and name != "pretrained":
            ax_rel.plot(t, [a - b for a, b in zip(curves[name], base)], label=f"{name} − pretrained",
                        color=colors[name], linewidth=1.4)
    if base is not None:
        for i, curve in enumerate(curves.get("range_models") or []):
            ax_rel.plot(t, [a - b for a, b in zip(curve, base)], color="gray", linestyle="--", linewidth=0.7,
                        label="range models, all t" if i == 0 else None)
    for lo, _ in ranges[1:]:
        for ax in (ax_abs, ax_rel):
            ax.axvline(lo, color="gray", linestyle=":", linewidth=0.8)
    ax_abs.set(yscale="log", xlabel="timestep t", ylabel="held-out eps-MSE", title="held-out denoising loss")
    ax_abs.legend(fontsize=7)
    ax_rel.axhline(0.0, color="black", linewidth=0.8)
    ax_rel.set(xlabel="timestep t", ylabel="difference to pretrained (lower is better)",
               title="against the pretrained model")
    ax_rel.legend(fontsize=7)
    save_figure(fig, path)


def plot_affinity(A, bin_edges: Sequence[int], ranges: Sequence[Range], path: str | Path) -> None:
    """The bins' gradient-affinity matrix with the chosen range boundaries (the gradient-conflict picture)."""
    n_bins = len(bin_edges) - 1
    fig, ax = new_figure(6.0, 5.0)
    image = ax.imshow(A, vmin=-1.0, vmax=1.0, cmap="RdBu_r", interpolation="nearest", origin="lower",
                      extent=(bin_edges[0], bin_edges[-1], bin_edges[0], bin_edges[-1]))
    fig.colorbar(image, ax=ax, label="cosine similarity of loss gradients")
    for lo, _ in ranges[1:]:
        ax.axvline(lo, color="black", linewidth=1.2)
        ax.axhline(lo, color="black", linewidth=1.2)
    ax.set(xlabel="timestep t", ylabel="timestep t", title=f"gradient affinity, {n_bins} bins; lines: chosen ranges")
    save_figure(fig, path)


def plot_guidance(curves: dict, path: str | Path) -> None:
    """FD against conditional accuracy over guidance scales, one line per model (the text-to-image papers'
    FID against CLIP score)."""
    fig, ax = new_figure(6.0, 4.5)
    for i, (name, rows) in enumerate(curves.items()):
        acc, fd = [r["conditional_accuracy"] for r in rows], [r["fd"] for r in rows]
        ax.plot(acc, fd, marker="o", color=f"C{i}", label=name)
        for r in rows:
            ax.annotate(f"{r['scale']:g}", (r["conditional_accuracy"], r["fd"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set(xlabel="conditional accuracy (classifier agrees with the prompt)", ylabel="FD (lower is better)",
           title="guidance scale sweep")
    ax.legend(fontsize=7)
    save_figure(fig, path)
