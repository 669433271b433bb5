"""What the stages share: where outs land, what each stage reads and writes, and the runner.

:data:`STAGES` reads from ``dvc.yaml``, the one declaration of the pipeline's shape, each stage's params (logged
to its MLflow run, hashed into its checkpoints), the files it reads and the metrics file it writes. A stage script
(``stages/<name>.py``) is glue run by :func:`main`: it reads params, calls ``dtm_core`` (which knows no pipeline
paths), writes its outs and logs to MLflow.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from dtm_core import distributed
from dtm_core.config import Params, load_params, select
from dtm_core.errors import DtmError, MissingInputError
from dtm_core.io import dir_digest, write_json

EXIT_USER_ERROR = 2

# --------------------------------------------------------------- where outs land
DATA_DIR = Path("data/prepared")
CLASSIFIER_DIR = Path("models/classifier")
REFERENCE_FILE = CLASSIFIER_DIR / "reference_features.npz"  # features of the real data, per data version
PRETRAINED_DIR = Path("models/pretrained")
RANGES_DIR = Path("models/ranges")
SHARED_DIR = Path("models/shared")
MERGED_DIR = Path("models/merged")
PARTITION_FILE = Path("partition/ranges.json")
PARTITION_ANALYSIS_DIR = Path("partition/analysis")
TASK_VECTOR_DIR = Path("task_vectors")
TASK_VECTOR_NORMS_TSV = Path("plots/task_vector_norms.tsv")
WEIGHTS_FILE = Path("merge/weights.json")
SEARCH_DIR = Path("merge/search")
METRICS_DIR = Path("metrics")
SAMPLES_DIR = Path("samples")
EVALUATION_DIR = Path("evaluation")
REPORT_DIR = Path("reports")
HELDOUT_LOSS_TSV = Path("plots/heldout_loss.tsv")
ANALYSIS_DIR = Path("analysis")
TIMINGS_DIR = Path("timings")  # stage seconds: not DVC outs, so a re-run leaves git clean
CHECKPOINT_DIR = Path(".dtm/checkpoints")

# The models every run evaluates and compares (dvc.yaml's evaluate foreach).
EVAL_MODELS = ("pretrained", "shared", "merged", "ensemble")


def range_dir(i: int) -> Path:
    return RANGES_DIR / f"range-{i}"


def eval_model_dir(name: str) -> Path:
    """The directory evaluate@<name> reads: the model, or every range model for the ensemble."""
    return RANGES_DIR if name == "ensemble" else Path("models") / name


# ------------------------------------------------------- what each stage reads and writes
DVC_YAML = Path(__file__).resolve().parents[1] / "dvc.yaml"


@dataclass(frozen=True)
class Stage:
    """One DVC stage as dvc.yaml declares it: ``{item}`` in a path is the matrix/foreach value (a range index, a
    model name), ``{model_dir}`` the evaluated model's directory."""

    params: tuple[str, ...]  # params.yaml keys or sections it reads (logged to MLflow, hashed into checkpoints)
    deps: tuple[str, ...]  # data and model files it reads (its code deps: tests/test_dvc_deps.py)
    metrics: tuple[str, ...]  # the metrics files it writes
    item: Optional[str]  # the command-line argument that selects the instance


def _template(path: str) -> str:
    return path.replace("${item.range}", "{item}").replace("${key}", "{item}").replace("${item.model_dir}",
                                                                                       "{model_dir}")


def read_stages(path: Path = DVC_YAML) -> dict[str, Stage]:
    """dvc.yaml's stages, the one declaration of what each stage reads and writes."""
    import yaml

    out = {}
    for name, stage in yaml.safe_load(path.read_text())["stages"].items():
        body = stage.get("do", stage)
        metrics = [next(iter(m)) if isinstance(m, dict) else m for m in body.get("metrics", [])]
        out[name] = Stage(params=tuple(body.get("params", [])),
                          deps=tuple(_template(d) for d in body["deps"] if not d.endswith(".py")),
                          metrics=tuple(_template(m) for m in metrics),
                          item="range" if "matrix" in stage else "model" if "foreach" in stage else None)
    return out


