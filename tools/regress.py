"""Regression gate: compare a run's comparison report with the one git tracks.

    python -m tools.regress                      # workspace vs HEAD; exit 1 on a regression
    python -m tools.regress --rev main~3         # against another commit
    python -m tools.regress --reference old.json # against a file

The reference is the committed ``reports/comparison.json`` (DVC writes it
uncached, and the default run's is committed with ``dvc.lock``): accepting new
numbers on purpose means committing the run that produced them, as for any
other DVC metric. The gate watches, for every model in the report, FD, KID
and held-out loss, and the merged - shared contrasts; lower is better for
all. ``regression/tolerances.json`` says how much worse each may get, per
full name (``contrasts.merged_minus_shared.fd``) or per metric (``fd``), as
``{"abs": a, "rel": r}``: allowed = max(a, r * |reference|).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dtm_core.errors import MissingInputError
from dtm_core.io import read_json, write_json
from tools import command

MODEL_METRICS = ("fd", "kid", "heldout_loss")


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
        return "REGRESSED" if self.delta > self.allowed else "improved" if self.delta < -self.allowed else "ok"


def gated_metrics(comparison: dict) -> dict[str, float]:
    """The flat metrics the gate watches, from a reports/comparison.json."""
    try:
        out = {f"models.{m}.{k}": float(v[k]) for m, v in comparison["models"].items() for k in MODEL_METRICS}
        c = comparison["contrasts"]["merged_minus_shared"]
    except (KeyError, TypeError) as exc:
        raise MissingInputError(f"the comparison report lacks {exc}; re-run dvc repro") from None
    out["contrasts.merged_minus_shared.fd"] = float(c["fd"])
    out["contrasts.merged_minus_shared.heldout_loss"] = float(c["heldout_loss"]["delta"])
    return out


def tolerance_key(name: str, tolerances: dict, source: str = "tolerances") -> str:
    """The key of ``tolerances`` that governs metric ``name``: its full name first, then the metric alone."""
    for key in (name, name.rsplit(".", 1)[-1]):
        if key in tolerances:
            return key
    raise MissingInputError(f"{source}: no tolerance for '{name}' (add '{name.rsplit('.', 1)[-1]}')")


def compare(current: dict[str, float], reference: dict[str, float], tolerances: dict,
            source: str = "tolerances") -> list[Row]:
    rows = []
    for name, ref in sorted(reference.items()):
        if name not in current:
            raise MissingInputError(f"the current run lacks metric '{name}' that the reference gates")
        tol = tolerances[tolerance_key(name, tolerances, source)]
        allowed = max(float(tol.get("abs", 0.0)), float(tol.get("rel", 0.0)) * abs(ref))
        rows.append(Row(name, ref, current[name], allowed))
    return rows


def render(rows: list[Row]) -> str:
    width = max([len(r.metric) for r in rows] + [6])
    header = f"{'metric':<{width}} {'reference':>12} {'current':>12} {'delta':>11} {'allowed':>10}  status"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.metric:<{width}} {r.reference:>12.5f} {r.current:>12.5f} {r.delta:>+11.5f} "
                     f"{r.allowed:>10.5f}  {r.status}")
    bad = [r.metric for r in rows if r.status == "REGRESSED"]
    lines += ["", f"REGRESSION in {len(bad)} metric(s): {', '.join(bad)}" if bad else "no regression"]
    return "\n".join(lines)


def committed(path: Path, rev: str) -> dict:
    """The JSON file ``path`` as committed at git revision ``rev``."""
    proc = subprocess.run(["git", "show", f"{rev}:{path.as_posix()}"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise MissingInputError(
            f"no '{path}' at git revision '{rev}' ({proc.stderr.strip()[:200]}); commit a default run "
            "(dvc.lock and its metrics) or pass --reference FILE"
        )
    return json.loads(proc.stdout)


@command("regress")
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.regress", description=__doc__.split("\n\n")[0])
    ap.add_argument("--current", type=Path, default=Path("reports/comparison.json"))
    ap.add_argument("--rev", default="HEAD", help="git revision whose committed report is the reference")
    ap.add_argument("--reference", type=Path, help="a reference report file instead of --rev")
    ap.add_argument("--tolerances", type=Path, default=Path("regression/tolerances.json"))
    ap.add_argument("--result", type=Path, help="also write the deltas as flat JSON here")
    args = ap.parse_args(argv)
    current = gated_metrics(read_json(args.current, "comparison report"))
    ref_doc = read_json(args.reference, "reference report") if args.reference else committed(args.current, args.rev)
    reference = gated_metrics(ref_doc)
    rows = compare(current, reference, read_json(args.tolerances, "regression tolerances"), str(args.tolerances))
    where = args.reference or f"{args.current} at {args.rev}"
    print(f"reference: {where}\n")
    print(render(rows))
    if args.result:
        write_json(args.result, {**{f"{r.metric}.delta": r.delta for r in rows},
                                 "regressions": sum(r.status == "REGRESSED" for r in rows)})
    return 1 if any(r.status == "REGRESSED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
