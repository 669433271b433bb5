"""The shared entry point of every stage script.

``main`` parses ``--params``, validates params.yaml, opens the stage's MLflow
child run, calls the stage function, writes the stage's metrics JSON (the
file DVC tracks) and logs the same numbers to MLflow. Known errors (bad
params, missing or corrupt inputs, unreachable tracking store) print one
clear message and exit with status 2, never a traceback; the MLflow runs are
marked FAILED and no out is left half-written.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from .config import load_params
from .errors import KNOWN_ERRORS
from .io import write_json

EXIT_USER_ERROR = 2


def _numeric(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def main(
    stage: str,
    fn: Callable,
    sections: Sequence[str],
    metrics_file: Optional[Callable[[argparse.Namespace], Path]],
    run_name: Optional[Callable[[argparse.Namespace], str]] = None,
    dvc_stage: Optional[Callable[[argparse.Namespace], str]] = None,
    add_args: Optional[Callable[[argparse.ArgumentParser], None]] = None,
    argv: Optional[Sequence[str]] = None,
) -> int:
    """Run one stage; ``fn(params, args, run)`` returns its metrics dict."""
    parser = argparse.ArgumentParser(prog=f"stages/{stage}.py", description=f"DVC stage '{stage}'")
    parser.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    if add_args:
        add_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("DTM_LOG_LEVEL", "INFO"), stream=sys.stderr,
        format=f"%(asctime)s {stage} %(levelname)s %(message)s",
    )
    for noisy in ("alembic", "mlflow", "httpx", "urllib3", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log = logging.getLogger("dtm")
    name = run_name(args) if run_name else stage
    try:
        params = load_params(args.params)
        from .tracking import stage_run

        start = time.perf_counter()
        with stage_run(params, name, dvc_stage(args) if dvc_stage else stage, sections) as run:
            metrics = fn(params, args, run)
            metrics["stage_seconds"] = time.perf_counter() - start
            if metrics_file is not None:
                path = metrics_file(args)
                write_json(path, metrics)
                run.log_artifact(path, "metrics")
            run.log_metrics(_numeric(metrics))
            run.set_tags({"dtm.metrics_file": metrics_file(args) if metrics_file else ""})
    except KNOWN_ERRORS as exc:
        log.debug("stage failed", exc_info=True)
        print(f"error: {stage}: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    log.info("%s done in %.1fs", name, metrics["stage_seconds"])
    return 0
