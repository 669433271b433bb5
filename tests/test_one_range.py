"""N = 1 (the study's "shared fine-tune with the channel projection" row): every stage runs, the ensemble too."""

import json

import pytest
from stagehelp import built_project


@pytest.mark.slow
def test_a_single_range_pipeline_runs_through_the_ensemble_evaluation(tmp_path_factory):
    stages = [("prepare", ()), ("classifier", ()), ("pretrain", ()), ("partition", ()), ("finetune", ("--range", "0")),
              ("finetune_shared", ()), ("task_vectors", ()), ("merge_weights", ()), ("merge", ()),
              *[("evaluate", ("--model", m)) for m in ("pretrained", "shared", "merged", "ensemble")], ("report", ())]
    proj, _ = built_project(tmp_path_factory, "one", stages, {"partition.ranges": [0]})
    ensemble = json.loads((proj / "evaluation" / "ensemble.json").read_text())
    assert len(ensemble["range_model_heldout_loss_curves"]) == 1  # the one range model, over every t
    assert json.loads((proj / "reports" / "comparison.json").read_text())["models"]["ensemble"]["fd"] > 0
