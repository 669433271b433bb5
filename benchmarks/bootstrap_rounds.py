"""How much the reported paired interval's width itself wobbles, and what sample count the power target needs.

    python benchmarks/bootstrap_rounds.py            # on the workspace's samples (after dvc repro)
    python benchmarks/bootstrap_rounds.py --repeats 20 --rounds 50 200 --reference-rounds 1000
    python benchmarks/bootstrap_rounds.py --rev refs/exps/.../seeds-1 ...   # experiments' samples (local DVC cache)

Run after ``dvc repro``: it reads ``samples/<model>.npz`` (the features the
report's contrasts use) and the reference features; with ``--rev``, the
samples and reference features each named revision (a commit or an experiment ref such as ``make
seeds``' runs) recorded, read from the local DVC cache. For each paired contrast
(merged - shared, merged - pretrained by default) it recomputes the report's
95% paired-bootstrap interval of the FD difference

1. ``--repeats`` times at each of ``--rounds`` bootstrap rounds, each time on
   another bootstrap seed: the spread of the half-width is how precisely the
   default ``evaluate.bootstrap_rounds`` pins the interval down;
2. once with ``--reference-rounds`` rounds: the half-width itself, up to
   bootstrap noise.

From that half-width h at the evaluated n it projects the sample count the
power target (half-width at most ``--target``) needs, n * (h / target)^2, as
the half-width falls as 1/sqrt(n) (docs/RESULTS.md, "An evaluation with
power"). The samples are not redrawn: this costs seconds, not a sampling run.

Prints a table and writes docs/results/bootstrap_rounds.json (``--out``).
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dtm_core import distances  # noqa: E402
from dtm_core.config import load_params  # noqa: E402
from dtm_core.distances import fd_contrast  # noqa: E402
from dtm_core.io import write_json  # noqa: E402
from dtm_core.seeding import derive_seed  # noqa: E402
from dtm_core.tracking import git_commit  # noqa: E402
from stages.common import REFERENCE_FILE, SAMPLES_DIR  # noqa: E402


def load_npz(path: Path, rev: Optional[str] = None) -> dict:
    """An .npz out as the workspace holds it, or as revision ``rev`` recorded it (from the local DVC cache)."""
    if rev is None:
        data = path
    else:
        import dvc.api

        with dvc.api.open(str(path), repo=str(ROOT), rev=rev, mode="rb") as handle:
            data = io.BytesIO(handle.read())
    with np.load(data) as npz:
        return {k: npz[k] for k in npz.files}


def settings(rev: Optional[str] = None) -> dict:
    """The params behind the samples: the workspace's params.yaml, or the one ``rev`` committed."""
    if rev is None:
        params = load_params("params.yaml")
    else:
        import yaml

        from dtm_core.config import parse_params

        shown = subprocess.run(["git", "show", f"{rev}:params.yaml"], cwd=ROOT, capture_output=True, text=True,
                               check=True)
        params = parse_params(yaml.safe_load(shown.stdout), f"{rev}:params.yaml")
    return {"seed": params.seed, "finetune.steps": params.finetune.steps,
            "evaluate.num_samples": params.evaluate.num_samples,
            "evaluate.bootstrap_rounds": params.evaluate.bootstrap_rounds}


def interval(a: np.ndarray, b: np.ndarray, reference: np.ndarray, rounds: int, seed: int) -> list[float]:
    """The report's own paired interval of FD(a) - FD(b) (dtm_core.distances.fd_contrast) at ``rounds`` rounds."""
    return fd_contrast({"features": a}, {"features": b}, reference, rounds, seed)["fd_ci"]


def half_width(a: np.ndarray, b: np.ndarray, reference: np.ndarray, rounds: int, seed: int) -> float:
    low, high = interval(a, b, reference, rounds, seed)
    return (high - low) / 2


def measure(pair: tuple[str, str], rounds: list[int], repeats: int, reference_rounds: int, target: float,
            seed: int, rev: Optional[str] = None) -> dict:
    reference = load_npz(REFERENCE_FILE, rev)["train"]
    a, b = (load_npz(SAMPLES_DIR / f"{name}.npz", rev)["features"] for name in pair)
    fd = distances.frechet_distance
    delta = fd(a, reference) - fd(b, reference)
    key = f"{pair[0]}_minus_{pair[1]}"
    row = {"contrast": key, "rev": rev or "workspace", "params": settings(rev), "n": len(a), "fd": delta,
           "by_rounds": {}}
    for r in rounds:
        widths = [half_width(a, b, reference, r, derive_seed(seed, f"{key}-{r}-{i}")) for i in range(repeats)]
        row["by_rounds"][str(r)] = {"repeats": repeats, "mean": float(np.mean(widths)),
                                    "sd": float(np.std(widths, ddof=1)) if repeats > 1 else 0.0,
                                    "min": float(min(widths)), "max": float(max(widths))}
    low, high = interval(a, b, reference, reference_rounds, derive_seed(seed, f"{key}-reference"))
    h = (high - low) / 2
    row["half_width"] = {"rounds": reference_rounds, "value": h, "ci": [low, high]}
    row["samples_for_target"] = int(np.ceil(len(a) * (h / target) ** 2))
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", nargs="+", default=["merged:shared", "merged:pretrained"],
                    help="contrasts as model:baseline")
    ap.add_argument("--rounds", type=int, nargs="+", default=[50, 200])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--reference-rounds", type=int, default=1000)
    ap.add_argument("--target", type=float, default=0.02, help="the power target's half-width (FD)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws")
    ap.add_argument("--rev", nargs="+", default=[None],
                    help="read the samples these revisions recorded (default: the workspace's)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results/bootstrap_rounds.json")
    args = ap.parse_args()

    start = time.perf_counter()
    rows = [measure(tuple(p.split(":")), args.rounds, args.repeats, args.reference_rounds,
                    args.target, args.seed, rev) for rev in args.rev for p in args.pairs]
    print(f"| samples of | contrast | FD | half-width [interval] ({args.reference_rounds} rounds) | "
          + " | ".join(f"{r}-round half-width: mean ± sd [min, max] over {args.repeats}" for r in args.rounds)
          + f" | samples for ±{args.target} |")
    print("|---" * (4 + len(args.rounds) + 1) + "|")
    for row in rows:
        cells = [f"{v['mean']:.4f} ± {v['sd']:.4f} [{v['min']:.4f}, {v['max']:.4f}]" for v in row["by_rounds"].values()]
        low, high = row["half_width"]["ci"]
        head = [row["rev"], f"{row['contrast']} (n = {row['n']})", f"{row['fd']:+.4f}",
                f"{row['half_width']['value']:.4f} [{low:+.4f}, {high:+.4f}]"]
        print("| " + " | ".join([*head, *cells, str(row["samples_for_target"])]) + " |")
    seconds = time.perf_counter() - start
    print(f"({seconds:.0f} s)")
    write_json(args.out, {
        "command": "python " + " ".join(["benchmarks/bootstrap_rounds.py", *sys.argv[1:]]),
        "git_commit": git_commit(),  # the code that ran; each row names the samples' rev and params
        "target": args.target, "contrasts": rows, "seconds": seconds,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
