"""Sweep one parameter of the default run as DVC experiments, scored on validation noise.

    python -m tools.sweep finetune.lr 5e-5 1e-4 2e-4 5e-4 -S evaluate.seed=1
    python -m tools.sweep finetune.lr 1e-4 5e-5 2e-4 5e-4 --config configs/fashion.yaml --label fashion \
        -S evaluate.seed=1 -S evaluate.reference=validation -S finetune.shared_lr=null ...

Each value is an experiment ``sweep-[<label>-]<key>-<value>``, resumable.
A sweep makes a choice, so it is refused on the headline's test noise or test
images: ``-S evaluate.seed=<k>``, k other than the headline's, scores on
validation noise, and ``-S evaluate.reference=validation`` against the
held-out split (needed where the data has a test split: ``data.source:
idx``). Writes
``reports/sweep-[<label>-]<key>.{json,md}``: per value every model's FD, KID and
held-out loss and the paired contrasts, and the value each method's FD prefers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from dtm_core.errors import ConfigError
from tools import command, exps

METHODS = ("shared", "merged", "ensemble")


def check_validation(config: dict, variants: dict[str, dict]) -> None:
    """A :class:`ConfigError` if a variant would be scored on the headline's test noise or its test images."""
    headline = exps.params_with(config)
    for name, overrides in variants.items():
        swept = exps.params_with(overrides, name)
        if swept.evaluate.seed == headline.evaluate.seed:
            raise ConfigError(f"{name}: evaluate.seed {swept.evaluate.seed} is the headline's test noise; a sweep "
                              f"chooses on validation noise, e.g. -S evaluate.seed={headline.evaluate.seed + 1}")
        if swept.data.source == "idx" and swept.evaluate.reference != "validation":
            raise ConfigError(f"{name}: data.source idx has a test split; a sweep scores against the held-out "
                              "split, -S evaluate.reference=validation")


def row(value: Any, comparison: dict) -> dict:
    out = {"value": value, "models": {m: {k: v[k] for k in ("fd", "kid", "heldout_loss", "memorised_fraction")}
                                      for m, v in comparison["models"].items()}}
    out["contrasts"] = {k: {"fd": c["fd"], "fd_ci": c["fd_ci"], "heldout_loss": c["heldout_loss"]["delta"]}
                        for k, c in comparison["contrasts"].items()}
    return out


def render(key: str, rows: list[dict], fixed: dict, best: dict) -> str:
    lines = [f"# Sweep of {key}", "", f"Fixed: {fixed or 'defaults'}.", "",
             f"| {key} | " + " | ".join(f"{m} FD" for m in ("pretrained", *METHODS))
             + " | shared held-out loss | merged held-out loss | merged − shared FD [95% CI] |",
             "|---|" + "---|" * 7]
    for r in rows:
        m, c = r["models"], r["contrasts"]["merged_minus_shared"]
        lines.append(f"| {r['value']} | " + " | ".join(f"{m[k]['fd']:.4f}" for k in ("pretrained", *METHODS))
                     + f" | {m['shared']['heldout_loss']:.6f} | {m['merged']['heldout_loss']:.6f} | "
                     f"{exps.with_ci(c['fd'], c['fd_ci'])} |")
    lines += ["", "Best value by FD: " + ", ".join(f"{m}: {v}" for m, v in best.items()) + "."]
    return "\n".join(lines) + "\n"


@command("sweep", log=True)
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("key", help="the params.yaml key to sweep, e.g. finetune.lr")
    ap.add_argument("values", nargs="+")
    exps.add_variant_arguments(ap, "a prefix of the experiment and report names")
    ap.add_argument("--out", type=Path, default=Path("reports"))
    args = ap.parse_args(argv)
    stem = "sweep-" + (f"{args.label}-" if args.label else "") + args.key.replace(".", "-")
    fixed = exps.overrides(args)
    values = [exps.parse_sets([f"v={v}"])["v"] for v in args.values]
    variants = {f"{stem}-{v}": {**fixed, args.key: v} for v in values}
    check_validation(exps.config_overrides(args.config), variants)
    if not args.collect_only:
        exps.run_all(variants)
    rows = [row(value, exps.report(name, "run the sweep")) for name, value in zip(variants, values)]
    best = {m: min(rows, key=lambda r: r["models"][m]["fd"])["value"] for m in METHODS}
    result = {"key": args.key, "fixed": fixed, "rows": rows, "best_by_fd": best,
              "runs": exps.mlflow_parent_runs(variants)}
    exps.write_report(args.out / f"{stem}.json", result, render(args.key, rows, fixed, best))
    return 0

if __name__ == "__main__":
    sys.exit(main())
