"""report: the comparison against the shared baseline (JSON + Markdown) and the MLflow parent's summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import metrics as metrics_mod
from ..config import Params, derive_seed, flatten
from ..io import atomic_file, read_json, write_json
from .common import EVAL_MODELS, METRICS_DIR, REPORT_DIR, SAMPLES_DIR, TASK_VECTOR_DIR, NullRun, load_reference


def _paired_difference(params: Params, model: str, reference: np.ndarray) -> dict:
    """FD(model) - FD(shared) with a paired bootstrap CI (both sampled from the same noise)."""
    with np.load(SAMPLES_DIR / f"{model}.npz") as a, np.load(SAMPLES_DIR / "shared.npz") as b:
        fa, fb = a["features"], b["features"]
    fd = metrics_mod.frechet_distance
    low, high = metrics_mod.bootstrap_ci(fa, reference, fd, params.evaluate.bootstrap_rounds,
                                         derive_seed(params.seed, f"paired-{model}"), paired_with=fb)
    delta = fd(fa, reference) - fd(fb, reference)
    verdict = "better" if high < 0 else "worse" if low > 0 else "not distinguishable"
    return {"fd_delta": delta, "fd_delta_ci": [low, high], "verdict": verdict}


def report(params: Params, run: Any = NullRun()) -> dict:
    results = {name: read_json(METRICS_DIR / f"{name}.json", f"evaluation of {name}") for name in EVAL_MODELS}
    clf = read_json(METRICS_DIR / "classifier.json", "classifier metrics")
    merge_info = read_json(METRICS_DIR / "merge.json", "merge metrics")
    reference = load_reference(params.evaluate.features)["train"]
    base_fd, base_kid = results["shared"]["fd"], results["shared"]["kid"]
    table = {}
    for name, r in results.items():
        table[name] = {
            **{k: r[k] for k in ("fd", "kid", "fd_ci", "kid_ci", "fd_seed_std", "kid_seed_std", "fd_at_floor_n",
                                 "class_tv_distance", "class_kl_divergence", "mean_confidence")},
            "fd_vs_shared": (r["fd"] - base_fd) / base_fd if base_fd else None,
            "kid_vs_shared": (r["kid"] - base_kid) / abs(base_kid) if base_kid else None,
        }
    for name in ("merged", "ensemble", "pretrained"):
        table[name]["vs_shared"] = _paired_difference(params, name, reference)
    comparison = {
        **table,
        "floor": {"fd": clf["floor_fd"], "kid": clf["floor_kid"], "fd_ci": clf["floor_fd_ci"],
                  "num_samples": clf["floor_num_samples"]},
        "merge": {k: merge_info.get(k) for k in ("method", "weights", "applied_scale", "tau_norms",
                                                  "distance_from_pretrained", "search")},
        "settings": {
            "features": params.evaluate.features,
            "num_samples": params.evaluate.num_samples,
            "noise_seeds": params.evaluate.noise_seeds,
            "ddim_steps": params.evaluate.ddim_steps,
            "bootstrap_rounds": params.evaluate.bootstrap_rounds,
            "num_ranges": params.num_ranges,
            "finetune_steps_per_range": params.finetune.steps,
            "shared_steps": params.num_ranges * params.finetune.steps,
            "classifier_heldout_accuracy": clf["heldout_accuracy"],
            "seed": params.seed,
        },
        "params": flatten(params),
        "mlflow": {"parent_run_id": run.parent_id, "report_run_id": run.run_id},
    }
    write_json(REPORT_DIR / "comparison.json", comparison)
    with atomic_file(REPORT_DIR / "comparison.md") as handle:
        handle.write(render_markdown(comparison))
    summary = {f"{name}/{k}": table[name][k] for name in EVAL_MODELS for k in ("fd", "kid")}
    summary["merged_minus_shared/fd"] = table["merged"]["vs_shared"]["fd_delta"]
    summary["floor/fd"] = clf["floor_fd"]
    run.log_parent_metrics(summary)
    for name in ("comparison.json", "comparison.md"):
        run.log_parent_artifact(REPORT_DIR / name, "report")
    for name in EVAL_MODELS:
        run.log_parent_artifact(SAMPLES_DIR / f"{name}.png", "samples")
    for plot in sorted(Path(TASK_VECTOR_DIR).glob("*.png")):
        run.log_parent_artifact(plot, "task_vectors")
    return {f"{name}_fd": table[name]["fd"] for name in EVAL_MODELS}


def render_markdown(c: dict) -> str:
    s, f, m = c["settings"], c["floor"], c["merge"]
    fmt_ci = lambda ci, d=4: f"[{ci[0]:.{d}f}, {ci[1]:.{d}f}]"  # noqa: E731
    pct = lambda v: "–" if v is None else f"{100 * v:+.1f}%"  # noqa: E731
    space = "digit classifier" if s["features"] == "classifier" else "Inception (clean-fid, mode clean)"
    lines = [
        "# DeMe comparison",
        "",
        f"N = {s['num_ranges']} range models x {s['finetune_steps_per_range']} steps against a shared fine-tune of "
        f"{s['shared_steps']} steps (equal compute). {s['num_samples']} samples per model x {s['noise_seeds']} noise "
        f"seed(s), DDIM {s['ddim_steps']} steps, identical initial noise for every model. Feature space: {space} "
        f"(classifier held-out accuracy {s['classifier_heldout_accuracy']:.3f}). Intervals are 95% bootstrap "
        f"intervals over samples ({s['bootstrap_rounds']} resamples).",
        "",
        f"| model | FD [95% CI] | KID [95% CI] | FD vs shared | KID vs shared | FD at n={f['num_samples']} "
        "| class TV | class KL | confidence |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in EVAL_MODELS:
        r = c[name]
        seed_sd = f" ± {r['fd_seed_std']:.4f}" if s["noise_seeds"] > 1 else ""
        lines.append(
            f"| {name} | {r['fd']:.4f}{seed_sd} {fmt_ci(r['fd_ci'])} | {r['kid']:.5f} {fmt_ci(r['kid_ci'], 5)} "
            f"| {pct(r['fd_vs_shared'])} | {pct(r['kid_vs_shared'])} | {r['fd_at_floor_n']:.4f} "
            f"| {r['class_tv_distance']:.3f} | {r['class_kl_divergence']:.4f} | {r['mean_confidence']:.3f} |"
        )
    lines += [
        f"| real held-out vs train (floor) | | | | | {f['fd']:.4f} {fmt_ci(f['fd_ci'])} | | | |",
        "",
        "## Against the shared baseline (paired bootstrap: same noise, same resampled indices)",
        "",
        "| model | FD − FD(shared) | 95% CI | verdict |",
        "|---|---|---|---|",
    ]
    for name in ("merged", "ensemble", "pretrained"):
        v = c[name]["vs_shared"]
        lines.append(f"| {name} | {v['fd_delta']:+.4f} | {fmt_ci(v['fd_delta_ci'])} | {v['verdict']} |")
    weights = [round(w, 4) for w in (m.get("weights") or [])]
    lines += ["", "## Merge", "", f"Method `{m.get('method')}`, weights {weights}."]
    if m.get("tau_norms"):
        lines.append(f"Task-vector norms by range (low t to high t): {[round(x, 4) for x in m['tau_norms']]}; "
                     f"applied scale per range: {[round(x, 4) for x in (m.get('applied_scale') or [])]}.")
    if m.get("distance_from_pretrained") is not None:
        lines.append(f"Parameter distance of the merged model from the pretrained one: "
                     f"{m['distance_from_pretrained']:.4f}.")
    search = m.get("search")
    if search:
        lines += ["", f"Weight search ({search['strategy']}, {search['evaluations']} candidates, scored by FD on "
                  f"{search['num_samples']} validation samples from the search seed): best {search['best_weights']} "
                  f"with validation FD {search['best_score']:.4f}. Candidates: `merge/search.tsv`; "
                  "plot: `merge/search.png`."]
    lines += ["", "## Task vectors", ""]
    for png, title in (("tv_norms.png", "norm by range"), ("tv_layer_heatmap.png", "per-layer norms"),
                       ("tv_cosine.png", "cosine similarity")):
        if (TASK_VECTOR_DIR / png).exists():
            lines.append(f"![{title}](../{TASK_VECTOR_DIR}/{png})")
    lines += ["", "## Samples (same initial noise)", "", "| " + " | ".join(EVAL_MODELS) + " |",
              "|" + "---|" * len(EVAL_MODELS),
              "| " + " | ".join(f"![{n}](../{SAMPLES_DIR}/{n}.png)" for n in EVAL_MODELS) + " |", ""]
    lines += ["## Provenance", "", f"MLflow parent run `{c['mlflow']['parent_run_id']}`, report run "
              f"`{c['mlflow']['report_run_id']}`.", "", "<details><summary>params</summary>", "", "```"]
    lines += [f"{k}: {v}" for k, v in sorted(c["params"].items())]
    lines += ["```", "", "</details>", ""]
    return "\n".join(lines)
