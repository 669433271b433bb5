"""MLflow tracking: one parent run per pipeline execution, one child run per stage.

DVC runs every stage as its own process. The parent is named by ``DTM_PARENT_RUN_ID``
(a wrapper or CI job that manages its own run), or else belongs to the execution of the
nearest ``dvc`` ancestor process (pid + start time), which ``.dtm/pipeline_run.json``
maps to its run: a new ``dvc repro`` gets a new parent; a stage run by hand, its own.

The parent is RUNNING while one of its stages runs and FINISHED between them; a failing
stage marks its child and the parent FAILED; runs a SIGKILLed stage left RUNNING are
marked KILLED by the next execution. Tracking URI: ``MLFLOW_TRACKING_URI``, else
``tracking.tracking_uri``, else ``sqlite:///<repo root>/mlflow.db``.

Several pipelines may share one SQLite store (``dvc queue start -j 2``): creating the
store and the experiment is serialised with a file lock beside the database, and every
client call is retried while SQLite reports ``database is locked``. An unreachable
server fails the stage at once (no silent fallback to another store, which would scatter runs).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

from .config import Params, flatten, select
from .errors import TrackingError
from .io import write_json

log = logging.getLogger(__name__)

STATE_FILE = Path(".dtm") / "pipeline_run.json"
PARENT_ENV = "DTM_PARENT_RUN_ID"


def repo_root(start: Optional[Path] = None) -> Path:
    """The project's root, seen from ``start`` (default: the working directory).

    Inside a DVC temporary experiment directory (``<root>/.dvc/tmp/exps/...``)
    this is the original ``<root>``, so every experiment logs to one store.
    """
    start = (start or Path.cwd()).resolve()
    parts = start.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    for candidate in (start, *start.parents):
        if (candidate / "dvc.yaml").is_file():
            return candidate
    return start


def tracking_uri(params: Optional[Params] = None) -> str:
    configured = params.tracking.tracking_uri if params is not None else None
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or f"sqlite:///{repo_root() / 'mlflow.db'}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def params_digest(params: Params) -> str:
    """A short digest of the full, validated params: equal for runs of the same configuration."""
    return hashlib.sha256(json.dumps(flatten(params), sort_keys=True, default=str).encode()).hexdigest()[:16]


def pipeline_key() -> str:
    """Identify the pipeline execution this process belongs to."""
    import psutil

    proc = psutil.Process()
    for ancestor in proc.parents():
        try:
            cmd = ancestor.cmdline()
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if any(Path(part).name == "dvc" for part in cmd[:3]) or cmd[1:3] == ["-m", "dvc"]:
            return f"dvc-{ancestor.pid}-{ancestor.create_time():.3f}"
    return f"proc-{proc.pid}-{proc.create_time():.3f}"


class _RetryingClient:
    """MlflowClient whose calls are retried while SQLite is locked by another writer."""

    ATTEMPTS = 10

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            for attempt in range(self.ATTEMPTS):
                try:
                    return attr(*args, **kwargs)
                except Exception as exc:  # sqlalchemy OperationalError wrapped by MlflowException
                    if "database is locked" not in str(exc) or attempt == self.ATTEMPTS - 1:
                        raise
                    time.sleep(min(0.1 * 2**attempt, 5.0))

        return call


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a ``sqlite:///`` tracking URI; None for any other store."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise store creation/migration and experiment creation across processes."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as handle:  # closing it releases the lock
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _client(uri: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    if uri.startswith(("http://", "https://")):
        # fail within seconds, not after minutes of back-off, when the server is down
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    mlflow.set_tracking_uri(uri)
    return _RetryingClient(MlflowClient(tracking_uri=uri))


def _experiment_id(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    local = sqlite_path(uri) is not None or uri.startswith("file:") or "://" not in uri
    artifact_location = (repo_root() / "mlartifacts" / name).as_uri() if local else None
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created concurrently by another stage process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _read_state() -> dict:
    try:
        return json.loads(STATE_FILE.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _parent_run(client, exp_id: str, params: Params) -> tuple[str, bool]:
    """(parent run id, whether this process manages its status)."""
    explicit = os.environ.get(PARENT_ENV)
    if explicit:
        return explicit, False
    key = pipeline_key()
    state = _read_state()
    if state.get("key") == key:
        with contextlib.suppress(Exception):  # deleted or from another store
            run = client.get_run(state["run_id"])
            if run.info.lifecycle_stage == "active" and run.info.status != "FAILED":
                return state["run_id"], True
    elif state.get("run_id"):
        _mark_killed(client, exp_id, state["run_id"])
    name = os.environ.get("DVC_EXP_NAME") or time.strftime("pipeline-%Y%m%d-%H%M%S")
    tags = {"dtm.kind": "pipeline", **_source_tags("dvc.yaml"), "dtm.pipeline_key": key,
            "dtm.params_digest": params_digest(params)}
    run = client.create_run(exp_id, run_name=name, tags=tags)
    _log_params(client, run.info.run_id, flatten(params))
    write_json(STATE_FILE, {"key": key, "run_id": run.info.run_id})
    return run.info.run_id, True


def _source_tags(name: str) -> dict[str, str]:
    return {"mlflow.source.git.commit": git_commit(), "mlflow.source.type": "LOCAL", "mlflow.source.name": name}


def _mark_killed(client, exp_id: str, parent_id: str) -> None:
    """A previous execution's runs still RUNNING were killed with it: say so."""
    try:
        stale = client.search_runs(
            [exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'"
        )
        for run in stale:
            client.set_terminated(run.info.run_id, "KILLED")
        if client.get_run(parent_id).info.status == "RUNNING":
            client.set_terminated(parent_id, "KILLED")
    except Exception as exc:  # the old run may live in another store
        log.debug("could not mark stale runs of %s: %s", parent_id, exc)


def _log_params(client, run_id: str, values: dict[str, Any]) -> None:
    from mlflow.entities import Param

    # log_batch splits a long list into the store's batch limits itself
    client.log_batch(run_id, params=[Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
                                     for k, v in sorted(values.items())])


def _metrics(values: dict[str, float], step: int = 0, model_id: Optional[str] = None) -> list:
    """``values`` as MLflow metrics, NaN and non-numbers left out."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step, model_id=model_id) for k, v in sorted(values.items())
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]


class NullRun:
    """The logging interface of a stage, logging nothing (library use, unit tests).

    :class:`StageRun` implements the same methods against MLflow; a
    misspelled method fails on both.
    """

    run_id: Optional[str] = None
    parent_id: Optional[str] = None

    def log_params(self, values: dict[str, Any]) -> None:
        pass

    def log_metrics(self, values: dict[str, float], step: int = 0, run_id: Optional[str] = None) -> None:
        pass

    def log_curve(self, name: str, points: Iterable[tuple[int, float]]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None, run_id: Optional[str] = None) -> None:
        _require_file(path)

    def set_tags(self, tags: dict[str, Any], run_id: Optional[str] = None) -> None:
        pass

    def log_parent_metrics(self, values: dict[str, float]) -> None:
        pass

    def log_parent_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        _require_file(path)

    def log_model(self, name: str, path: str | Path, digest: str, metrics: dict[str, float],
                  params: Optional[dict[str, Any]] = None) -> Optional[str]:
        return None

    def register_model(self, name: str, model_id: str, tags: dict[str, Any]) -> None:
        pass

    def log_dataset(self, name: str, digest: str, source: str, context: str = "training") -> None:
        pass


def _require_file(path: str | Path) -> None:
    # Logging a file that is not there is a bug in the stage, not user input.
    if not Path(path).exists():
        raise FileNotFoundError(f"artifact '{path}' to log does not exist")


class StageRun(NullRun):
    """What a stage logs to its child run (and, for the report, to the parent)."""

    def __init__(self, client, run_id: str, parent_id: str, experiment_id: Optional[str] = None):
        self.client = client
        self.run_id = run_id
        self.parent_id = parent_id
        self.experiment_id = experiment_id

    def log_params(self, values: dict[str, Any]) -> None:
        _log_params(self.client, self.run_id, values)

    def log_metrics(self, values: dict[str, float], step: int = 0, run_id: Optional[str] = None) -> None:
        self.client.log_batch(run_id or self.run_id, metrics=_metrics(values, step))

    def log_curve(self, name: str, points: Iterable[tuple[int, float]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(name, float(v), now, int(s)) for s, v in points])

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None, run_id: Optional[str] = None) -> None:
        _require_file(path)
        self.client.log_artifact(run_id or self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, Any], run_id: Optional[str] = None) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id or self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    # The parent's summary (filled by the report stage from stage outputs).
    def log_parent_metrics(self, values: dict[str, float]) -> None:
        self.log_metrics(values, run_id=self.parent_id)

    def log_parent_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self.log_artifact(path, artifact_path, run_id=self.parent_id)

    def log_model(self, name: str, path: str | Path, digest: str, metrics: dict[str, float],
                  params: Optional[dict[str, Any]] = None) -> Optional[str]:
        """An MLflow 3 *external* logged model for a model the pipeline keeps in DVC, its metrics linked.

        The weights stay in the DVC workspace and cache (no copy of megabytes
        per run in the store); the logged model carries the DVC path and the
        content digest, so ``mlflow.search_logged_models`` and the
        experiment's Models tab rank the pipeline's models by FD.
        """
        import mlflow

        model = mlflow.create_external_model(
            name=name, source_run_id=self.run_id, experiment_id=self.experiment_id, model_type="diffusers-unet",
            tags={"dvc.path": str(path), "dtm.content_digest": digest},
            params={k: str(v) for k, v in (params or {}).items()},
        )
        self.client.log_batch(self.run_id, metrics=_metrics(metrics, model_id=model.model_id))
        return model.model_id

    def register_model(self, name: str, model_id: str, tags: dict[str, Any]) -> None:
        """A new version of registered model ``name`` for the logged model ``model_id``."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        self.client.create_model_version(name, source=f"models:/{model_id}", run_id=self.run_id,
                                         tags={k: str(v) for k, v in tags.items()}, model_id=model_id)

    def log_dataset(self, name: str, digest: str, source: str, context: str = "training") -> None:
        """The data version this run and its parent read, as an MLflow dataset input (the Dataset column)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        entry = DatasetInput(Dataset(name=name, digest=digest[:36], source_type="local", source=source),
                             tags=[InputTag("mlflow.data.context", context)])
        for run_id in (self.run_id, self.parent_id):
            self.client.log_inputs(run_id, datasets=[entry])


@contextlib.contextmanager
def stage_run(params: Params, run_name: str, dvc_stage: str, keys: Sequence[str]) -> Iterator[StageRun]:
    """A child run under the pipeline's parent, logging the params ``keys`` the stage reads.

    On an exception the child and its parent are marked FAILED (nothing is
    left RUNNING) and the exception propagates.
    """
    uri = tracking_uri(params)
    try:
        with _store_lock(uri):  # the first use of a fresh SQLite store creates its tables: one process at a time
            client = _client(uri)
            exp_id = _experiment_id(client, params.tracking.experiment_name, uri)
    except Exception as exc:
        raise TrackingError(
            f"cannot reach the MLflow tracking store at '{uri}' ({type(exc).__name__}: {str(exc)[:200]}). "
            "Start the server, fix MLFLOW_TRACKING_URI / tracking.tracking_uri, or unset it to use "
            "the local sqlite:///<repo>/mlflow.db."
        ) from exc
    parent_id, manage_parent = _parent_run(client, exp_id, params)
    if manage_parent:
        client.update_run(parent_id, status="RUNNING")
    tags = {"mlflow.parentRunId": parent_id, "dvc.stage": dvc_stage, "dtm.kind": "stage",
            **_source_tags(f"stages/{dvc_stage.split('@')[0]}.py")}
    child = client.create_run(exp_id, run_name=run_name, tags=tags)
    run = StageRun(client, child.info.run_id, parent_id, exp_id)
    run.log_params(select(params, keys))
    try:
        yield run
    except BaseException:
        client.set_terminated(child.info.run_id, "FAILED")
        if manage_parent:
            client.set_terminated(parent_id, "FAILED")
            with contextlib.suppress(OSError):
                STATE_FILE.unlink()
        raise
    client.set_terminated(child.info.run_id, "FINISHED")
    if manage_parent:
        client.set_terminated(parent_id, "FINISHED")
