"""The default comparison over training seeds: ``make seeds``.

    python -m tools.seeds                     # seeds 0 1 2: run what is missing, collect
    python -m tools.seeds --seeds 0 1 2 3 -S finetune.lr=1e-4
    python -m tools.seeds --collect-only

Each seed is a DVC experiment (``seeds-<s>``, or ``seeds-<s>-<label>`` with
overrides) that changes only the root ``seed``: the fine-tunes and the
merge re-train, while the data split, the base model, the feature
classifier and the test noise stay fixed (their seeds are their own), so the
spread over seeds is training luck alone. Writes ``reports/seeds.{json,md}``:
per model the mean ± std over seeds of FD, KID and held-out loss, and per
seed the paired contrasts with their intervals.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

from stages.report import sampler_label
from tools import command, exps

CONTRASTS = ("merged_minus_shared", "ensemble_minus_shared", "merged_minus_pretrained")
MODEL_METRICS = ("fd", "kid", "heldout_loss", "memorised_fraction")


def mean_std(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "n": len(arr)}


def seed_row(seed: int, comparison: dict, mlflow_runs: list[str]) -> dict:
    """One seed's entry of ``per_seed``: every model's numbers and the paired contrasts."""
    row: dict[str, Any] = {"seed": seed}
    for model, m in comparison["models"].items():
        row[model] = {k: m[k] for k in MODEL_METRICS}
    for key in CONTRASTS:
        c = comparison["contrasts"][key]
        row[key] = {"fd": c["fd"], "fd_ci": c["fd_ci"], "heldout_loss": c["heldout_loss"]["delta"],
                    "heldout_loss_ci": c["heldout_loss"]["ci"]}
    row["range_models_vs_pretrained"] = [r["vs_pretrained"]["delta"] for r in comparison["range_models"]]
    row["mlflow_runs"] = mlflow_runs
    return row


def common_settings(settings: dict, params: Optional[dict]) -> dict:
    """What every seed's run shares: the report's settings less its seed, plus the fine-tunes' learning
    rates (the report does not record them, and after a change of default the overrides no longer do)."""
    out = {k: v for k, v in settings.items() if k != "seed"}
    if params is not None:
        from dtm_core.config import parse_params

        finetune = parse_params(params, "params.yaml").finetune
        out["finetune_lr"] = finetune.lr
        out["shared_lr"] = finetune.shared.lr
    return out


def summarise(rows: list[dict], settings: dict) -> dict:
    models = [k for k in rows[0] if isinstance(rows[0][k], dict) and "fd" in rows[0][k] and k not in CONTRASTS]
    summary = {m: {k: mean_std([r[m][k] for r in rows]) for k in MODEL_METRICS} for m in models}
    contrasts = {key: {"fd": mean_std([r[key]["fd"] for r in rows]),
                       "heldout_loss": mean_std([r[key]["heldout_loss"] for r in rows]),
                       "seeds_below_zero": sum(r[key]["fd_ci"][1] < 0 for r in rows),
                       "seeds_above_zero": sum(r[key]["fd_ci"][0] > 0 for r in rows)}
                 for key in CONTRASTS}
    shared, pre, merged = (summary[m]["fd"]["mean"] for m in ("shared", "pretrained", "merged"))
    ratios = {"merged_over_shared_fd": merged / shared, "merged_over_pretrained_fd": merged / pre,
              "shared_over_pretrained_fd": shared / pre}
    return {"seeds": [r["seed"] for r in rows], "settings": settings, "summary": summary,
            "contrasts": contrasts, "ratios": ratios, "per_seed": rows}


def render(result: dict) -> str:
    s = result["settings"]
    lines = ["# The default comparison over training seeds", "",
             f"Seeds {result['seeds']}; {s.get('num_ranges')} ranges x {s.get('finetune_steps_per_range')} steps vs "
             f"a shared fine-tune of {s.get('shared_steps')} steps; {s.get('num_samples')} samples x "
             f"{s.get('noise_seeds')} noise seed(s), {sampler_label(s)}; learning rates: range fine-tunes "
             f"{s.get('finetune_lr')}, shared {s.get('shared_lr')}. Mean ± std over seeds.", "",
             "| model | FD | KID | held-out loss | memorised |", "|---|---|---|---|---|"]
    for model, m in result["summary"].items():
        lines.append(f"| {model} | {m['fd']['mean']:.4f} ± {m['fd']['std']:.4f} | {m['kid']['mean']:.5f} ± "
                     f"{m['kid']['std']:.5f} | {m['heldout_loss']['mean']:.6f} ± {m['heldout_loss']['std']:.6f} | "
                     f"{m['memorised_fraction']['mean']:.4f} |")
    r = result["ratios"]
    lines += ["", f"merged / shared FD = {r['merged_over_shared_fd']:.3f}; merged / pretrained FD = "
              f"{r['merged_over_pretrained_fd']:.3f}; shared / pretrained FD = {r['shared_over_pretrained_fd']:.3f} "
              "(means over seeds; the paper's target is merged ≤ 0.80 × both).", "",
              "## Paired contrasts per seed (95% bootstrap intervals)", "",
              "| seed | " + " | ".join(k.replace("_minus_", " − ") + " FD" for k in CONTRASTS)
              + " | merged − shared held-out loss |", "|---|" + "---|" * (len(CONTRASTS) + 1)]
    for row in result["per_seed"]:
        h = row["merged_minus_shared"]
        cells = [*(exps.with_ci(row[k]["fd"], row[k]["fd_ci"]) for k in CONTRASTS),
                 exps.with_ci(h["heldout_loss"], h["heldout_loss_ci"], 6)]
        lines.append(f"| {row['seed']} | " + " | ".join(cells) + " |")
    lines += ["", "| contrast | FD mean ± std | seeds with CI below 0 | seeds with CI above 0 |",
              "|---|---|---|---|"]
    for key, c in result["contrasts"].items():
        lines.append(f"| {key.replace('_minus_', ' − ')} | {c['fd']['mean']:+.4f} ± {c['fd']['std']:.4f} | "
                     f"{c['seeds_below_zero']} | {c['seeds_above_zero']} |")
    return "\n".join(lines) + "\n"


def variant_name(seed: int, label: str) -> str:
    return f"seeds-{seed}" + (f"-{label}" if label else "")


@command("seeds", log=True)
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.seeds", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    exps.add_variant_arguments(ap, "suffix of the experiment names (for -S variants)")
    ap.add_argument("--rerun", action="store_true", help="re-run seeds whose results exist")
    ap.add_argument("--out", type=Path, default=Path("reports"))
    args = ap.parse_args(argv)
    overrides = exps.overrides(args)
    variants = {variant_name(s, args.label): {**overrides, "seed": s} for s in args.seeds}
    if not args.collect_only:
        exps.run_all(variants, rerun=args.rerun)
    runs = exps.mlflow_parent_runs(variants)
    rows, settings = [], {}
    for name, overrides_s in variants.items():
        comparison = exps.report(name, "run it first")
        settings = common_settings(comparison["settings"], exps.experiment_params(name))
        rows.append(seed_row(overrides_s["seed"], comparison, runs.get(name, [])))
    result = summarise(rows, {**settings, "overrides": overrides})
    exps.write_report(args.out / f"seeds{f'-{args.label}' if args.label else ''}.json", result, render(result))
    return 0

if __name__ == "__main__":
    sys.exit(main())
