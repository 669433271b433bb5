"""The averaging controls (docs/FASHION.md): each built as described, evaluated on the test noise, contrasted."""

import json

import pytest
from stagehelp import PIPELINE, built_project

from stages.controls import choose_scale


def test_the_scale_of_lowest_validation_fd_is_chosen():
    scores = {0.0: 3.0, 0.5: 1.0, 1.0: 1.0, 1.5: 2.0}
    chosen = choose_scale(lambda s: scores[s], lambda s: s, [0.0, 0.5, 1.0, 1.5])
    assert chosen["chosen"] == 0.5 and [r["validation_fd"] for r in chosen["candidates"]] == [3.0, 1.0, 1.0, 2.0]


NAMES = ["shared_consistency", "soup", "shared_scaled", "merged_scaled"]


@pytest.fixture(scope="module")
def fashion_like(tmp_path_factory):
    """The tiny pipeline with what the Fashion regime adds: every control and the paper's analyses."""
    stages = [s for s in PIPELINE if s[0] != "report"]
    proj, _ = built_project(tmp_path_factory, "controls", stages, {
        "controls.models": NAMES, "controls.scales": [0.0, 1.0], "controls.num_samples": 40,
        "analysis.lambdas": [0.0, 1.0], "analysis.gradient_bins": 2})
    return proj


@pytest.mark.slow(minutes=2)
def test_every_control_is_built_evaluated_and_contrasted(fashion_like):
    proj, names = fashion_like, NAMES
    record = json.loads((proj / "controls" / "controls.json").read_text())
    assert record["models"] == names and record["reference"] == "train"
    for name in names:
        assert (proj / "controls" / "models" / name / "diffusion_pytorch_model.safetensors").is_file()
        assert (proj / "controls" / "samples" / f"{name}.npz").is_file()
    for name in ("shared_scaled", "merged_scaled"):
        scale = record["scales"][name]
        assert scale["chosen"] in (0.0, 1.0) and len(scale["candidates"]) == 2
    assert set(record["contrasts"]) == {"merged_minus_soup", "merged_scaled_minus_shared_scaled",
                                        "merged_minus_shared_consistency", "merged_scaled_minus_merged"}
    for c in record["contrasts"].values():
        assert c["fd_ci"][0] <= c["fd"] <= c["fd_ci"][1]
    # the soup has N = 2 members, merged as the range models are
    assert len(list((proj / "controls" / "task_vectors").glob("soup-*.safetensors"))) == 2
    metrics = json.loads((proj / "metrics" / "controls.json").read_text())
    assert metrics["merged_minus_soup"] == record["contrasts"]["merged_minus_soup"]["fd"]
    assert "merged − soup" in (proj / "controls" / "controls.md").read_text()


@pytest.mark.slow(minutes=2)
def test_the_loss_along_each_task_vector_meets_the_evaluated_models_at_both_ends(fashion_like):
    proj = fashion_like
    summary = json.loads((proj / "analysis" / "summary.json").read_text())
    along = summary["loss_along_tau"]
    assert along["lambdas"] == [0.0, 1.0] and set(along["sources"]) == {"range-0", "range-1", "shared"}
    metric = {m: json.loads((proj / "metrics" / f"{m}.json").read_text())["heldout_loss"]
              for m in ("pretrained", "shared")}
    ranges = json.loads((proj / "evaluation" / "ensemble.json").read_text())["range_model_heldout_loss_curves"]
    for name, rows in along["sources"].items():
        assert rows["all_t"][0] == pytest.approx(metric["pretrained"], rel=1e-6), name  # lambda 0: the base
    # lambda 1: the fine-tuned model itself, as the evaluation measured it
    assert along["sources"]["shared"]["all_t"][1] == pytest.approx(metric["shared"], rel=1e-5)
    for i in range(2):
        rows = along["sources"][f"range-{i}"]
        assert rows["all_t"][1] == pytest.approx(sum(ranges[i]) / len(ranges[i]), rel=1e-5)
        assert len(rows["own_range"]) == 2
    conflict = summary["gradient_conflict"]
    for name in ("pretrained", "merged"):
        A = conflict[name]["affinity"]
        assert len(A) == 2 and A[0][0] == pytest.approx(1.0, abs=1e-5)
        assert conflict[name]["mean_cosine_between_bins"] == pytest.approx(A[0][1], abs=1e-6)
        assert (proj / "analysis" / f"gradient_conflict_{name}.png").is_file()


def test_choices_on_validation_noise_score_against_held_out_images_where_a_test_split_is_the_reference():
    """The controls' scale searches and the merge-weight search share one rule (stages.common)."""
    from stages import controls, merge_weights
    from stages.common import validation_reference

    ref = {"train_classifier": "train", "heldout_classifier": "held-out"}
    assert validation_reference(ref) == "train"  # digits: train is the reference, as the default's choices were
    assert validation_reference({**ref, "test": "test"}) == "held-out"  # idx: never the images that were trained on
    assert controls.validation_reference is merge_weights.validation_reference is validation_reference
