"""The paper's study at small scale: Table 3's ablations and Table 1's loss-reweighting baselines: ``make study``.

    python -m tools.study                  # run every missing row, write reports/study.{md,json,png}
    python -m tools.study --collect-only   # only read the finished experiments
    python -m tools.study --beyond         # also the automatic partitions and distilled weights (3 seeds each)

Every row is one or more DVC experiments (``study-<row>-s<seed>``) on top of
params.yaml, run and resumed as tools.exps runs them. Total fine-tune compute
is equal across rows: N x finetune.steps = the default's.

Each row reports one model of its experiments (the shared fine-tune, the
merged model or the ensemble): FD, KID and held-out loss as mean ± std over
its seeds, and the FD difference to the default shared baseline of the same
seed, paired on the same test noise: per seed with its bootstrap interval,
and across seeds with a t-interval when a row has several.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from dtm_core import distances
from dtm_core.errors import ConfigError
from dtm_core.io import write_json
from tools import command, exps

SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Row:
    name: str
    model: str  # which evaluated model the row is about: shared, merged or ensemble
    overrides: dict = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    paper: Optional[str] = None  # the paper's number for this row, where it has one
    group: str = ""
    paper_fid: Optional[float] = None  # the same as a number (CIFAR-10 FID), for the relative change
    versus: Optional[str] = None  # another row (same model, same seeds) to contrast with, paired, besides shared
    beyond: bool = False  # beyond the paper (issue #10: automatic partitions, learned weights): only with --beyond


PAPER_SHARED_FID = 4.40  # the paper's N = 1 shared fine-tune on CIFAR-10 (Table 3): its rows' reference


def rows(total_steps: int) -> list[Row]:
    """The study's rows; ``total_steps`` = N x finetune.steps of the default, kept for every N."""
    def deme(n: int, **extra) -> dict:
        return {"partition.ranges": list(range(n)), "finetune.steps": total_steps // n, **extra}

    p_only = {"finetune.consistency_weight": 0.0, "finetune.channel_projection": False}
    p_cons = {"finetune.channel_projection": False}
    table1 = "Table 1: the shared fine-tune and loss reweighting"
    ladder = "Table 3: the ablation ladder"
    partition = "Beyond the paper: the partition chosen automatically (N = 4)"
    return [
        Row("shared", "shared", {}, SEEDS, "4.40 (CIFAR-10, N = 1)", table1, 4.40),
        *[Row(f"shared-{w}", "shared", {"finetune.weighting": w}, (0,), str(fid), table1, fid)
          for w, fid in (("snr_plus_one", 5.41), ("trunc_snr", 4.49), ("min_snr", 5.77), ("p2", 5.63))],
        Row("shared-projection", "merged", deme(1, **{"finetune.consistency_weight": 0.0, "finetune.p": 0.0}),
            (0,), "4.45 (N = 1 with projection)", ladder, 4.45),
        Row("deme-n8-p", "merged", deme(8, **p_only), (0,), "4.32", ladder, 4.32),
        Row("deme-n8-p-consistency", "merged", deme(8, **p_cons), (0,), "4.27", ladder, 4.27),
        Row("deme-n8", "merged", deme(8), (0,), "3.87", ladder, 3.87),
        Row("deme-n4-p", "merged", deme(4, **p_only), (0,), None, ladder),
        Row("deme-n4-p-consistency", "merged", deme(4, **p_cons), (0,), None, ladder),
        Row("deme-n4", "merged", {}, SEEDS, "3.51 (CIFAR-10 merged)", ladder, 3.51),
        Row("deme-n2", "merged", deme(2), (0,), None, "Number of ranges N"),
        Row("deme-n4-weights-authors", "merged", {"merge.weights": [0.1, 0.1, 0.2, 0.5]}, (0,),
            "the authors' hard-coded weights", "Merge weights (N = 4)"),
        Row("deme-n4-weights-searched", "merged",
            {"merge.search.strategy": "coordinate", "merge.search.num_samples": 2000,
             "merge.search.cheap_samples": 500, "merge.search.rescore_top": 5}, (0,),
            "a grid search over FID", "Merge weights (N = 4)"),
        Row("ensemble-n4", "ensemble", {}, SEEDS, "3.79 (CIFAR-10)", "The ensemble before merge", 3.79),
        Row("ensemble-n8", "ensemble", deme(8), (0,), None, "The ensemble before merge"),
        *[Row(f"deme-n4-{method}", "merged", {"partition.method": method}, SEEDS, None, partition, versus="deme-n4",
              beyond=True)
          for method in ("snr", "affinity")],
        Row("deme-n4-weights-distill", "merged", {"merge.search.strategy": "distill"}, SEEDS, None,
            "Beyond the paper: merge weights learned by distillation (N = 4)", versus="deme-n4", beyond=True),
    ]


def select(candidates: list[Row], beyond: bool = False, only: Optional[list[str]] = None,
           seeds: Optional[list[int]] = None) -> list[Row]:
    """The rows a run asks for (``--beyond``, ``--only``), with the rows they are paired against, each cut to
    ``seeds`` (``--seeds``; rows with none of them are left out)."""
    chosen = [r for r in candidates if (beyond or not r.beyond) and (not only or r.name in only)]
    chosen += [r for r in candidates if r.name in {o.versus for o in chosen} - {o.name for o in chosen}]
    if seeds is not None:
        chosen = [dataclasses.replace(r, seeds=tuple(s for s in r.seeds if s in seeds)) for r in chosen]
        chosen = [r for r in chosen if r.seeds]
    return chosen


def experiment_name(row: Row, seed: int, all_rows: list[Row]) -> str:
    """Rows with the same overrides share their experiments (shared, deme-n4 and ensemble-n4 are one run)."""
    if not row.overrides:
        return f"study-default-s{seed}"
    first = next(r for r in all_rows if r.overrides == row.overrides)
    return f"study-{first.name}-s{seed}"


def variants(all_rows: list[Row]) -> dict[str, dict]:
    """Every experiment once, seed 0 of every row first: an interrupted study has one seed of each row."""
    out = {}
    for seed in sorted({s for row in all_rows for s in row.seeds}):
        for row in all_rows:
            if seed in row.seeds:
                out.setdefault(experiment_name(row, seed, all_rows), {**row.overrides, "seed": seed})
    return out


def finished_seeds(all_rows: list[Row]) -> tuple[list[Row], list[str]]:
    """Each row cut to the seeds whose experiment finished (rows with none dropped), and the unfinished names."""
    kept, missing = [], set()
    for row in all_rows:
        names = {seed: experiment_name(row, seed, all_rows) for seed in row.seeds}
        done = tuple(seed for seed, name in names.items() if exps.experiment_file(name) is not None)
        missing |= {name for seed, name in names.items() if seed not in done}
        if done:
            kept.append(dataclasses.replace(row, seeds=done))
    return kept, sorted(missing)


def _features(name: str, model: str) -> np.ndarray:
    with np.load(io.BytesIO(exps.experiment_bytes(name, f"samples/{model}.npz"))) as npz:
        return npz["features"]


def _across_seeds(deltas: list[float], single_ci: list[float]) -> list[float]:
    """A t-interval over seeds for several seeds; one seed's paired bootstrap interval otherwise."""
    k = len(deltas)
    if k == 1:
        return list(single_ci)
    from scipy import stats

    mean = float(np.mean(deltas))
    half = float(stats.t.ppf(0.975, k - 1) * np.std(deltas, ddof=1) / math.sqrt(k))
    return [mean - half, mean + half]


_MODELS: dict[tuple[str, str], dict] = {}


def _model(name: str, model: str, reference: np.ndarray) -> dict:
    """Experiment ``name``'s ``model`` as dtm_core.distances.fd_contrast takes it, one dict per (experiment, model)
    while its features and the reference stay the same, so its bootstrap FDs are drawn once for every
    contrast it enters (the shared baseline of a seed enters one per row)."""
    features = _features(name, model)
    entry = _MODELS.get((name, model))
    if (entry is None or not np.array_equal(entry["features"], features)
            or not np.array_equal(entry["reference"], reference)):
        entry = _MODELS[name, model] = {"features": features, "reference": reference}
    return entry


def _paired_fd(a: tuple[str, str], b: tuple[str, str], reference: np.ndarray, rounds: int,
               seed: int) -> tuple[float, list[float], float]:
    """FD(a) − FD(b) for (experiment, model) pairs sampled from the same test noise, its paired bootstrap
    interval (the report's own contrast, dtm_core.distances.fd_contrast), and FD(b)."""
    mb = _model(*b, reference)
    contrast = distances.fd_contrast(_model(*a, reference), mb, reference, rounds, seed)
    return contrast["fd"], contrast["fd_ci"], distances.frechet_distance(mb["features"], reference)


def _percent(value: float, reference: float) -> float:
    return 100.0 * (value - reference) / reference


def _versus(row: Row, all_rows: list[Row], reference: np.ndarray, rounds: int) -> dict:
    """FD of ``row`` minus FD of ``row.versus`` (same model), paired per seed on the same test noise."""
    other = next(r for r in all_rows if r.name == row.versus)
    per_seed = []
    for seed in row.seeds:
        a, b = (experiment_name(row, seed, all_rows), row.model), (experiment_name(other, seed, all_rows), other.model)
        delta, ci, _ = _paired_fd(a, b, reference, rounds, seed)
        loss_a, loss_b = (exps.report(name, "run the study")["models"][model]["heldout_loss"] for name, model in (a, b))
        per_seed.append({"seed": seed, "delta_fd": delta, "delta_fd_ci": ci,
                         "delta_heldout_loss_pct": _percent(loss_a, loss_b)})
    deltas = [s["delta_fd"] for s in per_seed]
    return {"row": other.name, "model": other.model, "delta_fd": float(np.mean(deltas)),
            "delta_fd_ci": _across_seeds(deltas, per_seed[0]["delta_fd_ci"]),
            "delta_heldout_loss_pct": float(np.mean([s["delta_heldout_loss_pct"] for s in per_seed])),
            "per_seed": per_seed}


def row_result(row: Row, all_rows: list[Row], reference: np.ndarray, rounds: int, runs: dict[str, list[str]],
               minutes: Optional[dict[str, Optional[float]]] = None) -> dict:
    relative, loss_relative, per_seed = [], [], []
    for seed in row.seeds:
        name, baseline_name = experiment_name(row, seed, all_rows), f"study-default-s{seed}"
        m = exps.report(name, "run the study")["models"][row.model]
        baseline = exps.report(baseline_name, "the shared baseline: run the study")["models"]["shared"]
        loss_relative.append(_percent(m["heldout_loss"], baseline["heldout_loss"]))
        delta, ci, shared_fd = _paired_fd((name, row.model), (baseline_name, "shared"), reference, rounds, seed)
        relative.append(100.0 * delta / shared_fd)
        per_seed.append({"seed": seed, "experiment": name, "commit": exps.experiment_commit(name),
                         "fd": m["fd"], "kid": m["kid"],
                         "heldout_loss": m["heldout_loss"], "delta_fd_vs_shared": delta, "delta_fd_ci": ci,
                         "mlflow_runs": runs.get(name, []), "minutes": (minutes or {}).get(name)})
    column = lambda key: [s[key] for s in per_seed]  # noqa: E731
    k, fd_values, deltas = len(row.seeds), column("fd"), column("delta_fd_vs_shared")
    return {
        "name": row.name, "group": row.group, "model": row.model, "overrides": row.overrides,
        "seeds": list(row.seeds), "fd_mean": float(np.mean(fd_values)),
        "fd_std": float(np.std(fd_values, ddof=1)) if k > 1 else 0.0, "kid_mean": float(np.mean(column("kid"))),
        "heldout_loss_mean": float(np.mean(column("heldout_loss"))), "delta_fd_vs_shared": float(np.mean(deltas)),
        "delta_fd_ci": _across_seeds(deltas, per_seed[0]["delta_fd_ci"]),
        "delta_fd_ci_kind": "t-interval over seeds" if k > 1 else "paired bootstrap over samples",
        "delta_fd_pct_vs_shared": float(np.mean(relative)),
        "delta_heldout_loss_pct_vs_shared": float(np.mean(loss_relative)),
        "paper": row.paper,
        "paper_delta_pct_vs_shared": (None if row.paper_fid is None
                                      else 100.0 * (row.paper_fid / PAPER_SHARED_FID - 1.0)),
        "per_seed": per_seed,
        "mlflow_runs": [r for s in per_seed for r in s["mlflow_runs"][:1]],
        **({"versus": _versus(row, all_rows, reference, rounds)} if row.versus else {}),
    }


def results_rows(result: dict) -> list[dict]:
    """The committed form (docs/results/study.json): one entry per row, naming the commits its seeds ran on."""
    return [{**row, "settings": result["settings"], "commits": sorted({s["commit"] for s in row["per_seed"]})}
            for row in result["rows"]]


def render(result: dict) -> str:
    lines = ["# The DeMe study at small scale", "",
             f"Default: {result['settings']}. Every row has the same total fine-tune compute "
             f"(N x steps = {result['total_steps']}). FD/KID in the feature classifier's space; Δ = FD − FD(shared "
             "baseline, same seed), paired on the same test noise. Intervals: 95%; one seed: paired bootstrap "
             "over samples; several seeds: t-interval over seeds. Δ %: Δ over the same seed's shared FD, mean over "
             "seeds; Δ held-out loss %: the same for the held-out eps-MSE; paper Δ %: the paper's CIFAR-10 FID "
             f"against its shared fine-tune ({PAPER_SHARED_FID}).", ""]
    group = None
    for r in result["rows"]:
        if r["group"] != group:
            group = r["group"]
            lines += ["", f"## {group}", "", "| row | model | seeds | FD mean ± std | KID | held-out loss | "
                      "Δ FD vs shared [95% CI] | Δ % | Δ held-out loss % | paper FID | paper Δ % |", "|---" * 11 + "|"]
        paper_pct = r.get("paper_delta_pct_vs_shared")
        lines.append(
            f"| {r['name']} | {r['model']} | {len(r['seeds'])} | {r['fd_mean']:.4f} ± {r['fd_std']:.4f} | "
            f"{r['kid_mean']:.5f} | {r['heldout_loss_mean']:.6f} | "
            f"{exps.with_ci(r['delta_fd_vs_shared'], r['delta_fd_ci'])} | {r['delta_fd_pct_vs_shared']:+.1f}% | "
            f"{r['delta_heldout_loss_pct_vs_shared']:+.2f}% | "
            f"{r['paper'] or '–'} | {'–' if paper_pct is None else f'{paper_pct:+.1f}%'} |")
    contrasts = [r for r in result["rows"] if r.get("versus")]
    if contrasts:
        lines += ["", "## Paired against another row", "",
                  "| row | against | Δ FD [95% CI] | per seed | Δ held-out loss % |", "|---" * 5 + "|"]
        for r in contrasts:
            v = r["versus"]
            seeds = ", ".join(f"{s['delta_fd']:+.4f}" for s in v["per_seed"])
            lines.append(f"| {r['name']} ({r['model']}) | {v['row']} ({v['model']}) | "
                         f"{exps.with_ci(v['delta_fd'], v['delta_fd_ci'])} | {seeds} | "
                         f"{v['delta_heldout_loss_pct']:+.2f}% |")
    if result.get("experiment_minutes_total"):
        timed = [m for m in result["experiment_minutes"].values() if m]  # unfinished ones (--partial) have none
        lines += ["", f"Compute: {result['experiment_minutes_total']:.0f} min of pipeline runs over "
                  f"{len(timed)} experiments (each experiment's newest MLflow parent run; "
                  "stages restored from DVC's run-cache cost nothing there)."]
    lines += ["", "![study](study.png)", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    from dtm_core.plots import new_figure, save_figure

    rs = result["rows"]
    fig, ax = new_figure(8.0, 0.35 * len(rs) + 1.5)
    y = list(range(len(rs)))[::-1]
    d = [r["delta_fd_vs_shared"] for r in rs]
    lo = [r["delta_fd_vs_shared"] - r["delta_fd_ci"][0] for r in rs]
    hi = [r["delta_fd_ci"][1] - r["delta_fd_vs_shared"] for r in rs]
    ax.errorbar(d, y, xerr=[lo, hi], fmt="o", color="tab:blue", capsize=3)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(y, [f"{r['name']} ({r['model']}, {len(r['seeds'])} seed)" for r in rs], fontsize=7)
    ax.set_xlabel("FD − FD(shared baseline), paired, 95% CI (lower is better)")
    ax.set_title("the study: every row against the shared fine-tune")
    save_figure(fig, path)


@command("study", log=True)
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.study", description=__doc__.split("\n\n")[0])
    ap.add_argument("--collect-only", action="store_true")
    exps.add_baseline_argument(ap)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--only", nargs="+", help="run only these rows")
    ap.add_argument("--partial", action="store_true",
                    help="with --collect-only: report each row on the seeds that finished, leave out rows with none")
    ap.add_argument("--beyond", action="store_true",
                    help="also the rows beyond the paper: the automatic partitions (snr, affinity) and the "
                         "distilled merge weights, 3 seeds each")
    ap.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                    help="only these training seeds of each row (e.g. 1 2: a study split over machines or sessions)")
    ap.add_argument("--out", type=Path, default=Path("reports"))
    ap.add_argument("--results", type=Path, help="also write the rows as a list here (docs/results/study.json)")
    args = ap.parse_args(argv)
    params = yaml.safe_load(Path("params.yaml").read_text())
    total = len(params["partition"]["ranges"]) * params["finetune"]["steps"]
    all_rows = select(rows(total), args.beyond, args.only, args.seeds)
    if not all_rows:
        asked = " ".join([*(["--only", *args.only] if args.only else []),
                          *(["--seeds", *map(str, args.seeds)] if args.seeds else [])])
        raise ConfigError(f"no row matches {asked} (python -m tools.study --list --beyond lists them)")
    todo = variants(all_rows)
    if args.list:
        for name, overrides in todo.items():
            print(f"{name}: {overrides}")
        return 0
    if not args.collect_only:
        exps.run_all(todo)
    if args.partial:
        all_rows, missing = finished_seeds(all_rows)
        for name in missing:
            logging.warning("not finished, left out of the report: %s", name)
    from stages.common import load_reference

    reference = load_reference()["train"]
    runs = exps.mlflow_parent_runs(todo)
    minutes = exps.mlflow_parent_minutes(todo)
    results = [row_result(r, all_rows, reference, params["report"]["bootstrap_rounds"], runs, minutes)
               for r in all_rows]
    settings = {"num_ranges": len(params["partition"]["ranges"]), "steps_per_range": params["finetune"]["steps"],
                "lr": params["finetune"]["lr"], "shared_lr": params["finetune"]["shared_lr"],
                "num_samples": params["evaluate"]["num_samples"], "sampler": params["evaluate"]["sampler"],
                "sampling_steps": params["evaluate"]["sampling_steps"]}
    result = {"settings": settings, "total_steps": total, "rows": results,
              # each experiment once (rows share experiments), as its newest pipeline run in MLflow took
              "experiment_minutes": {name: minutes.get(name) for name in todo},
              "experiment_minutes_total": sum(m for m in minutes.values() if m)}
    exps.write_report(args.out / "study.json", result, render(result))
    plot(result, args.out / "study.png")
    if args.results:
        write_json(args.results, results_rows(result))
    return 0

if __name__ == "__main__":
    sys.exit(main())
