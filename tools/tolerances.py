"""Re-derive the regression gate's tolerances from runs that force other floating-point paths.

    python -m tools.tolerances --run                      # two fresh clones of HEAD, one dvc repro each, derive
    python -m tools.tolerances --run --keep-looser        # the same, no key tightening below the current file
    python -m tools.tolerances --current a.json b.json    # derive from perturbed runs already made

Another machine may take other SIMD kernels or thread counts, and the
pipeline's numbers then move a little although nothing is wrong. Each
perturbation (:data:`PERTURBATIONS`: AVX2 kernels instead of the machine's
widest; one thread) is a full ``dvc repro`` in a fresh clone of HEAD (its own
DVC cache: nothing is restored from this workspace's run-cache), compared
metric by metric with the committed report as ``tools.regress`` gates it.
Each key of ``regression/tolerances.json`` becomes ``--factor`` times the
largest shift on a metric it governs, rounded up to two significant digits,
at least ``--floor`` (and with ``--keep-looser`` at least the tolerance it
replaces: shifts between machine kinds are not in the perturbations). The
shifts go to ``--evidence`` beside the tolerances they gave.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from dtm_core.errors import DtmError, MissingInputError
from dtm_core.io import read_json, write_json
from tools import command
from tools.regress import committed, gated_metrics, tolerance_key

PERTURBATIONS: dict[str, dict[str, str]] = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "one-thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DTM_THREADS": "1"},
}
REPORT = Path("reports/comparison.json")


def round_up(x: float, digits: int = 2) -> float:
    """``x`` rounded up to ``digits`` significant digits (0 stays 0)."""
    if x <= 0:
        return 0.0
    scale = 10 ** (math.floor(math.log10(x)) - digits + 1)
    return float(f"{math.ceil(x / scale - 1e-9) * scale:.{digits}g}")  # 0.0042, not 0.004200000000000001


def shifts(reference: dict, runs: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Per run, per gated metric: |run − reference|."""
    ref = gated_metrics(reference)
    out = {}
    for name, report in runs.items():
        cur = gated_metrics(report)
        missing = sorted(set(ref) - set(cur))
        if missing:
            raise MissingInputError(f"run '{name}' lacks the gated metrics {missing}")
        out[name] = {k: abs(cur[k] - ref[k]) for k in sorted(ref)}
    return out


def derive(reference: dict, runs: dict[str, dict], old: dict, factor: float = 2.0,
           floor: float = 1e-5, keep_looser: bool = False) -> tuple[dict, dict]:
    """New tolerances (same keys as ``old``) and, per key, the largest shift and the run that showed it.

    ``keep_looser``: no key falls below its tolerance in ``old`` (the perturbations run on one
    machine kind; shifts between kinds are not in them), and the evidence says which keys kept theirs."""
    measured = shifts(reference, runs)
    largest: dict[str, tuple[float, str, str]] = {key: (0.0, "", "") for key in old}
    for run, deltas in measured.items():
        for metric, delta in deltas.items():
            key = tolerance_key(metric, old)
            if delta > largest[key][0]:
                largest[key] = (delta, run, metric)
    derived = {key: max(round_up(factor * shift), floor) for key, (shift, _, _) in largest.items()}
    new = {key: {"abs": max(value, old[key].get("abs", 0.0)) if keep_looser else value,
                 **({"rel": old[key]["rel"]} if keep_looser and "rel" in old[key] else {})}
           for key, value in derived.items()}
    evidence = {key: {"largest_shift": shift, "run": run, "metric": metric, "derived": derived[key],
                      "tolerance": new[key]["abs"], "kept_previous": new[key]["abs"] > derived[key]}
                for key, (shift, run, metric) in largest.items()}
    return new, {"per_run": measured, "per_key": evidence, "factor": factor, "floor": floor,
                 "keep_looser": keep_looser}


def perturbed_run(name: str, env: dict[str, str], workdir: Path) -> tuple[dict, float]:
    """A fresh clone of HEAD, ``dvc repro`` under ``env``; its report and wall seconds."""
    clone = workdir / name
    subprocess.run(["git", "clone", "--quiet", str(Path.cwd()), str(clone)], check=True)
    start = time.perf_counter()
    proc = subprocess.run(["dvc", "repro"], cwd=clone, env={**os.environ, **env})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise DtmError(f"dvc repro in {clone} ({name}) failed with exit {proc.returncode}")
    return read_json(clone / REPORT, f"{name} report"), seconds


def run_label(path: Path) -> str:
    """A report of ``--run``'s clones (``<workdir>/<perturbation>/reports/comparison.json``) keeps its
    perturbation's name; any other report is named by its path."""
    clone = path.resolve().parent.parent.name
    return clone if path.parent.name == "reports" and clone in PERTURBATIONS else str(path)


@command("tolerances")
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.tolerances", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="store_true", help="run the perturbations in fresh clones of HEAD")
    ap.add_argument("--current", type=Path, nargs="+", default=[], help="perturbed runs' comparison.json files")
    ap.add_argument("--rev", default="HEAD", help="git revision whose committed report is the reference")
    ap.add_argument("--workdir", type=Path, help="where the clones go (default: a temporary folder, kept)")
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--floor", type=float, default=1e-5)
    ap.add_argument("--keep-looser", action="store_true",
                    help="no key tightens below the tolerances file it replaces (shifts between machine "
                         "kinds are not in the perturbations)")
    ap.add_argument("--tolerances", type=Path, default=Path("regression/tolerances.json"))
    ap.add_argument("--evidence", type=Path, default=Path("docs/results/tolerances.json"))
    args = ap.parse_args(argv)
    if not args.run and not args.current:
        ap.error("give --run or --current FILE ...")
    reference = committed(REPORT, args.rev)
    old = read_json(args.tolerances, "regression tolerances")
    runs = {run_label(path): read_json(path, "perturbed report") for path in args.current}
    seconds = {}
    if args.run:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dtm-tolerances-"))
        for name, env in PERTURBATIONS.items():
            print(f"tolerances: {name} run in {workdir / name}", flush=True)
            runs[name], seconds[name] = perturbed_run(name, env, workdir)
    new, evidence = derive(reference, runs, old, args.factor, args.floor, args.keep_looser)
    commit = subprocess.run(["git", "rev-parse", args.rev], capture_output=True, text=True).stdout.strip()
    write_json(args.tolerances, new)
    write_json(args.evidence, {**evidence, "reference_commit": commit, "seconds": seconds,
                               "perturbations": {k: v for k, v in PERTURBATIONS.items() if k in runs}})
    print(f"{'key':<45} {'largest shift':>14} {'derived':>10} {'tolerance':>10}  run")
    for key, e in evidence["per_key"].items():
        kept = "  (kept the previous)" if e["kept_previous"] else ""
        print(f"{key:<45} {e['largest_shift']:>14.6f} {e['derived']:>10.6f} {e['tolerance']:>10.6f}  "
              f"{e['run']} ({e['metric']}){kept}")
    print(f"wrote {args.tolerances} and {args.evidence}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
