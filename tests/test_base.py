"""The shipped base checkpoint: importable by the pipeline exactly as a user's checkpoint is."""

import json
from pathlib import Path

import yaml
from stagehelp import ROOT, new_project, run_stage

from dtm_core.io import file_digest
from tools.make_base import recipe_params

BASE = ROOT / "base" / "digits-unet"


def test_default_params_point_at_the_shipped_base():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["model"]["pretrained_path"] == "base/digits-unet"
    assert (BASE / "diffusion_pytorch_model.safetensors").is_file() and (BASE / "scheduler_config.json").is_file()
    info = json.loads((BASE / "dtm_info.json").read_text())
    assert info["source"] == "embedded" and info["steps"] == params["pretrain"]["steps"]


def test_recipe_is_params_yaml_with_nothing_to_import():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    recipe = recipe_params(params)
    assert recipe["model"]["pretrained_path"] is None and recipe["pretrain"] == params["pretrain"]
    assert recipe["tracking"]["experiment_name"].endswith("-base") and recipe["tracking"]["register_model"] is None
    assert params["model"]["pretrained_path"] == "base/digits-unet"  # the input is not changed


def test_pretrain_imports_the_shipped_base_unchanged(tmp_path, monkeypatch):
    proj = tmp_path / "p"
    new_project(proj, {"model.pretrained_path": str(BASE)})
    monkeypatch.chdir(proj)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{proj / 'mlflow.db'}")
    assert run_stage("prepare") == 0 and run_stage("pretrain") == 0
    weights = "diffusion_pytorch_model.safetensors"
    assert file_digest(proj / "models" / "pretrained" / weights) == file_digest(BASE / weights)
    info = json.loads((proj / "models" / "pretrained" / "dtm_info.json").read_text())
    assert info["source"] == str(BASE) and info["schedule_source"] == "checkpoint"
    assert Path(info["source"]).is_dir()
