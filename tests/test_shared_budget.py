"""The shared baseline's own budget: finetune.shared_steps and benchmarks/shared_budget.py's early stop."""

import importlib.util
import json
import re
import subprocess
import sys

import pytest
from stagehelp import ROOT, built_project, set_param, stage_command, stage_env, write_params

from dtm_core.errors import ConfigError
from stages.report import compute_label

SPEC = importlib.util.spec_from_file_location("shared_budget", ROOT / "benchmarks" / "shared_budget.py")
shared_budget = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(shared_budget)


def test_the_early_stop_is_the_tuned_snapshot_with_the_lowest_validation_fd():
    rows = [{"step": 0, "fd": 0.1}, {"step": 3, "fd": 0.3}, {"step": 6, "fd": 0.2}, {"step": 9, "fd": 0.2}]
    assert shared_budget.choose(rows)["step"] == 6  # the base (step 0) is the reference, not a candidate; ties: earlier
    with pytest.raises(ValueError, match="--every"):
        shared_budget.choose(rows[:1])


def test_overrides_are_yaml_and_name_a_malformed_one():
    raw = shared_budget.with_overrides({"finetune": {"steps": 200}}, ["finetune.steps=1500", "finetune.shared_lr=null"])
    assert raw == {"finetune": {"steps": 1500, "shared_lr": None}}
    with pytest.raises(ConfigError, match="key=value"):
        shared_budget.with_overrides({}, ["finetune.steps"])


def test_the_report_says_whether_the_shared_baseline_had_equal_compute():
    assert compute_label({"num_ranges": 4, "finetune_steps_per_range": 200, "shared_steps": 800}) == "equal compute"
    label = compute_label({"num_ranges": 4, "finetune_steps_per_range": 1500, "shared_steps": 3000})
    assert "finetune.shared_steps" in label and "0.50 x" in label and "6000" in label


@pytest.mark.slow
def test_the_benchmark_scores_snapshots_on_validation_noise_and_the_stage_trains_its_budget(tmp_path_factory):
    proj, params = built_project(tmp_path_factory, "budget", [("prepare", ()), ("classifier", ()), ("pretrain", ())])
    out, fig = proj / "budget.json", proj / "budget.png"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "shared_budget.py"), "-S", "finetune.shared_steps=6",
           "--every", "3", "--samples", "40", "--out", str(out), "--figure", str(fig)]
    proc = subprocess.run(cmd, cwd=proj, env=stage_env(proj), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["step"] for r in result["rows"]] == [0, 3, 6] and fig.stat().st_size > 0
    assert result["budget"] == 6 and result["validation"]["evaluate_seed"] == 1
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", result["git_commit"])  # the code that ran (unknown outside git)
    tuned = [r for r in result["rows"] if r["step"]]
    assert result["chosen_steps"] == min(tuned, key=lambda r: r["fd"])["step"]
    # the memorised fraction counts samples: a multiple of 1 / --samples
    assert all(r["fd"] > 0 and r["heldout_loss"] > 0 and (40 * r["memorised_fraction"]).is_integer()
               for r in result["rows"])
    # the test noise is refused as validation noise
    proc = subprocess.run([*cmd[:2], "--val-seed", str(params["evaluate"]["seed"])], cwd=proj, env=stage_env(proj),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "test noise" in proc.stderr
    # under a cosine schedule an S-step run is not the S-step snapshot: refused, naming the key
    proc = subprocess.run([*cmd[:2], "-S", "finetune.lr_schedule=cosine"], cwd=proj, env=stage_env(proj),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "finetune.lr_schedule" in proc.stderr and "Traceback" not in proc.stderr

    write_params(proj, set_param(params, "finetune.shared_steps", result["chosen_steps"]))
    proc = subprocess.run(stage_command("finetune_shared"), cwd=proj, env=stage_env(proj), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((proj / "models" / "shared" / "dtm_info.json").read_text())
    assert info["steps"] == result["chosen_steps"]
