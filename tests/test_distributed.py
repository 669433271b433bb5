"""Multi-process training (accelerate launch, 2 CPU processes over gloo), thread shares, parallel range fine-tunes."""

import shutil
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from stagehelp import new_project, run_stage, stage_command, stage_env

from dtm_core import distributed
from dtm_core.errors import ConfigError

UPSTREAM = [("prepare", ()), ("pretrain", ()), ("partition", ())]
# enough steps for EMA and AdamW to move the weights, a checkpoint on the way
# the test's own lr (not params.yaml's): 12 steps must move the weights far above float noise
OVERRIDES = {"finetune.steps": 12, "finetune.checkpoint_every": 5, "finetune.batch_size": 16, "finetune.lr": 2e-4}


def test_thread_share_reads_the_environment(monkeypatch):
    for var in ("DTM_THREADS", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.thread_share() is None
    monkeypatch.setenv("DTM_THREADS", "3")
    assert distributed.thread_share() == 3
    monkeypatch.setenv("DTM_THREADS", "zero")
    with pytest.raises(ConfigError, match="DTM_THREADS"):
        distributed.thread_share()
    monkeypatch.delenv("DTM_THREADS")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    if not torch.cuda.is_available():  # a CPU launch splits the cores between its processes
        assert distributed.thread_share() == max(1, (__import__("os").cpu_count() or 1) // 2)


def test_shard_splits_a_global_batch_evenly(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert list(range(8))[distributed.shard(8)] == [1, 3, 5, 7]
    with pytest.raises(ConfigError, match="batch_size 7"):
        distributed.shard(7)


def test_launch_command_runs_the_stage_module_under_torchrun(monkeypatch):
    cmd = distributed.launch_command("stages.finetune", ["--range", "1"], 2)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2" and cmd[-4:] == ["-m", "stages.finetune", "--range", "1"]
    for var in ("LOCAL_RANK", "WORLD_SIZE", distributed.LAUNCHED_ENV):
        monkeypatch.delenv(var, raising=False)
    assert not distributed.launched()
    monkeypatch.setattr(distributed.os, "environ", distributed.launch_env())
    assert distributed.launched()  # a launched process never launches again


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A tiny project with the fine-tunes' inputs made."""
    proj = tmp_path_factory.mktemp("dist") / "base"
    new_project(proj, OVERRIDES)
    mp = pytest.MonkeyPatch()
    mp.chdir(proj)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{proj / 'mlflow.db'}")
    try:
        for stage, args in UPSTREAM:
            assert run_stage(stage, *args) == 0
    finally:
        mp.undo()
    (proj / "mlflow.db").unlink()
    return proj


def _copy(upstream, dest):
    shutil.copytree(upstream, dest)
    return dest


def _finetune(proj, index, **env):
    return subprocess.Popen(stage_command("finetune", "--range", str(index)), cwd=proj,
                            env={**stage_env(proj), **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish(proc):
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_two_process_finetune_matches_one_process_and_saves_once(upstream, tmp_path):
    one, two = _copy(upstream, tmp_path / "one"), _copy(upstream, tmp_path / "two")
    _finish(_finetune(one, 0, DTM_THREADS="1"))
    out = _finish(_finetune(two, 0, DTM_NUM_PROCESSES="2"))
    assert "torch.distributed.run" in out
    a = load_file(one / "models/ranges/range-0/diffusion_pytorch_model.safetensors")
    b = load_file(two / "models/ranges/range-0/diffusion_pytorch_model.safetensors")
    base = load_file(one / "models/pretrained/diffusion_pytorch_model.safetensors")
    moved = max((a[k] - base[k]).abs().max().item() for k in base)
    gap = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # the fine-tune changed the weights ...
    # ... and two processes on half batches each changed them the same way, up to rounding, which AdamW's
    # normalised steps amplify for weights whose gradients are near zero (measured: 0.8% of the largest change;
    # another batch or a missing gradient average moves weights by the order of the change itself)
    assert gap < 0.05 * moved
    # exactly one process saved and logged: one MLflow run, no temporary or checkpoint folders left
    runs = MlflowClient(f"sqlite:///{two / 'mlflow.db'}").search_runs(
        [e.experiment_id for e in MlflowClient(f"sqlite:///{two / 'mlflow.db'}").search_experiments()])
    assert [r.info.run_name for r in runs if r.info.run_name.startswith("finetune")] == ["finetune@0"]
    assert not list(two.rglob("*.tmp*")) and not list(two.rglob("step-*"))