STAGES = read_stages()


def instance(name: str, item: Any = None) -> str:
    """The DVC name of a stage instance: ``finetune@2``, ``evaluate@merged``, ``report``."""
    return name if item is None else f"{name}@{item}"


def paths(template: str, item: Any = None) -> Path:
    value = "" if item is None else str(item)
    model_dir = str(eval_model_dir(value)) if template == "{model_dir}" else ""
    return Path(template.format(item=value, model_dir=model_dir))


# --------------------------------------------------------------- shared glue
def checkpoint_dir(name: str, params: Params, item: Any = None) -> Path:
    """Where a training stage keeps resumable state, keyed by a hash of the params it declares and the files it
    reads, so only the same training run resumes it; checkpoints of other settings are dropped."""
    spec = STAGES[name]
    h = hashlib.sha256(json.dumps(select(params, spec.params), sort_keys=True, default=str).encode())
    for template in spec.deps:
        path = paths(template, item)
        h.update(str(path).encode())
        if path.is_dir():
            h.update(dir_digest(path).encode())
        elif path.is_file():
            h.update(path.read_bytes())
    root = CHECKPOINT_DIR / instance(name, item).replace("@", "-")
    for stale in root.glob("*"):
        if stale.name != h.hexdigest()[:16]:
            shutil.rmtree(stale, ignore_errors=True)
    return root / h.hexdigest()[:16]


def load_reference(features: Optional[str] = None) -> dict:
    """The real data's features saved by the classifier stage (train, held-out; both feature spaces)."""
    if not REFERENCE_FILE.is_file():
        raise MissingInputError(f"reference features '{REFERENCE_FILE}' are missing: run dvc repro classifier")
    out = read_npz(REFERENCE_FILE)
    if features is not None and str(out["features"]) != features:
        raise MissingInputError(
            f"'{REFERENCE_FILE}' holds {out['features']} features but evaluate.features is '{features}': "
            "run dvc repro classifier"
        )
    return out


def reference_split(ref: dict) -> str:
    """The split samples are scored against: the source's own test split when it has one (idx), else train."""
    return "test" if "test" in ref else "train"


def validation_reference(ref: dict):
    """The classifier features a choice on validation noise (a scale, merge weights) is scored against: the
    held-out split where the test split is the final reference (idx), so no choice rewards copying train
    images; else train, as the digits default's choices were made."""
    return ref["heldout_classifier" if reference_split(ref) == "test" else "train_classifier"]


def read_npz(path: Path) -> dict:
    """Every array of an .npz file, read into memory."""
    import numpy as np

    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def data_version() -> tuple[str, str]:
    """The prepared data's version: DVC's digest of data/prepared from dvc.lock (written when prepare
    finished, so MLflow shows the digest dvc.lock does), or, for a stage run by hand, the files' sha256."""
    import yaml

    lock = Path("dvc.lock")
    if lock.is_file():
        try:
            for out in yaml.safe_load(lock.read_text())["stages"]["prepare"]["outs"]:
                if out["path"] == str(DATA_DIR):
                    return str(out["md5"]), "dvc.lock md5"
        except (KeyError, TypeError, yaml.YAMLError):
            pass
    return dir_digest(DATA_DIR), "sha256 of the files"


def log_data_version(run, params: Params, context: str) -> None:
    """The data this stage read as the MLflow dataset input of its run and of the pipeline's parent run."""
    digest, kind = data_version()
    d = params.data
    name = {"digits": "digits", "idx": Path(d.idx_dir).name, "imagefolder": Path(d.image_folder or ".").name}[d.source]
    run.log_dataset(f"{name} (data/prepared)", digest, f"{DATA_DIR} [{kind}]", context)


