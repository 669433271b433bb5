"""``make ui``: print the direct addresses of the runs and models views, then start ``mlflow ui``."""

from __future__ import annotations

import os
import sys

HOST, PORT = "127.0.0.1", 5000


def main() -> int:
    from dtm_core.config import load_params
    from dtm_core.tracking import sqlite_path, tracking_uri

    params = load_params("params.yaml")
    uri, name = tracking_uri(params), params.tracking.experiment_name
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        print(f"no MLflow store at {db} yet: run `make repro` first")
    else:
        from mlflow.tracking import MlflowClient

        exp = MlflowClient(uri).get_experiment_by_name(name)
        if exp is None:
            print(f"no experiment '{name}' yet: run `make repro` first")
        else:
            print(f"runs:   http://{HOST}:{PORT}/#/experiments/{exp.experiment_id}/runs")
            print(f"models: http://{HOST}:{PORT}/#/experiments/{exp.experiment_id}/models")
    sys.stdout.flush()
    if db is None:
        print(f"the store is {uri}: open its own UI")
        return 0
    os.execvp("mlflow", ["mlflow", "ui", "--backend-store-uri", uri, "--host", HOST, "--port", str(PORT)])


if __name__ == "__main__":
    sys.exit(main())
