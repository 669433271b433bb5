"""dvc.yaml is the one declaration of the stages: the runner reads it, and it follows the project's conventions."""

import re
from pathlib import Path

import yaml

from stages import common

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGE_NAMES = list(DVC["stages"])


def _body(name: str) -> dict:
    stage = DVC["stages"][name]
    return stage.get("do", stage)


def _paths(items) -> list[str]:
    return [next(iter(i)) if isinstance(i, dict) else i for i in items or []]


def test_the_runner_reads_every_stage_from_dvc_yaml():
    assert list(common.STAGES) == STAGE_NAMES
    assert common.STAGES["finetune"].params[:2] == ("seed", "finetune.steps")
    assert common.STAGES["evaluate"].deps == ("models/classifier", "models/pretrained", "data/prepared",
                                              "partition/ranges.json", "{model_dir}")
    assert common.STAGES["evaluate"].metrics == ("metrics/{item}.json",)
    assert (common.STAGES["finetune"].item, common.STAGES["evaluate"].item, common.STAGES["report"].item) == \
        ("range", "model", None)
    assert not any(d.endswith(".py") for s in common.STAGES.values() for d in s.deps)


def test_a_changed_dvc_yaml_changes_what_the_runner_declares(tmp_path):
    declared = "params: [seed, merge.method, merge.density, merge.scale, merge.peft_combination]"
    text = (ROOT / "dvc.yaml").read_text().replace(declared, "params: [seed, merge.method]")
    (tmp_path / "dvc.yaml").write_text(text)
    assert common.read_stages(tmp_path / "dvc.yaml")["merge"].params == ("seed", "merge.method")


def test_metrics_and_plots_are_committed_files():
    for name in STAGE_NAMES:
        for kind in ("metrics", "plots"):
            for item in _body(name).get(kind) or []:
                assert isinstance(item, dict) and next(iter(item.values())) == {"cache": False}, (name, kind)


def test_the_fan_outs():
    assert DVC["stages"]["finetune"]["matrix"] == {"range": "${partition.ranges}"}
    foreach = DVC["stages"]["evaluate"]["foreach"]
    assert tuple(foreach) == common.EVAL_MODELS
    assert {m: v["model_dir"] for m, v in foreach.items()} == {m: str(common.eval_model_dir(m))
                                                               for m in common.EVAL_MODELS}
    # the report reads every evaluated model's outputs
    deps = _body("report")["deps"]
    for m in common.EVAL_MODELS:
        assert {f"metrics/{m}.json", f"evaluation/{m}.json", f"samples/{m}.npz"} <= set(deps)


def test_path_constants_are_the_declared_ones():
    declared = {p.replace("${item.range}", "{item}") for name in STAGE_NAMES for kind in ("deps", "outs", "metrics",
                                                                                         "plots")
                for p in _paths(_body(name).get(kind))}
    for const in ("DATA_DIR", "CLASSIFIER_DIR", "PRETRAINED_DIR", "SHARED_DIR", "MERGED_DIR", "PARTITION_FILE",
                  "TASK_VECTOR_DIR", "WEIGHTS_FILE", "SEARCH_DIR", "HELDOUT_LOSS_TSV", "TASK_VECTOR_NORMS_TSV",
                  "RANGES_DIR"):
        assert str(getattr(common, const)) in declared, const
    assert str(common.range_dir(3)) == "models/ranges/range-{item}".format(item=3)
    assert "models/ranges/range-{item}" in declared


def test_commands_pass_the_fan_out_item():
    assert _body("finetune")["cmd"].endswith("--range ${item.range}")
    assert _body("evaluate")["cmd"].endswith("--model ${key}")
    for name in STAGE_NAMES:
        assert re.fullmatch(rf"python -m stages\.{name}( --\w+ \$\{{[\w.]+\}})?", _body(name)["cmd"]), name
