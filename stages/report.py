"""DVC stage report: the comparison against the shared baseline and the pretrained model.

-> reports/comparison.{json,md}, reports/figures/, plots/heldout_loss.tsv,
metrics/comparison.json (the contrasts DVC compares across experiments), and
the MLflow parent run's summary (metrics, description, artifacts).

Every contrast is paired: FD differences bootstrap both models' samples with
the same indices (they share their initial noise); held-out loss differences
bootstrap held-out images (every model saw the same images and noise).
"""

from __future__ import annotations

import sys
from typing import Optional

import numpy as np

from dtm_core import distances
from dtm_core.config import Params
from dtm_core.io import atomic_dir, atomic_file, read_json, write_json
from dtm_core.partition import load_partition, range_columns
from dtm_core.plots import plot_guidance, plot_heldout_loss
from dtm_core.seeding import derive_seed
from dtm_core.tracking import NullRun
from stages.common import (
    EVAL_MODELS,
    EVALUATION_DIR,
    HELDOUT_LOSS_TSV,
    METRICS_DIR,
    PARTITION_ANALYSIS_DIR,
    PARTITION_FILE,
    REPORT_DIR,
    SAMPLES_DIR,
    TASK_VECTOR_DIR,
    WEIGHTS_FILE,
    load_reference,
    main,
    read_npz,
    reference_split,
)

FIGURES_DIR = REPORT_DIR / "figures"
# (model, baseline) pairs the report contrasts
CONTRASTS = (("merged", "shared"), ("ensemble", "shared"), ("pretrained", "shared"), ("merged", "pretrained"),
             ("ensemble", "pretrained"))
# evaluate's details that the report carries into each model's row
DETAILS = ("fd_ci", "kid_ci", "fd_at_floor_n", "fd_per_noise_seed", "class_tv_distance", "class_kl_divergence",
           "mean_confidence")
TV_FIGURES = (("tv_norms.png", "norm by range"), ("tv_layer_heatmap.png", "per-layer norms"),
              ("tv_cosine.png", "cosine similarity"))


def sampler_label(settings: dict) -> str:
    """'DPM-Solver++ 20 steps' from a report's settings."""
    name = {"ddim": "DDIM", "dpmsolver": "DPM-Solver++", "unipc": "UniPC"}[settings["sampler"]]
    return f"{name} {settings['sampling_steps']} steps"


def number(value: Optional[float]) -> str:
    """A table cell: four decimals, or a dash where the value was not computed."""
    return "–" if value is None else f"{value:.4f}"


def loss_contrast(a: np.ndarray, b: np.ndarray, cols: np.ndarray, rounds: int, seed: int) -> dict:
    """Mean held-out loss difference over timestep columns ``cols``, paired by image, with its interval."""
    diff = (a[:, cols] - b[:, cols]).mean(axis=1)
    ci = distances.paired_mean_ci(diff, rounds, seed)
    return {"delta": float(diff.mean()), "ci": list(ci), "relative": float(diff.mean() / b[:, cols].mean()),
            "verdict": distances.verdict(ci)}


