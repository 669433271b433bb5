"""The tools: the regression gate and its tolerances, the experiments they run and read, seeds, sweeps, the study
and the Fashion verdict."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from dtm_core import distances
from dtm_core.errors import ConfigError
from tools import contrast, exps, fashion, regress, seeds, study, sweep, tolerances
from tools.exps import config_overrides, set_args
from tools.fashion import decide, headline, pilot_size, reachable, render, seed_summary


def _comparison(scale=1.0, merged_fd=5.8):
    models = {m: {"fd": fd * scale, "kid": kid * scale, "heldout_loss": 0.05 * scale, "memorised_fraction": 0.04}
              for m, fd, kid in (("pretrained", 6.0, 0.12), ("shared", 5.4, 0.09), ("merged", merged_fd, 0.12),
                                 ("ensemble", 5.5, 0.11))}
    contrast = lambda a, b: {"fd": models[a]["fd"] - models[b]["fd"], "fd_ci": [-1.0, 1.0],  # noqa: E731
                             "heldout_loss": {"delta": 0.0, "ci": [-0.001, 0.001]}}
    return {"models": models,
            "contrasts": {f"{a}_minus_{b}": contrast(a, b) for a, b in
                          (("merged", "shared"), ("ensemble", "shared"), ("merged", "pretrained"))},
            "range_models": [{"vs_pretrained": {"delta": -0.001}}], "settings": {"num_ranges": 4}}


def test_gate_passes_the_same_run_fails_a_worse_one_with_a_readable_table_and_tolerates_improvements(tmp_path, capsys):
    cur, ref, tol = tmp_path / "comparison.json", tmp_path / "reference.json", tmp_path / "tolerances.json"
    cur.write_text(json.dumps(_comparison()))
    ref.write_text(json.dumps(_comparison()))
    tol.write_text(json.dumps({"fd": {"abs": 0.01, "rel": 0.02}, "kid": {"abs": 0.002, "rel": 0.05},
                               "heldout_loss": {"abs": 0.001},
                               "contrasts.merged_minus_shared.fd": {"abs": 0.02},
                               "contrasts.merged_minus_shared.heldout_loss": {"abs": 0.001}}))
    args = ["--current", str(cur), "--reference", str(ref), "--tolerances", str(tol)]
    assert regress.main(args) == 0
    assert "no regression" in capsys.readouterr().out
    cur.write_text(json.dumps(_comparison(merged_fd=6.5)))  # +0.7 FD
    assert regress.main(args) == 1
    out = capsys.readouterr().out
    assert "models.merged.fd" in out and "REGRESSED" in out and "REGRESSION in 2 metric(s)" in out
    row = next(line for line in out.splitlines() if line.startswith("models.merged.fd"))
    assert "+0.70000" in row
    cur.write_text(json.dumps(_comparison(scale=0.5)))
    assert regress.main(args) == 0
    assert "improved" in capsys.readouterr().out


def _git(*args: str) -> None:
    """git in the current directory (a test's scratch repository), as a test user."""
    subprocess.run(["git", "-c", "user.email=a@b", "-c", "user.name=t", *args], check=True, capture_output=True)


def test_gate_against_the_committed_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _git("init", "-q")
    (tmp_path / "reports").mkdir()
    (tmp_path / "regression").mkdir()
    (tmp_path / "regression" / "tolerances.json").write_text(json.dumps({
        "fd": {"abs": 0.01}, "kid": {"abs": 0.01}, "heldout_loss": {"abs": 0.001}}))
    report = tmp_path / "reports" / "comparison.json"
    report.write_text(json.dumps(_comparison()))
    _git("add", "-A")
    _git("commit", "-qm", "blessed default")
    assert regress.main([]) == 0
    report.write_text(json.dumps(_comparison(merged_fd=6.0)))
    assert regress.main([]) == 1
    assert "reports/comparison.json at HEAD" in capsys.readouterr().out
    assert regress.main(["--rev", "no-such-rev"]) == 2
    assert "no 'reports/comparison.json' at git revision 'no-such-rev'" in capsys.readouterr().err


def test_gate_missing_reference_file(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps(_comparison()))
    assert regress.main(["--current", str(tmp_path / "c.json"), "--reference", str(tmp_path / "none.json")]) == 2
    assert "reference report" in capsys.readouterr().err


def test_tolerance_is_max_of_abs_and_rel():
    rows = regress.compare({"models.shared.fd": 5.5}, {"models.shared.fd": 5.4}, {"fd": {"abs": 0.01, "rel": 0.02}})
    assert rows[0].allowed == pytest.approx(0.108) and rows[0].status == "ok"


def test_seed_summary_means_stds_and_contrast_counts():
    rows = []
    for s, merged in enumerate((5.0, 5.2, 5.4)):
        c = _comparison(merged_fd=merged)
        c["contrasts"]["merged_minus_shared"]["fd_ci"] = [-0.5, -0.1] if s < 2 else [-0.1, 0.3]
        rows.append(seeds.seed_row(s, c, [f"run{s}"]))
    result = seeds.summarise(rows, {"num_ranges": 4, "sampler": "dpmsolver", "sampling_steps": 20})
    assert result["summary"]["merged"]["fd"]["mean"] == pytest.approx(5.2)
    assert result["summary"]["merged"]["fd"]["std"] == pytest.approx(0.2)
    ms = result["contrasts"]["merged_minus_shared"]
    assert ms["fd"]["mean"] == pytest.approx(-0.2) and ms["seeds_below_zero"] == 2 and ms["seeds_above_zero"] == 0
    assert result["ratios"]["merged_over_shared_fd"] == pytest.approx(5.2 / 5.4)
    per = result["per_seed"][1]
    assert per["seed"] == 1 and per["merged"]["fd"] == 5.2 and per["merged_minus_shared"]["fd_ci"] == [-0.5, -0.1]
    assert set(per) >= {"seed", "pretrained", "shared", "merged", "ensemble", "merged_minus_shared",
                        "ensemble_minus_shared", "merged_minus_pretrained"}
    text = seeds.render(result)
    assert "5.2000 ± 0.2000" in text and "| merged − shared | -0.2000 ± 0.2000 | 2 | 0 |" in text


def test_seed_settings_drop_the_last_seed_and_name_each_fine_tunes_learning_rate():
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["finetune"].update(lr=5e-5, shared_lr=None)
    settings = seeds.common_settings({"seed": 2, "num_ranges": 4}, params)
    assert settings == {"num_ranges": 4, "finetune_lr": 5e-5, "shared_lr": 5e-5}
    params["finetune"]["shared_lr"] = 2e-4
    assert seeds.common_settings({"seed": 0}, params)["shared_lr"] == 2e-4
    assert seeds.common_settings({"seed": 0, "sampling_steps": 50}, None) == {"sampling_steps": 50}


def test_set_arguments_are_yaml():
    assert set_args({"seed": 2, "partition.ranges": [0, 1], "finetune.weighting": "min_snr", "x": None}) == [
        "-S", "seed=2", "-S", "partition.ranges=[0, 1]", "-S", 'finetune.weighting="min_snr"', "-S", "x=null"]
    assert exps.parse_sets(["finetune.lr=1e-4", "partition.ranges=[0,1]"]) == {
        "finetune.lr": 1e-4, "partition.ranges": [0, 1]}


@pytest.mark.parametrize("tool", ["seeds", "sweep"])
def test_a_set_argument_without_a_value_is_refused_before_any_experiment(tool, monkeypatch, capsys):
    monkeypatch.setattr(exps, "_dvc", lambda *a, **kw: pytest.fail("dvc was called"))
    main, argv = (seeds.main, []) if tool == "seeds" else (sweep.main, ["finetune.lr", "1e-4"])
    assert main([*argv, "-S", "finetune.steps"]) == 2
    err = capsys.readouterr().err
    assert "'finetune.steps'" in err and "key=value" in err and "Traceback" not in err


def test_run_all_skips_finished_replaces_stale_and_never_forces(monkeypatch):
    calls, runs = [], []
    monkeypatch.setattr(exps, "_dvc", lambda *args, **kw: calls.append(args) or "")
    monkeypatch.setattr(exps, "experiment_refs", lambda: {"done": "refs/exps/x/done", "stale": "refs/exps/x/stale"})
    finished = {"done"}
    monkeypatch.setattr(exps, "experiment_file", lambda name, path=exps.REPORT: {} if name in finished else None)
    monkeypatch.setattr(exps, "_same_params", lambda name, overrides: True)

    def run(cmd, **kw):  # "new" fails, "stale" leaves its report
        name = cmd[cmd.index("-n") + 1]
        runs.append(cmd)
        if name == "stale":
            finished.add(name)
        return subprocess.CompletedProcess(cmd, 0 if name == "stale" else 1)

    monkeypatch.setattr(exps.subprocess, "run", run)
    with pytest.raises(exps.ExperimentError, match=r"\['new'\] failed"):  # "done" is skipped, "stale" succeeds
        exps.run_all({"done": {"seed": 0}, "stale": {"seed": 1}, "new": {"seed": 2}})
    assert ("exp", "remove", "refs/exps/x/stale") in calls and ("exp", "remove", "new") not in calls
    assert [c[c.index("-n") + 1] for c in runs] == ["stale", "new"]
    assert all(c[c.index("exp"):c.index("exp") + 3] == ["exp", "run", "--temp"] for c in runs)
    assert not any("-f" in c or "--force" in c for c in runs)  # forcing would bypass DVC's run-cache
    exps.run_all({"done": {"seed": 0}, "stale": {"seed": 1}})  # both finished: nothing runs, nothing fails
    assert len(runs) == 2


def test_experiments_get_an_absolute_python_when_it_was_found_through_a_relative_path():
    # PATH=.venv/bin:... makes sys.executable relative; experiments run in .dvc/tmp/exps/<dir>, where
    # a relative python is not found and the stages fell back to a python without torch
    venv_bin = Path(sys.executable).parent
    relative = os.path.relpath(venv_bin)
    env = {**os.environ, "PATH": os.pathsep.join([relative, os.environ.get("PATH", "")])}
    code = ("import os, sys; from tools import exps; "
            "print(sys.executable); print(exps.DVC[0]); print(os.environ['PATH'])")
    out = subprocess.run([Path(sys.executable).name, "-c", code], env=env,  # found through PATH, no slash
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert not os.path.isabs(out[0])  # the case this guards against: sys.executable came out relative
    assert os.path.isabs(out[1]) and Path(out[1]).parent == venv_bin
    assert out[2].split(os.pathsep)[0] == str(venv_bin)


def test_baselines_whose_pipeline_code_differs_are_named(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    _git("init", "-q")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "fit.py").write_text("a = 1\n")
    (tmp_path / "README.md").write_text("x\n")
    _git("add", "-A")
    _git("commit", "-qm", "one")
    _git("tag", "one")
    (tmp_path / "README.md").write_text("y\n")  # not pipeline code
    _git("commit", "-qam", "docs")
    _git("tag", "docs")
    (tmp_path / "stages" / "fit.py").write_text("a = 2\n")
    _git("commit", "-qam", "two")
    assert exps.pipeline_changes(["HEAD", "one", "docs", "no-such-rev"]) == {
        "one": ["stages/fit.py"], "docs": ["stages/fit.py"]}
    assert exps.pipeline_changes(["docs", "one"]) == {}
    monkeypatch.setattr(exps, "BASELINE", ["HEAD"])
    ap = argparse.ArgumentParser()
    exps.add_baseline_argument(ap)
    with caplog.at_level("WARNING", logger="dtm.exps"):
        ap.parse_args(["--baseline", "docs", "one"])
    assert not caplog.records and exps.BASELINE == ["docs", "one"]
    with caplog.at_level("WARNING", logger="dtm.exps"):
        ap.parse_args(["--baseline", "HEAD", "one"])
    assert "HEAD and one run different pipeline code (stages/fit.py)" in caplog.text


def test_experiments_of_several_commits_are_read_first_commit_first(monkeypatch):
    shas = {"new": "aa" + "1" * 38, "old": "bb" + "2" * 38}
    shas["HEAD"] = shas["new"]
    refs = {shas["new"]: ["x", "y"], shas["old"]: ["y", "z"]}

    def git(cmd, **kw):
        if cmd[1] == "rev-parse":
            return subprocess.CompletedProcess(cmd, 0, shas[cmd[2]] + "\n", "")
        prefix = cmd[-1]
        sha = prefix.split("/")[2] + prefix.split("/")[3]
        return subprocess.CompletedProcess(cmd, 0, "\n".join(prefix + n for n in refs[sha]), "")

    monkeypatch.setattr(exps.subprocess, "run", git)
    monkeypatch.setattr(exps, "BASELINE", ["new", "old"])
    exps._pinned.cache_clear()
    found = exps.experiment_refs()
    assert set(found) == {"x", "y", "z"} and shas["new"][2:] in found["y"]  # y from the first commit
    assert exps.experiment_commit("z") == shas["old"] and exps.experiment_commit("missing") is None
    # a commit made while the tool runs: the revs keep the commits they named, and HEAD's new experiments are read
    shas.update({"new": "cc" + "3" * 38, "HEAD": "cc" + "3" * 38})
    refs[shas["HEAD"]] = ["w"]
    found = exps.experiment_refs()
    assert set(found) == {"w", "x", "y", "z"} and "1" * 38 in found["y"]


def test_study_rows_keep_the_compute_and_seeds_the_issue_asks_for():
    total = 800
    rows = study.rows(total)
    names = {r.name for r in rows}
    assert {"shared", "shared-snr_plus_one", "shared-trunc_snr", "shared-min_snr", "shared-p2", "shared-projection",
            "deme-n2", "deme-n4", "deme-n8", "deme-n8-p", "deme-n8-p-consistency", "deme-n4-p",
            "deme-n4-p-consistency", "deme-n4-weights-authors", "deme-n4-weights-searched", "ensemble-n4",
            "ensemble-n8", "deme-n4-snr", "deme-n4-affinity", "deme-n4-weights-distill"} <= names
    for r in rows:  # N x steps is the same for every row: one shared baseline serves all
        n = len(r.overrides.get("partition.ranges", [0, 1, 2, 3]))
        assert n * r.overrides.get("finetune.steps", total // 4) == total, r.name
    seeds = {r.name: r.seeds for r in rows}
    assert seeds["shared"] == seeds["deme-n4"] == seeds["ensemble-n4"] == (0, 1, 2)
    # rows with the same overrides are one experiment per seed
    assert study.experiment_name(rows[0], 1, rows) == "study-default-s1"
    by_name = {r.name: r for r in rows}
    assert study.experiment_name(by_name["ensemble-n8"], 0, rows) == "study-deme-n8-s0"
    assert len(study.variants(rows)) == 25  # 16 for the paper's rows, 3 x 3 seeds beyond it
    assert len(study.variants([r for r in rows if not r.beyond])) == 16  # make study: the paper's rows only
    order = list(study.variants(rows))
    assert order.index("study-deme-n4-affinity-s0") < order.index("study-deme-n4-snr-s1")  # seed 0 of every row first
    assert by_name["deme-n4-affinity"].versus == "deme-n4" and by_name["deme-n4-affinity"].seeds == (0, 1, 2)


def test_study_select_adds_the_paired_row_and_cuts_to_the_seeds_asked_for():
    rows = study.rows(800)
    picked = study.select(rows, beyond=True, only=["deme-n4-snr"], seeds=[1, 2])
    assert [(r.name, r.seeds) for r in picked] == [("deme-n4-snr", (1, 2)), ("deme-n4", (1, 2))]
    assert list(study.variants(picked)) == ["study-deme-n4-snr-s1", "study-default-s1",
                                            "study-deme-n4-snr-s2", "study-default-s2"]
    one_seed_rows = {r.name for r in rows if r.seeds == (0,)}
    assert not one_seed_rows & {r.name for r in study.select(rows, seeds=[1])}  # rows without seed 1 drop out
    assert {r.name for r in study.select(rows)} == {r.name for r in rows if not r.beyond}


def test_study_refuses_seeds_no_row_has(capsys):
    assert study.main(["--seeds", "7", "--list"]) == 2
    assert "--seeds 7" in capsys.readouterr().err


def test_a_partition_row_is_paired_with_the_uniform_merged_model_of_each_seed(monkeypatch):
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(400, 4))
    feats, reports = {}, {}
    for seed in (0, 1, 2):
        for name, model, shift, loss in ((f"study-default-s{seed}", "shared", 0.3, 0.1),
                                         (f"study-default-s{seed}", "merged", 0.2, 0.1),
                                         (f"study-deme-n4-snr-s{seed}", "merged", 0.1 + 0.02 * seed, 0.09)):
            feats[(name, model)] = rng.normal(size=(300, 4)) + shift
            reports.setdefault(name, {"models": {}})["models"][model] = {"fd": shift, "kid": 0.0, "heldout_loss": loss}
    monkeypatch.setattr(study.exps, "experiment_file", lambda name, path=study.exps.REPORT: reports.get(name))
    monkeypatch.setattr(study, "_features", lambda name, model: feats[(name, model)])
    monkeypatch.setattr(study.exps, "experiment_commit", lambda name: "c0ffee")
    rows = study.rows(800)
    out = study.row_result(next(r for r in rows if r.name == "deme-n4-snr"), rows, reference, rounds=20, runs={})
    fd = study.distances.frechet_distance
    v = out["versus"]
    expected = [fd(feats[(f"study-deme-n4-snr-s{s}", "merged")], reference)
                - fd(feats[(f"study-default-s{s}", "merged")], reference) for s in (0, 1, 2)]
    assert v["row"] == "deme-n4" and [s["delta_fd"] for s in v["per_seed"]] == pytest.approx(expected)
    assert v["delta_fd"] == pytest.approx(np.mean(expected))
    assert v["delta_fd_ci"][0] < v["delta_fd"] < v["delta_fd_ci"][1]  # a t-interval over the three seeds
    assert v["delta_heldout_loss_pct"] == pytest.approx(-10.0)
    assert "## Paired against another row" in study.render(
        {"settings": {}, "total_steps": 800, "rows": [out]})
    # --partial: the compute line counts the experiments that ran, not the ones still missing
    text = study.render({"settings": {}, "total_steps": 800, "rows": [out], "experiment_minutes_total": 30.0,
                         "experiment_minutes": {"study-default-s0": 10.0, "study-deme-n4-snr-s0": 20.0,
                                                "study-default-s1": None}})
    assert "30 min of pipeline runs over 2 experiments" in text


def test_study_row_results_pair_each_seed_with_its_shared_baseline(monkeypatch):
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(400, 4))
    feats = {("study-default-s0", "shared"): rng.normal(size=(300, 4)) + 0.2,
             ("study-deme-n2-s0", "merged"): rng.normal(size=(300, 4)) + 0.1}
    reports = {"study-deme-n2-s0": {"models": {"merged": {"fd": 0.5, "kid": 0.01, "heldout_loss": 0.08}}},
               "study-default-s0": {"models": {"shared": {"fd": 0.4, "kid": 0.01, "heldout_loss": 0.1}}}}
    monkeypatch.setattr(study.exps, "experiment_file", lambda name, path=study.exps.REPORT: reports.get(name))
    monkeypatch.setattr(study, "_features", lambda name, model: feats[(name, model)])
    monkeypatch.setattr(study.exps, "experiment_commit", lambda name: "c0ffee")
    rows = study.rows(800)
    row = next(r for r in rows if r.name == "deme-n2")
    out = study.row_result(row, rows, reference, rounds=20, runs={"study-deme-n2-s0": ["run-a"]})
    fd = study.distances.frechet_distance
    assert out["delta_fd_vs_shared"] == pytest.approx(fd(feats[("study-deme-n2-s0", "merged")], reference)
                                                      - fd(feats[("study-default-s0", "shared")], reference))
    assert out["delta_fd_ci"][0] < out["delta_fd_vs_shared"] < out["delta_fd_ci"][1]
    assert out["mlflow_runs"] == ["run-a"] and out["seeds"] == [0] and out["fd_mean"] == 0.5
    shared_fd = fd(feats[("study-default-s0", "shared")], reference)
    assert out["delta_fd_pct_vs_shared"] == pytest.approx(100 * out["delta_fd_vs_shared"] / shared_fd)
    assert out["paper_delta_pct_vs_shared"] is None  # the paper has no N = 2 row
    assert out["delta_heldout_loss_pct_vs_shared"] == pytest.approx(-20.0)
    assert next(r for r in rows if r.name == "deme-n8").paper_fid == 3.87
    committed = study.results_rows({"settings": {"x": 1}, "rows": [out]})
    assert isinstance(committed, list) and {"name", "seeds", "fd_mean", "fd_std", "kid_mean", "delta_fd_vs_shared",
                                            "delta_fd_ci", "mlflow_runs", "commits"} <= set(committed[0])
    assert committed[0]["commits"] == ["c0ffee"]


def test_same_params_reads_both_sides_as_the_stages_do(monkeypatch, tmp_path):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    committed = yaml.safe_load((root / "params.yaml").read_text())
    committed["seed"] = 1
    committed["finetune"]["mixed_precision"] = False  # what DVC's -S rewrite of `"no"` reads back as
    monkeypatch.setattr(exps, "experiment_params", lambda name: committed)
    assert exps._same_params("x", {"seed": 1})
    assert not exps._same_params("x", {"seed": 2})


def test_an_experiment_restored_whole_from_the_run_cache_points_at_the_runs_with_its_params(monkeypatch, tmp_path):
    from mlflow.tracking import MlflowClient

    from dtm_core.config import parse_params
    from dtm_core.tracking import params_digest

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = yaml.safe_load((root / "params.yaml").read_text())
    client = MlflowClient(uri)
    exp_id = client.create_experiment(params["tracking"]["experiment_name"])
    digest = params_digest(parse_params(params, "params.yaml"))
    made = client.create_run(exp_id, run_name="seeds-0", tags={"dtm.kind": "pipeline", "dtm.params_digest": digest})
    client.set_terminated(made.info.run_id)
    client.create_run(exp_id, run_name="other", tags={"dtm.kind": "pipeline", "dtm.params_digest": "0" * 16})
    monkeypatch.setattr(exps, "experiment_params", lambda name: params)
    assert exps.mlflow_parent_runs(["study-default-s0"]) == {"study-default-s0": [made.info.run_id]}
    finished = client.get_run(made.info.run_id).info
    assert exps.mlflow_parent_minutes(["study-default-s0"])["study-default-s0"] == pytest.approx(
        (finished.end_time - finished.start_time) / 60000.0)
    # a run of the same name under an earlier default's params is not this experiment's
    client.create_run(exp_id, run_name="seeds-1", tags={"dtm.kind": "pipeline", "dtm.params_digest": "1" * 16})
    assert exps.mlflow_parent_runs(["seeds-1"]) == {"seeds-1": [made.info.run_id]}
    mine = client.create_run(exp_id, run_name="seeds-1", tags={"dtm.kind": "pipeline", "dtm.params_digest": digest})
    assert exps.mlflow_parent_runs(["seeds-1"]) == {"seeds-1": [mine.info.run_id]}


def _report(shift: float = 0.0, contrast_shift: float = 0.0) -> dict:
    models = {m: {"fd": 0.13 + shift, "kid": 0.001 + shift / 2, "heldout_loss": 0.082 + shift / 10}
              for m in ("pretrained", "shared", "merged")}
    return {"models": models, "contrasts": {"merged_minus_shared": {
        "fd": 0.007 + contrast_shift, "heldout_loss": {"delta": -0.00003 + contrast_shift / 10}}}}


def test_tolerances_are_twice_the_largest_shift_of_a_perturbed_run_per_key():
    assert tolerances.round_up(0.00123) == pytest.approx(0.0013)
    assert tolerances.round_up(0.0029) == pytest.approx(0.0029) and tolerances.round_up(0.0) == 0.0
    name = next(iter(tolerances.PERTURBATIONS))
    assert tolerances.run_label(Path(f"/tmp/w/{name}/reports/comparison.json")) == name
    assert tolerances.run_label(Path("/tmp/w/x/reports/comparison.json")) == "/tmp/w/x/reports/comparison.json"
    assert tolerances.round_up(0.00419) == 0.0042 and tolerances.round_up(0.2) == 0.2  # exact, as written
    old = {"fd": {"abs": 1.0}, "kid": {"abs": 1.0}, "heldout_loss": {"abs": 1.0},
           "contrasts.merged_minus_shared.fd": {"abs": 1.0}, "contrasts.merged_minus_shared.heldout_loss": {"abs": 1.0}}
    runs = {"avx2": _report(0.004, 0.0002), "one-thread": _report(-0.005, 0.003)}
    new, evidence = tolerances.derive(_report(), runs, old, factor=2.0, floor=1e-5)
    assert set(new) == set(old)
    assert new["fd"]["abs"] == pytest.approx(0.01)  # 2 x 0.005 (one-thread), every model moved alike
    assert new["kid"]["abs"] == pytest.approx(0.005)
    assert new["contrasts.merged_minus_shared.fd"]["abs"] == pytest.approx(0.006)  # its own key, not "fd"
    assert new["contrasts.merged_minus_shared.heldout_loss"]["abs"] == pytest.approx(0.0006)
    assert evidence["per_key"]["fd"]["run"] == "one-thread"
    assert evidence["per_run"]["avx2"]["models.merged.fd"] == pytest.approx(0.004)
    # a bit-exact perturbation still leaves a floor, never a zero tolerance
    same, _ = tolerances.derive(_report(), {"avx2": _report()}, old, floor=1e-5)
    assert all(v["abs"] == 1e-5 for v in same.values())
    # keep_looser: a key never tightens below the file it replaces, and the evidence says which kept theirs
    old["kid"] = {"abs": 0.001}
    kept, why = tolerances.derive(_report(), runs, old, factor=2.0, floor=1e-5, keep_looser=True)
    assert kept["fd"]["abs"] == 1.0 and kept["kid"]["abs"] == pytest.approx(0.005)
    assert why["per_key"]["fd"] == {**why["per_key"]["fd"], "derived": pytest.approx(0.01), "kept_previous": True}
    assert why["per_key"]["kid"]["kept_previous"] is False and why["keep_looser"] is True
    # a relative part is kept as it was (regress allows max(abs, rel x |reference|); a missing abs counts as 0)
    old["kid"] = {"rel": 0.5}
    kept, _ = tolerances.derive(_report(), runs, old, factor=2.0, floor=1e-5, keep_looser=True)
    assert kept["kid"] == {"abs": pytest.approx(0.005), "rel": 0.5}


def test_the_tolerances_command_writes_both_files_and_names_a_report_that_lacks_a_metric(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tolerances, "committed", lambda path, rev: _report())
    tol = tmp_path / "tolerances.json"
    tol.write_text(json.dumps({"fd": {"abs": 1}, "kid": {"abs": 1}, "heldout_loss": {"abs": 1},
                               "contrasts.merged_minus_shared.fd": {"abs": 1}}))
    run = tmp_path / "run.json"
    run.write_text(json.dumps(_report(0.002, 0.001)))
    evidence = tmp_path / "evidence.json"
    assert tolerances.main(["--current", str(run), "--tolerances", str(tol), "--evidence", str(evidence)]) == 0
    assert json.loads(tol.read_text())["fd"]["abs"] == pytest.approx(0.004)
    assert json.loads(evidence.read_text())["per_key"]["fd"]["run"] == str(run)
    broken = _report()
    del broken["models"]["merged"]["kid"]
    run.write_text(json.dumps(broken))
    assert tolerances.main(["--current", str(run), "--tolerances", str(tol), "--evidence", str(evidence)]) == 2
    assert "kid" in capsys.readouterr().err


def test_a_partial_study_reports_each_row_on_its_finished_seeds(monkeypatch):
    finished = {"study-default-s0", "study-default-s1", "study-deme-n4-snr-s0"}
    monkeypatch.setattr(study.exps, "experiment_file",
                        lambda name, path=study.exps.REPORT: {"models": {}} if name in finished else None)
    rows = [r for r in study.rows(800) if r.name in ("deme-n4", "deme-n4-snr", "deme-n4-affinity")]
    kept, missing = study.finished_seeds(rows)
    assert {r.name: r.seeds for r in kept} == {"deme-n4": (0, 1), "deme-n4-snr": (0,)}
    assert "study-deme-n4-affinity-s0" in missing and "study-default-s2" in missing
    assert "study-deme-n4-snr-s0" not in missing


def test_study_draws_each_models_bootstrap_once_while_its_features_stay_the_same(monkeypatch):
    rng = np.random.default_rng(1)
    feats = {(e, m): rng.normal(size=(120, 3)) for e, m in [("a", "merged"), ("b", "merged"), ("base", "shared")]}
    ref = rng.normal(size=(100, 3))
    monkeypatch.setattr(study, "_features", lambda name, model: feats[name, model])
    monkeypatch.setattr(study, "_MODELS", {})
    calls = []
    real = distances.bootstrap_replicates
    monkeypatch.setattr(distances, "bootstrap_replicates", lambda x, *a, **k: calls.append(x) or real(x, *a, **k))
    first = study._paired_fd(("a", "merged"), ("base", "shared"), ref, rounds=20, seed=3)
    second = study._paired_fd(("b", "merged"), ("base", "shared"), ref, rounds=20, seed=3)
    assert len(calls) == 3  # a, base, b: the shared baseline's bootstrap is reused by the second contrast
    fd = distances.frechet_distance
    assert first[2] == fd(feats["base", "shared"], ref)  # FD(b), and FD(a) - FD(b): the report's own contrast
    assert first[0] == fd(feats["a", "merged"], ref) - first[2]
    for name, (delta, ci, _) in zip(["a", "b"], [first, second]):  # paired: resampled with the same indices
        boot = real(feats[name, "merged"], ref, fd, 20, 3) - real(feats["base", "shared"], ref, fd, 20, 3)
        assert ci == list(distances.centred_percentile_ci(boot, delta))
    calls.clear()
    feats["base", "shared"] = feats["base", "shared"] + 0.5  # another experiment under the same name
    third = study._paired_fd(("a", "merged"), ("base", "shared"), ref, rounds=20, seed=3)
    assert len(calls) == 1 and third[0] != first[0]  # redrawn for the new features, a's reused
    study._paired_fd(("a", "merged"), ("base", "shared"), ref + 1.0, rounds=20, seed=3)
    assert len(calls) == 3  # another reference: both redrawn


def test_a_config_file_becomes_dotted_overrides_under_the_command_lines(tmp_path):
    over = config_overrides(Path(__file__).resolve().parents[1] / "configs" / "fashion.yaml")
    assert over["data.source"] == "idx" and over["model.block_out_channels"] == [32, 64, 128]
    assert over["controls.models"] == ["shared_consistency", "soup", "shared_scaled", "merged_scaled"]
    assert config_overrides(None) == {}
    with pytest.raises(ConfigError, match="configs/fashion.yaml"):
        config_overrides(tmp_path / "missing.yaml")


def _fashion_seed(merged=0.5, shared=1.0, pretrained=1.0, ms=(-0.2, -0.1), soup=(-0.2, -0.1), scaled=(-0.2, -0.1)):
    floor = 0.1
    models = {m: {"fd": f + floor, "fd_minus_floor": f, "kid": 0.0, "heldout_loss": 0.1}
              for m, f in (("merged", merged), ("shared", shared), ("pretrained", pretrained), ("ensemble", 1.0))}
    contrast = lambda ci: {"fd": sum(ci) / 2, "fd_ci": list(ci)}  # noqa: E731
    comparison = {"models": models, "floor": {"fd_at_n": floor, "n": 10},
                  "contrasts": {"merged_minus_shared": contrast(ms), "merged_minus_pretrained": contrast(ms)}}
    controls = {"metrics": {"soup": {"fd": 0.7}},
                "contrasts": {"merged_minus_soup": contrast(soup),
                              "merged_scaled_minus_shared_scaled": contrast(scaled)}}
    return seed_summary(0, comparison, controls)


def test_the_fashion_verdict_follows_the_preregistered_rules():
    assert decide([_fashion_seed()] * 3)["verdict"] == "reproduces"
    # a ratio above 0.85 in one seed is not a reproduction; a tie with the soup in two seeds is averaging
    assert decide([_fashion_seed(merged=0.9)] + [_fashion_seed()] * 2)["verdict"] != "reproduces"
    averaging = [_fashion_seed(soup=(-0.1, 0.1))] * 2 + [_fashion_seed()]
    assert decide(averaging)["verdict"] == "partial"
    # narrow intervals (half-width 0.02 <= 5% of 1.0) containing zero in 2 of 3 seeds refute
    null = [_fashion_seed(merged=1.0, ms=(-0.02, 0.02))] * 2 + [_fashion_seed()]
    assert decide(null)["verdict"] == "refutes"
    # the same signs with intervals too wide for the 5% rule decide nothing
    wide = [_fashion_seed(merged=1.0, ms=(-0.2, 0.2))] * 2 + [_fashion_seed()]
    result = decide(wide)
    assert result["verdict"] == "inconclusive" and result["half_widths"][0] == pytest.approx(0.2)
    assert decide([_fashion_seed()] * 2)["verdict"] == "pending"  # the rules need three seeds
    assert decide([_fashion_seed()] * 4)["verdict"] == "undefined"  # ... and were written for three


def test_the_fashion_headline_counts_the_seeds_and_says_when_refutation_is_out_of_reach():
    seeds = [_fashion_seed(merged=1.0, ms=(-0.2, 0.2), soup=(-0.1, 0.1))] * 2 + [_fashion_seed(ms=(-0.3, -0.1))]
    text = headline({"seeds": seeds, **decide(seeds)})
    assert "**inconclusive**" in text
    assert "ties in 2 of 3 seeds and is below zero in 1 of 3" in text and "merged ties the soup in 2 of 3" in text
    assert "no refutation is possible" in text  # half-widths 0.1-0.2 against a limit of 5% of 1.0
    narrow = [_fashion_seed(merged=1.0, ms=(-0.02, 0.02))] * 3
    # pending: what the missing seeds could still bring about
    assert reachable([_fashion_seed(ms=(-0.3, -0.1))]) == ["inconclusive", "partial", "reproduces"]  # too wide
    assert reachable([_fashion_seed(merged=1.0, ms=(-0.2, 0.2))]) == ["inconclusive"]  # a tie: no "every seed"
    assert reachable([_fashion_seed(merged=1.0, ms=(-0.02, 0.02))]) == ["inconclusive", "refutes"]
    assert reachable([_fashion_seed()] * 3) == ["reproduces"]  # all three have run: what they decided
    pending = [_fashion_seed(merged=1.0, ms=(-0.2, 0.2))]
    assert "Still possible by the rules once every seed has run: inconclusive." in headline(
        {"seeds": pending, **decide(pending)})
    assert "no refutation is possible" not in headline({"seeds": narrow, **decide(narrow)})
    # the soup's floor-subtracted FD uses the comparison's floor
    assert _fashion_seed()["models"]["soup"]["fd_minus_floor"] == pytest.approx(0.6)


def test_the_fashion_tables_show_every_model_contrast_and_the_verdict():
    seeds = [_fashion_seed(), _fashion_seed(soup=(-0.1, 0.1))]
    text = render({"seeds": seeds, **decide(seeds)})
    assert "| 0 | merged | 0.6000 | 0.5000 | – |" in text  # FD, FD - floor; no train FD given: a dash
    assert "| 0 | floor (real vs real, n=10) | 0.1000 |" in text
    assert "| 0 | merged − soup | +0.0000 [-0.1000, +0.1000] | not distinguishable |" in text
    assert "| 0 | merged − shared | -0.1500 [-0.2000, -0.1000] | lower |" in text
    assert "Verdict: **pending** (2 of the 3 verdict seeds have run)." in text
    assert "| 0 | – | – | – | – |" in text  # a seed without analyses: dashes
    analysed = {**seeds[0], "seed": 1, "task_vectors": {"norms": [2.5, 3.0], "cosine": [[1.0, 0.25], [0.25, 1.0]]},
                "analysis": {"gradient_conflict": {m: {"mean_cosine_between_bins": c} for m, c in
                                                   (("pretrained", 0.5), ("merged", 0.25))},
                             "loss_along_tau": {"lambdas": [0.0, 1.0], "sources": {
                                 "range-0": {"all_t": [0.04, 0.039], "own_range": [0.1, 0.11]},
                                 "shared": {"all_t": [0.04, 0.041]}}}}}
    assert ("| 1 | 2.500, 3.000 | 0.250 | 0.500 → 0.250 | range-0 -2.50% (+10.00%); shared +2.50% |"
            in render({"seeds": [analysed], **decide([analysed])}))


def test_the_fashion_figures_draw_the_loss_along_tau_and_copy_what_the_seed_drew(tmp_path, monkeypatch):
    from PIL import Image

    drawn = {"analysis/gradient_conflict_merged.png": b"conflict", "task_vectors/tv_norms.png": b"norms"}

    def read(name, path):
        if path not in drawn:  # the pretrained model's conflict and the cosines: not drawn in this experiment
            raise exps.ExperimentError(f"no {path}")
        return drawn[path]

    monkeypatch.setattr(fashion.exps, "experiment_bytes", read)
    summary = {"loss_along_tau": {"lambdas": [0.0, 1.0], "sources": {
        "range-0": {"all_t": [0.04, 0.039], "own_range": [0.1, 0.09]}, "shared": {"all_t": [0.04, 0.0395]}}}}
    written = fashion.write_figures(0, "seeds-0-fashion", summary, tmp_path)
    assert written == ["seed-0-loss_along_tau.png", "seed-0-gradient_conflict_merged.png", "seed-0-tv_norms.png"]
    assert Image.open(tmp_path / written[0]).format == "PNG"
    assert (tmp_path / "seed-0-tv_norms.png").read_bytes() == b"norms"
    assert fashion.write_figures(1, "seeds-1-fashion", {}, tmp_path) == ["seed-1-gradient_conflict_merged.png",
                                                                       "seed-1-tv_norms.png"]


def test_a_sweep_on_a_configuration_names_its_experiments_apart_and_lets_set_win(tmp_path, monkeypatch):
    config = tmp_path / "fashion.yaml"
    config.write_text("data:\n  source: idx\nevaluate:\n  reference: test\n  num_samples: 10000\n")
    ran = {}
    monkeypatch.setattr(sweep.exps, "run_all", lambda variants, **kw: ran.update(variants))
    model = {"fd": 1.0, "kid": 0.0, "heldout_loss": 0.1, "memorised_fraction": 0.05}
    contrast = {"fd": 0.0, "fd_ci": [-1.0, 1.0], "heldout_loss": {"delta": 0.0}}
    fd = {"sweep-fashion-finetune-lr-5e-05": 2.0, "sweep-fashion-finetune-lr-0.0001": 1.0}
    monkeypatch.setattr(sweep.exps, "experiment_file", lambda name, path=None: {
        "models": {m: {**model, "fd": fd[name]} for m in ("pretrained", *sweep.METHODS)},
        "contrasts": {"merged_minus_shared": contrast}})
    monkeypatch.setattr(sweep.exps, "mlflow_parent_runs", lambda names: {n: [] for n in names})
    assert sweep.main(["finetune.lr", "5e-5", "1e-4", "--config", str(config), "--label", "fashion",
                       "-S", "evaluate.reference=validation", "-S", "evaluate.seed=1", "--out", str(tmp_path)]) == 0
    assert set(ran) == set(fd)
    for value, overrides in zip([5e-5, 1e-4], ran.values()):
        assert overrides == {"data.source": "idx", "evaluate.reference": "validation", "evaluate.num_samples": 10000,
                             "evaluate.seed": 1, "finetune.lr": value}
    result = json.loads((tmp_path / "sweep-fashion-finetune-lr.json").read_text())
    assert result["best_by_fd"] == {m: 1e-4 for m in sweep.METHODS}


@pytest.mark.parametrize("sets, named", [
    (["evaluate.reference=validation"], "evaluate.seed=1"),  # the headline's test noise
    (["evaluate.seed=1"], "evaluate.reference=validation"),  # the test images, on a source that has them
])
def test_a_sweep_that_would_choose_on_the_test_noise_or_images_is_refused(sets, named, tmp_path, monkeypatch,
                                                                          capsys):
    config = tmp_path / "fashion.yaml"
    config.write_text("data:\n  source: idx\n")
    monkeypatch.setattr(sweep.exps, "run_all", lambda variants, **kw: pytest.fail("a variant ran"))
    argv = ["finetune.lr", "1e-4", "--config", str(config), "--out", str(tmp_path)]
    assert sweep.main([*argv, *(a for s in sets for a in ("-S", s))]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


def test_the_pilot_sizes_the_sample_count_from_the_half_width_alone():
    def pilot(ci, f_shared=0.2):
        return {"settings": {"num_samples": 1000, "noise_seeds": 1},
                "models": {"shared": {"fd_minus_floor": f_shared}},
                "contrasts": {"merged_minus_shared": {"fd_ci": ci}}}

    # half-width 0.02 against a limit of 0.01 (5% of 0.2): four times the samples
    assert pilot_size(pilot([-0.05, -0.01]))["num_samples"] == 4000
    # the sign and the centre of the interval do not enter
    assert pilot_size(pilot([0.03, 0.07]))["num_samples"] == 4000
    # already narrow enough: fewer samples, rounded up to a thousand
    assert pilot_size(pilot([-0.005, 0.005]))["num_samples"] == 1000
    # two noise seeds pool 2,000 samples: 8,000 needed in all, 4,000 per seed (evaluate.num_samples)
    two = pilot([-0.05, -0.01])
    two["settings"]["noise_seeds"] = 2
    assert pilot_size(two)["num_samples"] == 4000
    # beyond the cap the seeds run at the cap, and the result says the refutation's precision is out of reach
    wide = pilot_size(pilot([-0.2, 0.0]))
    assert (wide["needed_num_samples"], wide["num_samples"], wide["capped"]) == (100000, fashion.MAX_SAMPLES, True)
    assert not pilot_size(pilot([-0.05, -0.01]))["capped"]
    with pytest.raises(exps.ExperimentError, match="floor-subtracted"):
        pilot_size(pilot([-0.01, 0.01], f_shared=-0.001))


@pytest.mark.parametrize("b_settings, named", [
    ({"evaluate_seed": 1}, "evaluate_seed"),  # other noise: not paired
    ({"reference_name": "validation"}, "reference_name"),  # scored against another split
    ({"evaluate_seed": None}, "made before the evaluation recorded it"),  # a report older than the key
])
def test_a_contrast_across_runs_not_sampled_and_scored_alike_is_refused(b_settings, named, monkeypatch):
    settings = {"num_samples": 80, "noise_seeds": 1, "evaluate_seed": 0, "sampler": "dpmsolver",
                "reference": "test", "reference_name": "test"}
    sides = {"a:merged": {**settings}, "b:merged": {k: v for k, v in {**settings, **b_settings}.items()
                                                    if v is not None}}
    monkeypatch.setattr(contrast, "side", lambda spec: (*spec.split(":"), {}, {"settings": sides[spec]}))
    monkeypatch.setattr(contrast, "load_reference", lambda: pytest.fail("scored although not alike"))
    with pytest.raises(exps.ExperimentError, match=named):
        contrast.contrast("a:merged", "b:merged")


def test_a_contrast_against_another_reference_than_the_workspaces_is_refused(monkeypatch):
    settings = {"num_samples": 80, "reference": "test", "reference_name": "validation"}
    monkeypatch.setattr(contrast, "side", lambda spec: (*spec.split(":"), {}, {"settings": settings}))
    monkeypatch.setattr(contrast, "load_reference", lambda: {"test": None, "test_name": np.asarray("test")})
    with pytest.raises(exps.ExperimentError, match="validation split, the workspace's reference is the test split"):
        contrast.contrast("a:merged", "b:shared")


def test_every_swept_value_is_checked_not_only_the_fixed_settings(tmp_path, monkeypatch, capsys):
    config = tmp_path / "fashion.yaml"
    config.write_text("data:\n  source: idx\n")
    monkeypatch.setattr(sweep.exps, "run_all", lambda variants, **kw: pytest.fail("a variant ran"))
    argv = ["evaluate.reference", "validation", "test", "--config", str(config), "-S", "evaluate.seed=1"]
    assert sweep.main([*argv, "--out", str(tmp_path)]) == 2
    assert "sweep-evaluate-reference-test" in capsys.readouterr().err
