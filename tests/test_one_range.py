"""N = 1 (the study's "shared fine-tune with the channel projection" row) with LoRA adapters, on an idx source
with a test split: every stage runs, the ensemble too, the fine-tunes are stored as adapters, PEFT merges them,
and the models are scored against the test split."""

import json

import pytest
from stagehelp import built_project
from test_data import _idx_dir

from dtm_core import adapters


@pytest.mark.slow
def test_a_single_range_lora_pipeline_on_a_test_split(tmp_path_factory):
    stages = [("prepare", ()), ("classifier", ()), ("pretrain", ()), ("partition", ()), ("finetune", ("--range", "0")),
              ("finetune_shared", ()), ("task_vectors", ()), ("merge_weights", ()), ("merge", ()),
              *[("evaluate", ("--model", m)) for m in ("pretrained", "shared", "merged", "ensemble")], ("report", ())]
    idx = _idx_dir(tmp_path_factory.mktemp("idx"), n_train=200, n_test=60, size=8)
    proj, _ = built_project(tmp_path_factory, "one", stages, {
        "partition.ranges": [0], "data.source": "idx", "data.idx_dir": str(idx), "data.image_size": 8,
        "finetune.adapter": "lora", "merge.peft_combination": "cat"})
    for out in (proj / "models" / "ranges" / "range-0", proj / "models" / "shared"):
        files = {f.name for f in out.iterdir()}
        assert adapters.ADAPTER_WEIGHTS in files and "diffusion_pytorch_model.safetensors" not in files, out
    full = (proj / "models" / "merged" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert (proj / "models" / "shared" / adapters.ADAPTER_WEIGHTS).stat().st_size < 0.15 * full
    assert json.loads((proj / "models" / "merged" / "dtm_info.json").read_text())["method"] == "peft:cat"
    ensemble = json.loads((proj / "evaluation" / "ensemble.json").read_text())
    assert len(ensemble["range_model_heldout_loss_curves"]) == 1  # the one range model, over every t
    report = json.loads((proj / "reports" / "comparison.json").read_text())
    clf = json.loads((proj / "metrics" / "classifier.json").read_text())
    assert report["settings"]["reference"] == "test"
    assert report["settings"]["classifier_test_accuracy"] == clf["test_accuracy"]
    floor = report["floor"]
    assert floor["n"] == 80  # the models' sample count, drawn from the 160 train images
    for name, m in report["models"].items():
        assert m["fd_minus_floor"] == pytest.approx(m["fd"] - floor["fd_at_n"])
        assert m["fd_train"] != m["fd"], name  # two references, two numbers
        assert m["fd_at_floor_n"] is not None  # 80 samples, at least the 40 held-out images of the floor
        assert m["closer_to_train"] == (m["train_test_gap"] > floor["real_train_test_gap"])
    md = (proj / "reports" / "comparison.md").read_text()
    assert "against the test split" in md and "FD − floor" in md and "10 resamples for each model" in md