def report(params: Params, run=NullRun()) -> dict:
    ev = params.evaluate
    rounds = params.report.bootstrap_rounds
    ranges, T = load_partition(PARTITION_FILE)
    headline = {m: read_json(METRICS_DIR / f"{m}.json", f"metrics of {m}") for m in EVAL_MODELS}
    details = {m: read_json(EVALUATION_DIR / f"{m}.json", f"evaluation of {m}") for m in EVAL_MODELS}
    clf = read_json(METRICS_DIR / "classifier.json", "classifier metrics")
    weights = read_json(WEIGHTS_FILE, "merge weights")
    ref = load_reference()
    against = reference_split(ref)
    reference = ref[against]
    data = {m: read_npz(SAMPLES_DIR / f"{m}.npz") for m in EVAL_MODELS}
    grid = data["shared"]["timesteps"]
    cols_by_range = range_columns(grid, ranges)
    all_cols = np.arange(len(grid))

    contrasts = {}
    for a, b in CONTRASTS:
        key = f"{a}_minus_{b}"
        la, lb = data[a]["losses"], data[b]["losses"]
        contrasts[key] = {
            # one resampling seed for every FD contrast: each model's bootstrap FDs are drawn once
            **distances.fd_contrast(data[a], data[b], reference, rounds, derive_seed(ev.seed, "paired-fd")),
            "heldout_loss": loss_contrast(la, lb, all_cols, rounds, derive_seed(ev.seed, f"loss-{key}")),
            "heldout_loss_by_range": [
                loss_contrast(la, lb, cols, rounds, derive_seed(ev.seed, f"loss-{key}-{i}"))
                for i, cols in enumerate(cols_by_range)
            ],
        }
    # does range model i beat the base (and the shared model) on its own range?
    own = data["ensemble"]["range_losses"]
    specialisation = [
        {"range": list(ranges[i]), **{
            f"vs_{b}": loss_contrast(own[i], data[b]["losses"], cols, rounds, derive_seed(ev.seed, f"{tag}-{i}"))
            for b, tag in (("pretrained", "special"), ("shared", "special-shared"))}}
        for i, cols in enumerate(cols_by_range)]
    models = {m: {**headline[m], **{k: details[m][k] for k in DETAILS},
                  "heldout_loss_by_range": [float(data[m]["losses"][:, c].mean()) for c in cols_by_range]}
              for m in EVAL_MODELS}
    floor = {"fd": clf["floor_fd"], "num_samples": clf["floor_num_samples"]}
    if against == "test":
        floor.update(test_floor(ref, len(data["shared"]["features"]), derive_seed(ev.seed, "floor")))
        for m in EVAL_MODELS:
            models[m]["fd_minus_floor"] = models[m]["fd"] - floor["fd_at_n"]
            # closer to the train split than to the test split by more than unseen real images are
            test_fd, train_fd = details[m]["fd_test_at_floor_n"], details[m]["fd_at_floor_n"]
            gap = None if train_fd is None else test_fd - train_fd  # None: fewer samples than the floor's n
            models[m]["train_test_gap"] = gap
            real = floor["real_train_test_gap"]
            models[m]["closer_to_train"] = None if gap is None or real is None else bool(gap > real)
    comparison = {
        "models": models,
        "contrasts": contrasts,
        "range_models": specialisation,
        "floor": floor,
        "merge": weights,
        "heldout_loss_curves": {"timesteps": grid.tolist(),
                                **{m: details[m]["heldout_loss_curve"] for m in EVAL_MODELS},
                                "range_models": details["ensemble"]["range_model_heldout_loss_curves"]},
        "settings": {
            **details["shared"]["settings"], "bootstrap_rounds": rounds, "reference": against,
            "num_ranges": len(ranges),
            "ranges": [list(r) for r in ranges], "finetune_steps_per_range": params.finetune.steps,
            "shared_steps": params.finetune.shared_total_steps(len(ranges)), "seed": params.seed,
            "classifier_heldout_accuracy": clf["heldout_accuracy"], "data_source": params.data.source,
            **({"classifier_test_accuracy": clf["test_accuracy"], "reference_name": clf.get("reference", "test")}
               if "test_accuracy" in clf else {}),
            "heldout_images": int(data["shared"]["losses"].shape[0]),
            "partition_method": read_json(PARTITION_FILE, "partition").get("method", "uniform"),
        },
    }
    curves = {m: details[m]["guidance_curve"] for m in EVAL_MODELS if "guidance_curve" in details[m]}
    if curves:  # a prompt-conditioned run
        comparison["guidance_curves"] = curves
    write_json(REPORT_DIR / "comparison.json", comparison)
    with atomic_file(HELDOUT_LOSS_TSV) as handle:
        handle.write("\t".join(["t", *EVAL_MODELS]) + "\n")
        for j, t in enumerate(grid):
            handle.write("\t".join([str(int(t)), *(f"{details[m]['heldout_loss_curve'][j]:.6g}" for m in EVAL_MODELS)])
                         + "\n")
    with atomic_dir(FIGURES_DIR) as tmp:
        plot_heldout_loss(comparison["heldout_loss_curves"], ranges, tmp / "heldout_loss.png")
        if curves:
            plot_guidance(curves, tmp / "guidance_curve.png")
    markdown = render_markdown(comparison)
    with atomic_file(REPORT_DIR / "comparison.md") as handle:
        handle.write(markdown)

    summary = {f"{m}/{k}": models[m][k] for m in EVAL_MODELS for k in ("fd", "kid", "heldout_loss",
                                                                           "memorised_fraction")}
    summary.update({f"{key}/fd": c["fd"] for key, c in contrasts.items()})
    summary["floor/fd"] = clf["floor_fd"]
    summary.update({f"{m}/conditional_accuracy": models[m]["conditional_accuracy"] for m in EVAL_MODELS
                    if "conditional_accuracy" in models[m]})
    run.log_parent_metrics(summary)
    run.set_tags({"mlflow.note.content": markdown}, run_id=run.parent_id)
    for path in (REPORT_DIR / "comparison.json", REPORT_DIR / "comparison.md", FIGURES_DIR / "heldout_loss.png"):
        run.log_parent_artifact(path, "report")
    for m in EVAL_MODELS:
        run.log_parent_artifact(SAMPLES_DIR / f"{m}.png", "samples")
    for plot in sorted(TASK_VECTOR_DIR.glob("*.png")):
        run.log_parent_artifact(plot, "task_vectors")
    if (PARTITION_ANALYSIS_DIR / "affinity.png").exists():
        run.log_parent_artifact(PARTITION_ANALYSIS_DIR / "affinity.png", "partition")
    return {key: {"fd": c["fd"], "heldout_loss": c["heldout_loss"]["delta"]}
            for key, c in contrasts.items() if key in ("merged_minus_shared", "ensemble_minus_shared",
                                                      "merged_minus_pretrained")}


