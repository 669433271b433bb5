"""dvc.yaml says what stages/common.py declares: params, data deps, outs, metrics, plots, models.

The declaration in stages/common.py is what a stage logs to MLflow and hashes
into its resumable checkpoint; dvc.yaml is what DVC re-runs it for. They must
be the same lists.
"""

import re
from pathlib import Path

import pytest
import yaml

from stages import common

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGE_NAMES = list(DVC["stages"])


def _body(name: str) -> dict:
    stage = DVC["stages"][name]
    return stage.get("do", stage)


def _entries(items) -> list[tuple[str, dict]]:
    """dvc.yaml out lists hold plain paths or {path: {options}}."""
    out = []
    for item in items or []:
        if isinstance(item, dict):
            (path, opts), = item.items()
            out.append((path, opts or {}))
        else:
            out.append((item, {}))
    return out


def _template(path: str) -> str:
    """dvc.yaml's interpolation in the declaration's placeholders."""
    path = path.replace("${item.range}", "{item}").replace("${key}", "{item}")
    return path.replace("${item.model_dir}", "{model_dir}")


def test_every_stage_is_declared_and_vice_versa():
    assert set(STAGE_NAMES) == set(common.STAGES)


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_params_match_the_declaration(name):
    assert tuple(_body(name).get("params", [])) == common.STAGES[name].params


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_data_deps_match_the_declaration(name):
    data = [_template(d) for d in _body(name)["deps"] if not d.endswith(".py")]
    assert tuple(data) == common.STAGES[name].deps


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_outs_metrics_and_plots_match_the_declaration(name):
    body, spec = _body(name), common.STAGES[name]
    outs = _entries(body.get("outs"))
    assert tuple(_template(p) for p, o in outs if o.get("cache", True)) == spec.outs
    assert tuple(_template(p) for p, o in outs if not o.get("cache", True)) == spec.uncached
    for kind in ("metrics", "plots"):
        entries = _entries(body.get(kind))
        assert all(o.get("cache") is False for _, o in entries), f"{name}: {kind} are committed (cache: false)"
        assert tuple(_template(p) for p, _ in entries) == getattr(spec, kind)


def test_the_fan_outs():
    assert DVC["stages"]["finetune"]["matrix"] == {"range": "${partition.ranges}"}
    assert common.STAGES["finetune"].item == "range"
    foreach = DVC["stages"]["evaluate"]["foreach"]
    assert tuple(foreach) == common.EVAL_MODELS
    assert {m: v["model_dir"] for m, v in foreach.items()} == {m: str(common.eval_model_dir(m))
                                                               for m in common.EVAL_MODELS}
    # the report reads every evaluated model's outputs
    deps = _body("report")["deps"]
    for m in common.EVAL_MODELS:
        assert {f"metrics/{m}.json", f"evaluation/{m}.json", f"samples/{m}.npz"} <= set(deps)


def test_path_constants_are_the_declared_ones():
    declared = {p for s in common.STAGES.values() for p in (*s.deps, *s.outs, *s.uncached, *s.metrics, *s.plots)}
    for const in ("DATA_DIR", "CLASSIFIER_DIR", "PRETRAINED_DIR", "SHARED_DIR", "MERGED_DIR", "PARTITION_FILE",
                  "TASK_VECTOR_DIR", "WEIGHTS_FILE", "SEARCH_DIR", "HELDOUT_LOSS_TSV", "TASK_VECTOR_NORMS_TSV",
                  "BASE_DIR", "RANGES_DIR"):
        assert str(getattr(common, const)) in declared, const
    assert str(common.range_dir(3)) == common.STAGES["finetune"].outs[0].format(item=3)


def test_commands_pass_the_fan_out_item():
    assert _body("finetune")["cmd"].endswith("--range ${item.range}")
    assert _body("evaluate")["cmd"].endswith("--model ${key}")
    for name in STAGE_NAMES:
        assert re.fullmatch(rf"python -m stages\.{name}( --\w+ \$\{{[\w.]+\}})?", _body(name)["cmd"]), name
