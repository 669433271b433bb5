"""Helpers for tests that run stage scripts in a scratch project directory."""

import runpy
import sys
from pathlib import Path

import yaml

from tiny_params import tiny_params

ROOT = Path(__file__).resolve().parents[1]

# every stage of the tiny profile (N = 2), in dependency order
PIPELINE = [
    ("prepare", ()), ("classifier", ()), ("pretrain", ()), ("partition", ()),
    ("finetune", ("--range", "0")), ("finetune", ("--range", "1")), ("finetune_shared", ()),
    ("task_vectors", ()), ("merge", ()),
    *[("evaluate", ("--model", m)) for m in ("pretrained", "shared", "merged", "ensemble")],
    ("report", ()),
]


def write_params(proj: Path, params: dict) -> None:
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def set_param(params: dict, dotted: str, value) -> dict:
    *path, last = dotted.split(".")
    node = params
    for p in path:
        node = node.setdefault(p, {})
    node[last] = value
    return params


def run_stage(stage: str, *args: str) -> int:
    """Run stages/<stage>.py in this process (cwd = the project); its exit status."""
    argv = sys.argv
    sys.argv = [f"stages/{stage}.py", *args]
    try:
        runpy.run_path(str(ROOT / "stages" / f"{stage}.py"), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = argv
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
