"""Determinism (same params + seed -> bitwise-identical outs) and resume after SIGKILL."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from stagehelp import PIPELINE, new_project, run_stage, stage_command, stage_env

from dtm_core.io import dir_digest, file_digest

VOLATILE = ("seconds", "per_second", "mlflow", "run_id")


def _stable(obj):
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if not any(w in k for w in VOLATILE)}
    return obj


def _fingerprint(proj: Path) -> dict:
    out = {}
    for d in ("data/prepared", "models/classifier", "models/pretrained", "models/ranges", "models/shared",
              "models/merged", "task_vectors", "partition", "merge", "evaluation"):
        out[d] = dir_digest(proj / d)
    for f in sorted((proj / "samples").glob("*.png")):
        out[str(f.relative_to(proj))] = file_digest(f)
    for f in sorted((proj / "metrics").rglob("*.json")) + [proj / "reports" / "comparison.json"]:
        assert not any(w in json.dumps(json.loads(f.read_text())) for w in VOLATILE), f  # committed: stable
        out[str(f.relative_to(proj))] = _stable(json.loads(f.read_text()))
    return out


def _run_pipeline(proj: Path, monkeypatch, in_subprocess: tuple[str, ...] = ()) -> dict:
    """Every stage of the tiny pipeline in ``proj``: those named in ``in_subprocess`` as their own process,
    as DVC runs them, the rest in this one; the fingerprint of what they wrote."""
    monkeypatch.chdir(proj)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{proj / 'mlflow.db'}")
    for stage, args in PIPELINE:
        if stage in in_subprocess:
            proc = subprocess.run(stage_command(stage, *args), cwd=proj, env=stage_env(proj), capture_output=True,
                                  text=True, timeout=600)
            assert proc.returncode == 0, (stage, proc.stderr[-2000:])
        else:
            assert run_stage(stage, *args) == 0, (stage, args)
    return _fingerprint(proj)


@pytest.mark.slow
def test_same_params_and_seed_give_identical_outputs(tmp_path, monkeypatch):
    """The pipeline twice: once in this process, once with its first stages as their own processes (each DVC
    stage is one, so nothing may depend on process-global random state). Every out is identical."""
    import torch

    from dtm_core.distributed import THREADS_ENV

    # the stage processes take this process's thread count (a stage sets its threads from DTM_THREADS)
    monkeypatch.setenv(THREADS_ENV, str(torch.get_num_threads()))
    a = tmp_path / "a"
    b = tmp_path / "b"
    new_project(a)
    new_project(b)
    fa = _run_pipeline(a, monkeypatch)
    fb = _run_pipeline(b, monkeypatch, in_subprocess=("prepare", "classifier", "pretrain"))
    assert fa == fb
    # and the seed matters
    c = tmp_path / "c"
    new_project(c, {"seed": 1})
    monkeypatch.chdir(c)
    for stage in ("prepare", "pretrain"):
        assert run_stage(stage) == 0
    assert dir_digest(c / "models" / "pretrained") != fa["models/pretrained"]


def _start_finetune(proj: Path) -> subprocess.Popen:
    return subprocess.Popen(stage_command("finetune", "--range", "0"), cwd=proj, env=stage_env(proj),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_after_checkpoint(proc: subprocess.Popen, proj: Path, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list((proj / ".dtm" / "checkpoints" / "finetune-0").glob(f"*/step-{step}/COMPLETE")):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            pytest.fail(f"finetune ended before step {step}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no checkpoint at step {step} within {timeout}s")


@pytest.mark.slow
def test_finetune_killed_twice_resumes_bitwise_identical(tmp_path, monkeypatch):
    overrides = {"finetune.steps": 40, "finetune.checkpoint_every": 10}
    ref, proj = tmp_path / "ref", tmp_path / "killed"
    new_project(ref, overrides)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ref / 'mlflow.db'}")
    monkeypatch.chdir(ref)
    for stage in ("prepare", "partition", "pretrain"):
        assert run_stage(stage) == 0
    new_project(proj, overrides)
    for d in ("data", "partition", "models"):
        subprocess.run(["cp", "-r", str(ref / d), str(proj / d)], check=True)
    assert run_stage("finetune", "--range", "0") == 0  # uninterrupted, in ref
    expected = dir_digest(ref / "models" / "ranges" / "range-0")

    for kill_at in (10, 30):
        proc = _start_finetune(proj)
        _kill_after_checkpoint(proc, proj, kill_at)
        assert not (proj / "models" / "ranges" / "range-0").exists()  # nothing DVC could cache as good
    proc = _start_finetune(proj)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]
    assert dir_digest(proj / "models" / "ranges" / "range-0") == expected
    assert not list((proj / "models" / "ranges").glob(".range-0.tmp-*"))
    assert not (proj / ".dtm" / "checkpoints" / "finetune-0").exists() or not any(
        (proj / ".dtm" / "checkpoints" / "finetune-0").iterdir()
    )
    client = MlflowClient(f"sqlite:///{proj / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    mine = [r for r in runs if r.info.run_name == "finetune@0"]
    assert sorted(r.info.status for r in mine) == ["FINISHED", "KILLED", "KILLED"]
    assert next(r for r in mine if r.info.status == "FINISHED").data.metrics["resumed_from_step"] == 30
    assert not [r for r in runs if r.info.status == "RUNNING"]