def main(name: str, fn: Callable[..., dict], argv: Optional[Sequence[str]] = None,
         trains: Optional[Callable[[Params], bool]] = None) -> int:
    """Run stage ``name`` (:func:`_main`), then freeze the heap for the process's exit.

    A stage's process ends when main returns. gc.freeze exempts everything alive then, torch's, diffusers'
    and MLflow's modules above all, from the garbage collections of Python's shutdown, which would
    otherwise walk that graph for about 2 s per stage process (docs/RESULTS.md "Stage start-up"). Objects
    are still freed by reference counting; only cycles made before the freeze stay until exit.
    """
    try:
        return _main(name, fn, argv, trains)
    finally:
        gc.freeze()


def _main(name: str, fn: Callable[..., dict], argv: Optional[Sequence[str]] = None,
          trains: Optional[Callable[[Params], bool]] = None) -> int:
    """Run stage ``name``: ``fn(params, run)`` (or ``fn(params, run, item)``) returns its metrics.

    Params are validated up front. The stage's MLflow child run logs the params it declares, the metrics (also
    written to its DVC metrics file, if it declares one) and its seconds (also in ``timings/``). A
    :class:`~dtm_core.errors.DtmError` (bad params, missing or corrupt input, unreachable tracking store) prints
    one line and exits 2, the MLflow runs marked FAILED and no out half-written; any other exception is a bug and
    shows its traceback. When ``trains(params)``, ``DTM_NUM_PROCESSES`` > 1 re-launches the stage under
    ``accelerate launch``, where only the main process opens an MLflow run and writes outs.
    """
    spec = STAGES[name]
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=f"DVC stage '{name}'")
    parser.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    if spec.item == "range":
        parser.add_argument("--range", type=int, required=True, help="range index i in 0..N-1")
    elif spec.item == "model":
        parser.add_argument("--model", required=True, choices=EVAL_MODELS)
    args = parser.parse_args(argv)
    item = getattr(args, spec.item) if spec.item else None
    stage = instance(name, item)
    logging.basicConfig(
        level=os.environ.get("DTM_LOG_LEVEL", "INFO"), stream=sys.stderr,
        format=f"%(asctime)s {stage} %(levelname)s %(message)s",
    )
    for noisy in ("alembic", "mlflow", "httpx", "urllib3", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        distributed.apply_thread_share()
        params = load_params(args.params)
        if trains is not None and trains(params):
            processes = distributed.requested_processes()
            if processes > 1 and not distributed.launched():
                cmd = distributed.launch_command(f"stages.{name}", sys.argv[1:] if argv is None else argv, processes)
                logging.getLogger("dtm").info("%s: %d processes: %s", stage, processes, " ".join(cmd))
                return subprocess.run(cmd, check=False, env=distributed.launch_env()).returncode
            if not distributed.is_main():
                try:
                    from dtm_core.tracking import NullRun

                    fn(params, NullRun(), item) if spec.item else fn(params, NullRun())
                except distributed.WorkerDone:
                    return 0
                raise RuntimeError(f"{stage}: process {distributed.rank()} finished without training")
        from dtm_core.tracking import stage_run

        start = time.perf_counter()
        with stage_run(params, stage, stage, spec.params) as run:
            metrics = fn(params, run, item) if spec.item else fn(params, run)
            seconds = time.perf_counter() - start
            for template in spec.metrics:
                path = paths(template, item)
                write_json(path, metrics)
                run.log_artifact(path, "metrics")
            run.log_metrics({**metrics, "stage_seconds": seconds})  # the run logs the numbers among them
        write_json(TIMINGS_DIR / f"{stage}.json", {"stage": stage, "stage_seconds": seconds})
    except DtmError as exc:
        logging.getLogger("dtm").debug("stage failed", exc_info=True)
        print(f"error: {stage}: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    logging.getLogger("dtm").info("%s done in %.1fs", stage, seconds)
    return 0
