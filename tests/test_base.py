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


def test_fashion_recipe_is_params_yaml_with_the_config_on_top():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    config = yaml.safe_load((ROOT / "configs" / "fashion.yaml").read_text())
    recipe = recipe_params(params, config)
    assert recipe["data"]["source"] == "idx" and recipe["data"]["split_seed"] == params["data"]["split_seed"]
    assert recipe["pretrain"]["lr_schedule"] == "constant" and recipe["pretrain"]["adam_betas"] == [0.95, 0.999]
    assert recipe["model"]["pretrained_path"] is None


def test_plateau_rule():
    from tools.make_base import plateaued

    rows = lambda *losses: [{"val_loss": v} for v in losses]  # noqa: E731
    assert not plateaued(rows(1.0), 0.005)
    assert not plateaued(rows(1.0, 0.99), 0.005)  # 1% better: keep going
    assert plateaued(rows(1.0, 0.996), 0.005)
    assert plateaued(rows(1.0, 1.01), 0.005)  # worse


def test_training_until_plateau_resumes_and_stops(tmp_path, monkeypatch):
    from test_data import _idx_dir

    from dtm_core.io import read_json
    from dtm_core.model import load_unet
    from tools.make_base import train_until_plateau

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = _idx_dir(tmp_path, n_train=40, n_test=4, size=8)
    params = recipe_params(yaml.safe_load((ROOT / "params.yaml").read_text()), {
        "data": {"source": "idx", "idx_dir": str(root), "image_size": 8, "holdout_fraction": 0.25},
        "model": {"block_out_channels": [8, 16], "norm_num_groups": 4},
        "pretrain": {"steps": 6, "batch_size": 8, "lr_schedule": "constant", "warmup_steps": 0},
        "evaluate": {"heldout_timesteps": 3}})
    out = tmp_path / "base"
    rows = train_until_plateau(params, out, every=3, tolerance=-1.0, val_images=4)  # never plateaus
    assert [r["step"] for r in rows] == [3, 6] and load_unet(out, what="base").config.sample_size == 8
    params["pretrain"]["steps"] = 12  # a longer run resumes at its last checkpoint (step 3; 6 was the end)
    rows = train_until_plateau(params, out, every=3, tolerance=1.0, val_images=4)  # stops at its next chunk
    curve = read_json(tmp_path / "base.state" / "plateau.json")
    assert [r["step"] for r in rows] == [3, 6] and curve["plateau"] is True
    assert read_json(out / "dtm_info.json")["plateau"] is True
    from PIL import Image

    with Image.open(tmp_path / "base.state" / "plateau.png") as im:  # the plateau plot beside its curve
        assert im.format == "PNG"
    assert not (tmp_path / "base.state" / "checkpoints").exists()
    assert train_until_plateau(params, out, every=3, tolerance=1.0, val_images=4) == rows  # done: nothing to do