def test_floor(ref: dict, n: int, seed: int) -> dict:
    """The real-vs-real floor at the models' sample count: FD between n train images and the test split (two
    disjoint real sets), and how much closer unseen real images (the validation split) sit to train than to
    test."""
    fd = distances.frechet_distance
    train = ref["train"]
    pick = np.random.default_rng(seed).permutation(len(train))[: min(n, len(train))]
    # a sweep's validation reference is the held-out split itself: no unseen images are left to gauge the gap
    gap = None if str(ref.get("test_name", "test")) == "validation" else \
        fd(ref["heldout"], ref["test"]) - fd(ref["heldout"], ref["train"])
    return {"fd_at_n": fd(train[pick], ref["test"]), "n": int(len(pick)), "real_train_test_gap": gap}


def _ci(ci: list[float], d: int = 4) -> str:
    return f"[{ci[0]:+.{d}f}, {ci[1]:+.{d}f}]"


def _loss_delta(x: dict) -> str:
    return f"{x['delta']:+.6f} {_ci(x['ci'], 6)}"


def compute_label(s: dict) -> str:
    """'equal steps' when the shared baseline ran N x steps, else its share of DeMe's total steps."""
    total = s["num_ranges"] * s["finetune_steps_per_range"]
    if s["shared_steps"] == total:
        return "equal steps"
    return f"its own budget, finetune.shared_steps: {s['shared_steps'] / total:.2f} x DeMe's {total}"


