"""Several pipelines on one MLflow store: a shared SQLite file, and a real `mlflow server`."""

import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from stagehelp import PIPELINE, new_project, run_stage

STAGES_PER_PIPELINE = 6


def _pipeline_like(workdir: str, uri: str, params_dict: dict, errors) -> None:
    """One 'pipeline': several stage runs in a row, each logging metrics and an artifact."""
    try:
        os.chdir(workdir)
        os.environ["MLFLOW_TRACKING_URI"] = uri
        from dtm_core import tracking
        from dtm_core.config import parse_params

        params = parse_params(params_dict)
        Path("m.json").write_text("{}")
        for i in range(STAGES_PER_PIPELINE):
            with tracking.stage_run(params, f"stage-{i}", f"stage@{i}", ["seed", "finetune"]) as run:
                run.log_curve("loss", [(s, 1.0 / (s + 1)) for s in range(50)])
                run.log_metrics({"fd": float(i)})
                run.log_artifact("m.json", "metrics")
    except BaseException as exc:  # reported to the parent test process
        errors.put(f"{workdir}: {type(exc).__name__}: {exc}")


@pytest.mark.slow
def test_pipelines_sharing_one_sqlite_store(tmp_path, tiny_dict):
    """Fresh store, four pipelines at once: no 'database is locked', none lost, all nested."""
    uri = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    procs = []
    for k in range(4):
        work = tmp_path / f"clone-{k}"
        work.mkdir()
        procs.append(ctx.Process(target=_pipeline_like, args=(str(work), uri, tiny_dict, errors)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert not problems, problems
    assert all(p.exitcode == 0 for p in procs)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("decouple-then-merge")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("dtm.kind") == "pipeline"]
    assert len(parents) == 4
    for parent in parents:
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(r.info.run_name for r in kids) == [f"stage-{i}" for i in range(STAGES_PER_PIPELINE)]
        assert all(r.info.status == "FINISHED" for r in kids)
        assert all(len(client.get_metric_history(r.info.run_id, "loss")) == 50 for r in kids)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {proc.stderr.read()[-2000:]}")
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not come up within 120 s")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.mark.slow
def test_tiny_pipeline_against_a_real_mlflow_server(tmp_path, mlflow_server, monkeypatch):
    proj = tmp_path / "proj"
    new_project(proj)
    monkeypatch.chdir(proj)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv("DTM_PARENT_RUN_ID", raising=False)
    for stage, args in PIPELINE:
        assert run_stage(stage, *args) == 0, (stage, args)
    client = MlflowClient(mlflow_server)  # the REST client
    exp = client.get_experiment_by_name("decouple-then-merge")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("dtm.kind") == "pipeline"]
    assert len(parents) == 1
    kids = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert kids == {stage if not args else f"{stage}@{args[1]}" for stage, args in PIPELINE}
    assert "merged/fd" in client.get_run(parents[0].info.run_id).data.metrics
    assert "report" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    # artifacts went through the server, not to the local disk
    assert not (proj / "mlartifacts").exists()
