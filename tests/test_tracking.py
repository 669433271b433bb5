from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dtm_core import tracking


def test_repo_root_inside_dvc_temp_experiment(tmp_path):
    inner = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "standalone" / "tmpabc"
    inner.mkdir(parents=True)
    (inner / "dvc.yaml").write_text("stages: {}\n")
    assert tracking.repo_root(inner) == tmp_path / "proj"


def test_repo_root_finds_dvc_yaml(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "sub").mkdir()
    assert tracking.repo_root(tmp_path / "sub") == tmp_path


def test_tracking_uri_precedence(tmp_path, monkeypatch, tiny):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tiny) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    custom = tiny.model_copy(update={"tracking": tiny.tracking.model_copy(update={"tracking_uri": "sqlite:///x.db"})})
    assert tracking.tracking_uri(custom) == "sqlite:///x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.tracking_uri(custom) == "http://127.0.0.1:1"


def _runs(uri):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("decouple-then-merge")
    return client.search_runs([exp.experiment_id])


def test_stages_of_one_execution_share_a_parent(in_tmp, tiny):
    with tracking.stage_run(tiny, "a", "a", ["seed", "finetune"]) as a:
        a.log_metrics({"x": 1.0})
        a.log_curve("loss", [(1, 0.5), (2, 0.4)])
    with tracking.stage_run(tiny, "b", "b", ["merge"]) as b:
        b.log_parent_metrics({"summary": 2.0})
    assert a.parent_id == b.parent_id
    runs = {r.info.run_name: r for r in _runs(f"sqlite:///{in_tmp / 'mlflow.db'}")}
    parent = runs.pop(next(n for n, r in runs.items() if r.data.tags.get("dtm.kind") == "pipeline"))
    assert set(runs) == {"a", "b"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs.values())
    assert runs["a"].data.params["finetune.lr"] == str(tiny.finetune.lr)
    assert runs["a"].data.tags["dvc.stage"] == "a"
    assert parent.data.metrics["summary"] == 2.0
    assert parent.data.params["finetune.p"] == str(tiny.finetune.p)
    assert parent.info.status == "FINISHED" and runs["a"].info.status == "FINISHED"
    assert "mlflow.source.git.commit" in parent.data.tags


def test_failing_stage_marks_child_and_parent_failed(in_tmp, tiny):
    with pytest.raises(RuntimeError):
        with tracking.stage_run(tiny, "bad", "bad", ["seed"]):
            raise RuntimeError("boom")
    runs = _runs(f"sqlite:///{in_tmp / 'mlflow.db'}")
    assert {r.info.status for r in runs} == {"FAILED"}
    assert not tracking.STATE_FILE.exists()
    # the next execution starts a fresh parent
    with tracking.stage_run(tiny, "good", "good", ["seed"]) as run:
        pass
    parents = [r for r in _runs(f"sqlite:///{in_tmp / 'mlflow.db'}") if r.data.tags.get("dtm.kind") == "pipeline"]
    assert len(parents) == 2 and run.parent_id in {p.info.run_id for p in parents}


def test_explicit_parent_from_environment(in_tmp, tiny, monkeypatch):
    client = MlflowClient(f"sqlite:///{in_tmp / 'mlflow.db'}")
    with tracking.stage_run(tiny, "first", "first", ["seed"]) as first:
        pass
    monkeypatch.setenv(tracking.PARENT_ENV, first.parent_id)
    with tracking.stage_run(tiny, "second", "second", ["seed"]) as second:
        pass
    assert second.parent_id == first.parent_id
    assert client.get_run(second.run_id).data.tags["mlflow.parentRunId"] == first.parent_id


def test_artifacts_land_in_the_repo_store(in_tmp, tiny):
    (in_tmp / "dvc.yaml").write_text("stages: {}\n")
    f = in_tmp / "m.json"
    f.write_text("{}")
    with tracking.stage_run(tiny, "a", "a", ["seed"]) as run:
        run.log_artifact(f, "metrics")
    assert list(Path(in_tmp / "mlartifacts").rglob("m.json"))


def test_null_run_has_exactly_the_stage_run_interface(tmp_path):
    public = lambda cls: {n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))}  # noqa: E731
    assert public(tracking.NullRun) == public(tracking.StageRun)
    run = tracking.NullRun()
    with pytest.raises(AttributeError):
        run.log_metric({"x": 1.0})  # a misspelled method fails instead of logging nothing
    with pytest.raises(FileNotFoundError):
        run.log_artifact(tmp_path / "absent.png")  # a missing artifact is a bug, not silently skipped
