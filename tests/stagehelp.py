"""Helpers for tests that run stage scripts in a scratch project directory."""

import gc
import os
import runpy
import sys
from pathlib import Path

import yaml
from tiny_params import tiny_params

from tools.exps import apply_overrides

ROOT = Path(__file__).resolve().parents[1]

# every stage of the tiny profile (N = 2), in dependency order
PIPELINE = [
    ("prepare", ()), ("classifier", ()), ("pretrain", ()), ("partition", ()),
    ("finetune", ("--range", "0")), ("finetune", ("--range", "1")), ("finetune_shared", ()),
    ("task_vectors", ()), ("merge_weights", ()), ("merge", ()),
    *[("evaluate", ("--model", m)) for m in ("pretrained", "shared", "merged", "ensemble")],
    ("controls", ()), ("analysis", ()), ("report", ()),
]


def write_params(proj: Path, params: dict) -> None:
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def set_param(params: dict, dotted: str, value) -> dict:
    return apply_overrides(params, {dotted: value})


def run_stage(stage: str, *args: str) -> int:
    """Run ``python -m stages.<stage>`` in this process (cwd = the project); its exit status."""
    argv = sys.argv
    sys.argv = [f"stages/{stage}.py", *args]
    try:
        runpy.run_module(f"stages.{stage}", run_name="__main__", alter_sys=False)
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = argv
        gc.unfreeze()  # stages.common.main froze the heap for a process's exit; this process goes on
    return 0


def new_project(proj: Path, overrides: dict | None = None) -> dict:
    """An empty project dir with dvc.yaml and the tiny params (plus dotted overrides)."""
    proj.mkdir(parents=True, exist_ok=True)
    (proj / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    params = tiny_params(yaml.safe_load((ROOT / "params.yaml").read_text()))
    for key, value in (overrides or {}).items():
        set_param(params, key, value)
    write_params(proj, params)
    return params


def stage_command(stage: str, *args: str) -> list[str]:
    """The command line DVC runs for a stage; run it with :func:`stage_env` from any directory."""
    return [sys.executable, "-m", f"stages.{stage}", *args]


def stage_env(proj: Path) -> dict:
    """A subprocess environment for a stage in ``proj``: this repo's stages/ importable, its own store."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{proj / 'mlflow.db'}"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("DTM_PARENT_RUN_ID", None)
    return env


def built_project(tmp_path_factory, name: str, stages, overrides: dict | None = None):
    """A scratch tiny-profile project with ``stages`` (name, args) run in it; yields (dir, params).

    For module-scoped fixtures: the working directory and the MLflow store
    point at the project while the stages run and are restored afterwards.
    """
    import pytest

    proj = tmp_path_factory.mktemp(name) / "proj"
    params = new_project(proj, overrides)
    mp = pytest.MonkeyPatch()
    mp.chdir(proj)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{proj / 'mlflow.db'}")
    try:
        for stage, args in stages:
            assert run_stage(stage, *args) == 0, stage
    finally:
        mp.undo()
    return proj, params
