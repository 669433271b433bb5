"""What the stages share: where outs land, resumable-checkpoint keys, reference features."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from ..config import Params, flatten
from ..io import dir_digest

# Where outs land (relative to the repository root; dvc.yaml names the same paths).
DATA_DIR = Path("data/prepared")
CLASSIFIER_DIR = Path("models/classifier")
REFERENCE_FILE = CLASSIFIER_DIR / "reference_features.npz"  # features of the real data, per data version
PRETRAINED_DIR = Path("models/pretrained")
SHARED_DIR = Path("models/shared")
MERGED_DIR = Path("models/merged")
PARTITION_FILE = Path("partition/ranges.json")
TASK_VECTOR_DIR = Path("task_vectors")
FINETUNE_METRICS_DIR = Path("metrics/finetune")
TASK_VECTOR_NORMS_TSV = Path("plots/task_vector_norms.tsv")
MERGE_DIR = Path("merge")
METRICS_DIR = Path("metrics")
SAMPLES_DIR = Path("samples")
REPORT_DIR = Path("reports")
CHECKPOINT_DIR = Path(".dtm/checkpoints")
EVAL_MODELS = ("pretrained", "shared", "merged", "ensemble")


def range_dir(i: int) -> Path:
    return Path(f"models/range-{i}")


def checkpoint_dir(name: str, params: Params, sections: tuple[str, ...], inputs: tuple[Path, ...]) -> Path:
    """Where a training stage keeps resumable state, keyed by what it trains from.

    A checkpoint is resumed only by a run with the same params sections and
    the same input files; checkpoints of other settings are dropped.
    """
    h = hashlib.sha256()
    selected = {k: v for s in sections for k, v in flatten(params.section(s), s).items()}
    h.update(json.dumps(selected, sort_keys=True, default=str).encode())
    for path in inputs:
        h.update(dir_digest(path).encode() if path.is_dir() else path.read_bytes())
    root = CHECKPOINT_DIR / name
    for stale in root.glob("*"):
        if stale.name != h.hexdigest()[:16]:
            shutil.rmtree(stale, ignore_errors=True)
    return root / h.hexdigest()[:16]


class NullRun:
    """A StageRun stand-in that logs nothing (library use, unit tests)."""

    run_id = parent_id = None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def load_reference(features: str) -> dict:
    if not REFERENCE_FILE.is_file():
        raise FileNotFoundError(f"reference features '{REFERENCE_FILE}' are missing: run dvc repro classifier")
    with np.load(REFERENCE_FILE) as ref:
        out = {k: ref[k] for k in ref.files}
    if str(out["features"]) != features:
        raise ValueError(
            f"'{REFERENCE_FILE}' holds {out['features']} features but evaluate.features is '{features}': "
            "run dvc repro classifier"
        )
    return out
