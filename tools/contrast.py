"""Paired contrasts between models of two runs, which ``dvc exp show`` cannot compute.

    python -m tools.contrast lora-digits:merged workspace:merged --out docs/results/lora_digits.json

Each side is ``EXPERIMENT:MODEL``: a DVC experiment of this commit, or
``workspace`` for the run in the working tree (``--baseline HEAD REV`` also reads
the experiments run on REV). Both runs must have sampled
from the same test noise (the same evaluate settings): FD(a) − FD(b) with the
report's paired bootstrap interval (``report.bootstrap_rounds`` resamples,
the same resampled indices for both), and the held-out loss difference paired
by image, each with its verdict.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from dtm_core import distances
from dtm_core.config import load_params
from dtm_core.io import read_json, write_json
from dtm_core.seeding import derive_seed
from stages.common import REPORT_DIR, SAMPLES_DIR, load_reference, reference_split
from stages.report import loss_contrast
from tools import command, exps

WORKSPACE = "workspace"
# what must match for two runs' samples to share their noise and their scoring
SAME = ("num_samples", "noise_seeds", "evaluate_seed", "sampler", "sampling_steps", "eta", "guidance_scale",
        "features", "reference", "reference_name", "heldout_images", "classifier_heldout_accuracy",
        "classifier_test_accuracy")


def side(spec: str) -> tuple[str, str, dict, dict]:
    """(experiment, model, its samples' arrays, its run's comparison.json) for ``EXPERIMENT:MODEL``."""
    name, sep, model = spec.partition(":")
    if not sep or not name or not model:
        raise exps.ExperimentError(f"'{spec}': give EXPERIMENT:MODEL, e.g. lora-digits:merged or workspace:shared")
    path = f"samples/{model}.npz"
    if name == WORKSPACE:
        if not (SAMPLES_DIR / f"{model}.npz").is_file():
            raise exps.ExperimentError(f"the workspace has no {path}: run dvc repro (or dvc checkout)")
        data, comparison = (SAMPLES_DIR / f"{model}.npz").read_bytes(), read_json(REPORT_DIR / "comparison.json",
                                                                                "the workspace's report")
    else:
        data, comparison = exps.experiment_bytes(name, path), exps.report(name, "run it first")
    with np.load(io.BytesIO(data)) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return name, model, arrays, comparison


def contrast(a: str, b: str) -> dict:
    params = load_params()
    (na, ma, da, ca), (nb, mb, db, cb) = side(a), side(b)
    sa, sb = ca["settings"], cb["settings"]
    unknown = sorted(k for k in SAME if (k in sa) != (k in sb))
    if unknown:  # one report predates the key: whether the runs agree on it cannot be told
        raise exps.ExperimentError(f"'{a}' and '{b}': only one of their reports records {unknown} (the other was "
                                   "made before the evaluation recorded it): re-run the older one on this commit")
    differ = {k: (sa.get(k), sb.get(k)) for k in SAME if sa.get(k) != sb.get(k)}
    if differ:
        raise exps.ExperimentError(f"'{a}' and '{b}' were not sampled and scored alike: {differ}")
    ref = load_reference()
    # the FDs are recomputed against the workspace's reference: it must be the one both runs were scored on
    here = str(ref["test_name"]) if "test_name" in ref else None
    if sa.get("reference_name") != here:
        raise exps.ExperimentError(f"'{a}' was scored against the {sa.get('reference_name') or 'train'} "
                                   f"split, the workspace's reference is the {here or 'train'} split: run the "
                                   "workspace with the runs' evaluate.reference (dvc exp apply one of them)")
    reference = ref[reference_split(ref)]
    # the runs' own resampling (their evaluate.seed and rounds, where recorded): the report's contrast when both
    # models are one run's
    seed = sa.get("evaluate_seed", params.evaluate.seed)
    rounds = sa["bootstrap_rounds"] if sa.get("bootstrap_rounds") == sb.get("bootstrap_rounds") is not None \
        else params.report.bootstrap_rounds
    fd = distances.fd_contrast(da, db, reference, rounds, derive_seed(seed, "paired-fd"))
    loss = loss_contrast(da["losses"], db["losses"], np.arange(da["losses"].shape[1]), rounds,
                         derive_seed(seed, f"loss-{ma}_minus_{mb}"))
    return {
        "a": {"run": na, "model": ma, **ca["models"][ma]}, "b": {"run": nb, "model": mb, **cb["models"][mb]},
        "fd": fd["fd"], "fd_ci": fd["fd_ci"], "fd_verdict": fd["verdict"],
        "heldout_loss": loss["delta"], "heldout_loss_ci": loss["ci"],
        "heldout_loss_verdict": loss["verdict"], "bootstrap_rounds": rounds,
        "settings": {k: sa.get(k) for k in SAME},
        "command": f"python -m tools.contrast {a} {b}"
                   + (f" --baseline {' '.join(exps.BASELINE)}" if exps.BASELINE != ["HEAD"] else ""),
    }


@command("contrast")
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.contrast", description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="EXPERIMENT:MODEL (or workspace:MODEL)")
    ap.add_argument("b", help="EXPERIMENT:MODEL (or workspace:MODEL)")
    ap.add_argument("--out", type=Path, help="write the contrast as JSON here")
    exps.add_baseline_argument(ap)
    args = ap.parse_args(argv)
    result = contrast(args.a, args.b)
    if args.out:
        write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("fd", "fd_ci", "fd_verdict", "heldout_loss", "heldout_loss_ci",
                                             "heldout_loss_verdict")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
