"""Separate training luck from method: aggregate pipeline runs over training seeds.

Run the same settings under several root seeds (every stage derives its seeds
from ``seed``, so training, data order and evaluation noise all change), e.g.

    dvc exp run --queue -S 'seed=0,1,2'
    dvc queue start -j 1 && dvc queue status     # wait until all finished
    python -m dtm_core.aggregate                  # or: make aggregate

Every pipeline run's MLflow parent carries its full params and, from the
report stage, ``<model>/fd`` and ``<model>/kid``. This groups the parents by
all params except ``seed`` (and tracking settings) and reports mean ± std per
model over the seeds, written to ``reports/seeds.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from .io import atomic_file, write_json

MODELS = ("pretrained", "shared", "merged", "ensemble")
IGNORED = ("seed", "tracking.")


def group_runs(runs: list[dict]) -> list[dict]:
    """``runs``: dicts with 'params' (flat, str values) and 'metrics'. One group per setting."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        if not all(f"{m}/fd" in run["metrics"] for m in MODELS):
            continue  # an unfinished pipeline
        key = json.dumps({k: v for k, v in sorted(run["params"].items()) if not k.startswith(IGNORED)})
        groups[key].append(run)
    out = []
    for key, members in groups.items():
        seeds = sorted({m["params"].get("seed") for m in members})
        # one run per seed: the newest, if a seed was run twice
        latest = {}
        for m in sorted(members, key=lambda r: r.get("start_time", 0)):
            latest[m["params"].get("seed")] = m
        stats = {}
        for model in MODELS:
            for metric in ("fd", "kid"):
                values = np.array([r["metrics"][f"{model}/{metric}"] for r in latest.values()], dtype=float)
                stats[f"{model}/{metric}"] = {
                    "mean": float(values.mean()),
                    "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                    "n": int(len(values)),
                }
        deltas = np.array([r["metrics"]["merged/fd"] - r["metrics"]["shared/fd"] for r in latest.values()])
        stats["merged_minus_shared/fd"] = {
            "mean": float(deltas.mean()),
            "std": float(deltas.std(ddof=1)) if len(deltas) > 1 else 0.0,
            "n": int(len(deltas)),
        }
        out.append({"params": json.loads(key), "seeds": seeds, "stats": stats,
                    "run_ids": [r["run_id"] for r in latest.values()]})
    return sorted(out, key=lambda g: -len(g["seeds"]))


def fetch_runs(tracking_uri: str, experiment: str) -> list[dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment '{experiment}' at {tracking_uri}: run the pipeline first")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`dtm.kind` = 'pipeline'", max_results=5000)
    return [{"run_id": r.info.run_id, "start_time": r.info.start_time, "params": dict(r.data.params),
             "metrics": dict(r.data.metrics)} for r in runs]


def render(groups: list[dict]) -> str:
    lines = ["# DeMe over training seeds", ""]
    for g in groups:
        changed = ", ".join(f"{k}={v}" for k, v in g["params"].items() if k in ("finetune.p", "merge.method",
                            "merge.weights", "partition.ranges", "finetune.lr", "finetune.steps"))
        lines += [f"## seeds {g['seeds']} ({changed})", "", "| model | FD mean ± std | KID mean ± std | n |",
                  "|---|---|---|---|"]
        for model in MODELS:
            fd, kid = g["stats"][f"{model}/fd"], g["stats"][f"{model}/kid"]
            lines.append(f"| {model} | {fd['mean']:.4f} ± {fd['std']:.4f} | {kid['mean']:.5f} ± {kid['std']:.5f} "
                         f"| {fd['n']} |")
        d = g["stats"]["merged_minus_shared/fd"]
        lines += ["", f"merged − shared FD: {d['mean']:+.4f} ± {d['std']:.4f} over {d['n']} seed(s)", ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    from .config import load_params
    from .tracking import tracking_uri

    ap = argparse.ArgumentParser(prog="python -m dtm_core.aggregate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", type=Path, default=Path("reports"))
    args = ap.parse_args(argv)
    params = load_params(args.params)
    try:
        groups = group_runs(fetch_runs(tracking_uri(params), params.tracking.experiment_name))
    except ValueError as exc:
        print(f"error: aggregate: {exc}", file=sys.stderr)
        return 2
    write_json(args.out / "seeds.json", groups)
    with atomic_file(args.out / "seeds.md") as handle:
        handle.write(render(groups))
    print(render(groups))
    return 0


if __name__ == "__main__":
    sys.exit(main())
