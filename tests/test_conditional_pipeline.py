"""model.conditioning: prompt, end to end on the tiny profile with per-range LoRA adapters, on an idx source with
Fashion-MNIST's class names (the digits' prompts are tests/test_conditioning.py's)."""

import json

import pytest
from stagehelp import PIPELINE, built_project
from test_data import _idx_dir

from dtm_core import adapters
from dtm_core.config import ConfigError, parse_params


@pytest.fixture(scope="module")
def prompted(tmp_path_factory):
    idx = _idx_dir(tmp_path_factory.mktemp("idx"), n_train=200, n_test=60, size=8)
    proj, _ = built_project(tmp_path_factory, "prompted", PIPELINE, {
        "data.source": "idx", "data.idx_dir": str(idx), "data.image_size": 8,
        "model.conditioning": "prompt", "model.cross_attention_dim": 16, "finetune.adapter": "lora",
        "evaluate.guidance_curve": [1.0, 3.0], "evaluate.guidance_curve_samples": 20})
    return proj


@pytest.mark.slow(minutes=2)
def test_a_prompted_run_reports_conditional_accuracy_and_the_guidance_curve(prompted):
    proj = prompted
    config = json.loads((proj / "models" / "pretrained" / "config.json").read_text())
    assert config["_class_name"] == "PromptUNet2DModel" and config["prompts"][5] == "a photo of a sandal"
    for i in range(2):  # the range fine-tunes are adapters on the conditional UNet
        assert (proj / "models" / "ranges" / f"range-{i}" / adapters.ADAPTER_WEIGHTS).is_file()
    report = json.loads((proj / "reports" / "comparison.json").read_text())
    assert report["settings"]["guidance_scale"] == 2.0 and report["settings"]["reference"] == "test"
    for name in ("pretrained", "shared", "merged", "ensemble"):
        acc = report["models"][name]["conditional_accuracy"]
        curve = report["guidance_curves"][name]
        assert [r["scale"] for r in curve] == [1.0, 3.0] and all(r["num_samples"] == 20 for r in curve)
        metrics = json.loads((proj / "metrics" / f"{name}.json").read_text())
        assert metrics["conditional_accuracy"] == acc
    md = (proj / "reports" / "comparison.md").read_text()
    assert "## Guidance (prompt-conditioned models)" in md and "| merged | 3 |" in md
    assert (proj / "reports" / "figures" / "guidance_curve.png").stat().st_size > 1000


def test_what_samples_without_prompts_is_refused_for_a_prompted_run(default_params_dict):
    params = {**default_params_dict, "model": {**default_params_dict["model"], "conditioning": "prompt"}}
    parse_params(params)  # the default pipeline itself is fine
    with pytest.raises(ConfigError, match="merge.search.strategy"):
        parse_params({**params, "merge": {**params["merge"], "search": {"strategy": "coordinate"}}})
    with pytest.raises(ConfigError, match="controls.models"):
        parse_params({**params, "controls": {"models": ["soup"]}})
