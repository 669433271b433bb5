"""Regression gate: compare a run's comparison report with a committed reference.

    python -m dtm_core.regress                 # compare; exit 1 on a regression
    python -m dtm_core.regress --bless         # make the current run the new reference

The reference (``regression/reference.json``) holds the gated metrics, flat
(``pretrained.fd``, ``merged.kid``, ``merged_minus_shared.fd`` ...); the
tolerances beside it (``regression/tolerances.json``) say how much worse a
metric may get, per metric name (``fd``, ``kid``, ``merged_minus_shared.fd``)
as ``{"abs": a, "rel": r}``: allowed = max(a, r * |reference|). Lower is
better for every gated metric. The result is also written flat to
``metrics/regress.json`` so ``dvc metrics show/diff`` can read it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .io import read_json, write_json

MODELS = ("pretrained", "shared", "merged", "ensemble")
REFERENCE = Path("regression/reference.json")
TOLERANCES = Path("regression/tolerances.json")
CURRENT = Path("reports/comparison.json")
RESULT = Path("metrics/regress.json")


@dataclass
class Row:
    metric: str
    reference: float
    current: float
    allowed: float

    @property
    def delta(self) -> float:
        return self.current - self.reference

    @property
    def status(self) -> str:
        if self.delta > self.allowed:
            return "REGRESSED"
        if self.delta < -self.allowed:
            return "improved"
        return "ok"


def gated_metrics(comparison: dict) -> dict[str, float]:
    """The flat metrics the gate watches, from a reports/comparison.json."""
    out = {}
    for model in MODELS:
        if model not in comparison:
            raise KeyError(f"the report has no '{model}' entry; re-run dvc repro")
        for metric in ("fd", "kid"):
            out[f"{model}.{metric}"] = float(comparison[model][metric])
    out["merged_minus_shared.fd"] = out["merged.fd"] - out["shared.fd"]
    out["merged_minus_shared.kid"] = out["merged.kid"] - out["shared.kid"]
    return out


def _tolerance(name: str, tolerances: dict) -> dict:
    # the full name first ("merged_minus_shared.fd"), then the metric alone ("fd")
    for key in (name, name.split(".", 1)[-1]):
        if key in tolerances:
            return tolerances[key]
    raise KeyError(f"{TOLERANCES}: no tolerance for '{name}' (add '{name.split('.', 1)[-1]}')")


def compare(current: dict[str, float], reference: dict[str, float], tolerances: dict) -> list[Row]:
    rows = []
    for name, ref in sorted(reference.items()):
        if name not in current:
            raise KeyError(f"the current run lacks metric '{name}' that the reference gates")
        tol = _tolerance(name, tolerances)
        allowed = max(float(tol.get("abs", 0.0)), float(tol.get("rel", 0.0)) * abs(ref))
        rows.append(Row(name, ref, current[name], allowed))
    return rows


def render(rows: list[Row]) -> str:
    header = f"{'metric':<26} {'reference':>12} {'current':>12} {'delta':>11} {'allowed':>10}  status"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.metric:<26} {r.reference:>12.5f} {r.current:>12.5f} {r.delta:>+11.5f} {r.allowed:>10.5f}  {r.status}"
        )
    bad = [r.metric for r in rows if r.status == "REGRESSED"]
    lines.append("")
    lines.append(f"REGRESSION in {len(bad)} metric(s): {', '.join(bad)}" if bad else "no regression")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dtm_core.regress", description=__doc__.split("\n\n")[0])
    ap.add_argument("--current", type=Path, default=CURRENT)
    ap.add_argument("--reference", type=Path, default=REFERENCE)
    ap.add_argument("--tolerances", type=Path, default=TOLERANCES)
    ap.add_argument("--result", type=Path, default=RESULT)
    ap.add_argument("--bless", action="store_true", help="write the current metrics as the new reference")
    args = ap.parse_args(argv)
    try:
        current = gated_metrics(read_json(args.current, "comparison report"))
        if args.bless:
            write_json(args.reference, current)
            print(f"blessed {args.current} as the new reference in {args.reference}; commit it on purpose")
            return 0
        reference = read_json(args.reference, "regression reference")
        rows = compare(current, reference, read_json(args.tolerances, "regression tolerances"))
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"error: regress: {exc}", file=sys.stderr)
        return 2
    print(render(rows))
    write_json(args.result, {
        **{f"{r.metric}.delta": r.delta for r in rows},
        "regressions": sum(r.status == "REGRESSED" for r in rows),
    })
    return 1 if any(r.status == "REGRESSED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