def render_markdown(c: dict) -> str:
    s, f, models = c["settings"], c["floor"], c["models"]
    against = s.get("reference", "train")
    test = against == "test"
    # validation: the held-out split stands in for test (a sweep)
    name = s.get("reference_name", "test") if test else against
    test_acc = f", {name} accuracy {s['classifier_test_accuracy']:.3f}" if test else ""
    space = (f"a classifier trained on the {s['data_source']} train split (held-out accuracy "
             f"{s['classifier_heldout_accuracy']:.3f}{test_acc})" if s["features"] == "classifier"
             else "Inception (clean-fid, mode clean)")
    lines = [
        "# DeMe comparison",
        "",
        f"Training seed {s['seed']}. N = {s['num_ranges']} range models x {s['finetune_steps_per_range']} steps "
        f"against a shared fine-tune of {s['shared_steps']} steps ({compute_label(s)}). {s['num_samples']} samples per "
        f"model x {s['noise_seeds']} noise seed(s), {sampler_label(s)}, identical initial noise for every "
        f"model. FD and KID in the feature space of {space}, against the {name} split. Held-out loss: eps-MSE on "
        f"the {s['heldout_images']} held-out images at {len(c['heldout_loss_curves']['timesteps'])} timesteps, the "
        f"same noise for every model. Intervals: 95% bootstrap, {s.get('model_bootstrap_rounds', '?')} resamples "
        f"for each model's FD and KID (evaluate.bootstrap_rounds), {s['bootstrap_rounds']} for the paired "
        "contrasts (report.bootstrap_rounds).",
        "",
        "| model | FD [95% CI] | " + ("FD − floor | FD vs train | " if test else "")
        + f"KID [95% CI] | held-out loss | memorised (pixels / features) | FD at n={f['num_samples']} | class TV |",
        "|---|---|" + ("---|---|" if test else "") + "---|---|---|---|---|",
    ]
    for m, r in models.items():
        lines.append(
            f"| {m} | {r['fd']:.4f} [{r['fd_ci'][0]:.4f}, {r['fd_ci'][1]:.4f}] | "
            + (f"{r['fd_minus_floor']:.4f} | {r['fd_train']:.4f} | " if test else "")
            + f"{r['kid']:.5f} [{r['kid_ci'][0]:.5f}, {r['kid_ci'][1]:.5f}] | {r['heldout_loss']:.5f} | "
            f"{r['memorised_fraction']:.4f} / {r['memorised_fraction_features']:.4f} | {number(r['fd_at_floor_n'])} | "
            f"{r['class_tv_distance']:.3f} |"
        )
    lines += [
        f"| real held-out vs train (floor at n={f['num_samples']}) | | " + ("| | " if test else "")
        + f"| | | {f['fd']:.4f} | |",
        "",
        "Columns. **FD**: Fréchet distance between the samples' features and the reference split's; lower is "
        "better, and it is biased upwards at small n, so compare it only at equal n. "
        + ("**FD − floor**: FD less the real-vs-real floor at the same n "
           f"({f['n']} train images against the {name} split: {f['fd_at_n']:.4f}), the number ratios use. "
           "**FD vs train**: against the images the models trained on. " if test else "")
        + "**KID**: the unbiased kernel distance; it can fall below zero, which means the samples are not "
        "distinguishable from the reference at this n. **Held-out loss**: the eps-prediction error on images no "
        "model trained on. **Memorised**: the fraction of samples closer to a train image than 95% of held-out "
        "images are (in pixels / in features); a model that generalises scores about 0.05. "
        f"**FD at n={f['num_samples']}**: FD of the first {f['num_samples']} samples against train, the only "
        "column the floor row (held-out images against train, at that n) can be compared with"
        + ("; – where a run has fewer samples than that" if any(r["fd_at_floor_n"] is None for r in models.values())
           else "") + ". **Class TV**: total "
        "variation distance between the samples' predicted classes and the train split's class frequencies (0: "
        "the same mix).",
        "",
    ]
    if test and name == "test":
        close = [m for m, r in models.items() if r["closer_to_train"]]
        if any(r["closer_to_train"] is None for r in models.values()):
            line = "Closer to their train images than unseen real images are: not computed (fewer samples than " \
                   "held-out images)."
        elif close:
            line = ("Closer to their train images than unseen real images are (FD vs test minus FD vs train, above "
                    f"the validation images' {f['real_train_test_gap']:+.4f}): " + ", ".join(close) + ".")
        else:
            line = "No model sits closer to its train images than unseen real images do."
        lines += [line, ""]
    lines += [
        "## Paired contrasts",
        "",
        "| contrast | FD difference [95% CI] | verdict | held-out loss difference [95% CI] | relative | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for key, v in c["contrasts"].items():
        h = v["heldout_loss"]
        lines.append(f"| {key.replace('_minus_', ' − ')} | {v['fd']:+.4f} {_ci(v['fd_ci'])} | {v['verdict']} "
                     f"| {_loss_delta(h)} | {100 * h['relative']:+.2f}% | {h['verdict']} |")
    if "guidance_curves" in c:
        lines += ["", "## Guidance (prompt-conditioned models)", "",
                  f"Sample i was prompted with class i mod C at guidance scale {s['guidance_scale']:g}. Conditional "
                  "accuracy: the share of samples the feature classifier puts in their prompt's class. "
                  + ", ".join(f"{m} {r['conditional_accuracy']:.3f}" for m, r in models.items()) + ".", "",
                  "Over guidance scales, on the first samples of the same noise and prompts:", "",
                  "| model | scale | FD | conditional accuracy |", "|---|---|---|---|"]
        for m, rows in c["guidance_curves"].items():
            lines += [f"| {m} | {r['scale']:g} | {r['fd']:.4f} (n={r['num_samples']}) | "
                      f"{r['conditional_accuracy']:.3f} |" for r in rows]
        lines += ["", "![FD against conditional accuracy](figures/guidance_curve.png)"]
    lines += ["", "## Held-out loss by timestep range", "",
              "| range | " + " | ".join(c["models"]) + " | merged − shared [95% CI] | range model i − pretrained "
              "[95% CI] | range model i − shared [95% CI] |",
              "|---|" + "---|" * (len(c["models"]) + 3)]
    for i, r in enumerate(c["range_models"]):
        ms = c["contrasts"]["merged_minus_shared"]["heldout_loss_by_range"][i]
        own = " | ".join(f"{_loss_delta(r[k])} ({r[k]['verdict']})" for k in ("vs_pretrained", "vs_shared"))
        lines.append(f"| [{r['range'][0]}, {r['range'][1]}) | "
                     + " | ".join(f"{models[m]['heldout_loss_by_range'][i]:.5f}" for m in c["models"])
                     + f" | {_loss_delta(ms)} | {own} |")
    w = c["merge"]
    lines += ["", "![held-out loss by timestep](figures/heldout_loss.png)", "", "## Partition", "",
              f"Method `{s['partition_method']}`: ranges "
              + ", ".join(f"[{lo}, {hi})" for lo, hi in s["ranges"]) + "."]
    if (PARTITION_ANALYSIS_DIR / "affinity.png").exists():
        lines += ["", f"![gradient affinity](../{PARTITION_ANALYSIS_DIR}/affinity.png)"]
    lines += ["", "## Merge", "",
              f"Weights {[round(x, 4) for x in w['weights']]} (search: {w['search']['strategy']})."]
    if w["search"].get("evaluations"):
        lines.append(f"The search scored {w['search']['evaluations']} candidates by FD on "
                     f"{w['search']['num_samples']} validation samples from their own noise seed; best validation "
                     f"FD {w['search']['best_score']:.4f}. Candidates: `merge/search/search.tsv`.")
    lines += ["", "## Task vectors", ""] + [f"![{title}](../{TASK_VECTOR_DIR}/{png})" for png, title in TV_FIGURES]
    lines += ["", "## Samples (same initial noise)", "", "| " + " | ".join(c["models"]) + " |",
              "|" + "---|" * len(c["models"]),
              "| " + " | ".join(f"![{n}](../{SAMPLES_DIR}/{n}.png)" for n in c["models"]) + " |", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main("report", report))
