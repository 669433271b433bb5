"""End to end: `dvc repro` on the tiny profile in a temporary copy of the repo."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tiny_params import tiny_params

ROOT = Path(__file__).resolve().parents[1]
COPY = ["dtm_core", "stages", "dvc.yaml", "params.yaml", "pyproject.toml", ".dvcignore", ".gitignore"]
EXPECTED_CHILDREN = {
    "prepare", "classifier", "pretrain", "partition", "finetune-range-0", "finetune-range-1",
    "finetune-shared", "task-vectors", "merge", "evaluate-pretrained", "evaluate-shared",
    "evaluate-merged", "evaluate-ensemble", "report",
}


def _run(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def make_project(dest: Path, overrides=None) -> dict:
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    shutil.copytree(ROOT / ".dvc", dest / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    params = tiny_params(yaml.safe_load((ROOT / "params.yaml").read_text()))
    for section, values in (overrides or {}).items():
        params[section] = {**params[section], **values}
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DTM_PARENT_RUN_ID", None)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        _run(cmd, dest, env)
    return env


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def runs_by_parent(root: Path):
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("decouple-then-merge")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("dtm.kind") == "pipeline"]
    children = {p.info.run_id: {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id}
                for p in parents}
    return parents, children


@pytest.mark.slow
def test_dvc_repro_end_to_end(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    env = make_project(proj)
    out = _run(["dvc", "repro"], proj, env)

    # every out exists where users and scripts expect it
    for path in ["data/prepared/train.npz", "models/classifier", "models/pretrained", "models/range-0",
                 "models/range-1", "models/shared", "models/merged", "task_vectors/range-1.safetensors",
                 "partition/ranges.json", "reports/comparison.md", "samples/ensemble.png",
                 "plots/task_vector_norms.tsv", "metrics/finetune/range-0.json", "task_vectors/tv_cosine.png",
                 "task_vectors/tv_layer_heatmap.png", "merge/weights.json", "samples/merged.npz"]:
        assert (proj / path).exists(), path
    from diffusers import UNet2DModel

    for name in ("pretrained", "shared"):
        assert type(UNet2DModel.from_pretrained(proj / "models" / name)) is UNet2DModel
    report = json.loads((proj / "reports/comparison.json").read_text())
    for name in ("pretrained", "shared", "merged", "ensemble"):
        assert report[name]["fd"] > 0 and "kid" in report[name]
    assert report["shared"]["fd_vs_shared"] == 0
    assert report["floor"]["fd"] < report["pretrained"]["fd"]

    parents, children = runs_by_parent(proj)
    assert len(parents) == 1
    assert set(children[parents[0].info.run_id]) == EXPECTED_CHILDREN
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["merged/fd"] == pytest.approx(report["merged"]["fd"])
    assert report["mlflow"]["parent_run_id"] == parents[0].info.run_id
    assert not [p for p in proj.rglob("*.tmp-*")]

    # a second repro does nothing and logs nothing
    again = _run(["dvc", "repro"], proj, env)
    assert stages_run(again) == set()
    assert len(runs_by_parent(proj)[0]) == 1

    # code deps are per stage: an edit invalidates the stages that run that file, not training
    for edited, invalidated in (
        ("dtm_core/steps/report.py", {"report"}),
        ("dtm_core/metrics.py", {"classifier", "merge", "evaluate@pretrained", "evaluate@shared",
                                 "evaluate@merged", "evaluate@ensemble", "report"}),
    ):
        code = proj / edited
        original = code.read_text()
        code.write_text(original + "\n# an edit\n")
        status = subprocess.run(["dvc", "status", "--json"], cwd=proj, env=env, capture_output=True, text=True)
        code.write_text(original)
        assert set(json.loads(status.stdout)) == invalidated, (edited, status.stdout)
    assert stages_run(_run(["dvc", "repro"], proj, env)) == set()

    # a variant re-runs only what p affects
    _run(["git", "add", "-A"], proj, env)
    _run(["git", "commit", "-qm", "baseline run"], proj, env)
    variant = _run(["dvc", "exp", "run", "-S", "finetune.p=0.5"], proj, env)
    assert stages_run(variant) == {
        "finetune@0", "finetune@1", "task_vectors", "merge", "evaluate@merged", "evaluate@ensemble", "report",
    }
    parents, children = runs_by_parent(proj)
    assert len(parents) == 2
    newest = max(parents, key=lambda r: r.info.start_time)
    assert set(children[newest.info.run_id]) == {
        "finetune-range-0", "finetune-range-1", "task-vectors", "merge", "evaluate-merged",
        "evaluate-ensemble", "report",
    }
    # the report fills the new parent's summary, cached stages' numbers included
    assert "pretrained/fd" in newest.data.metrics and "shared/fd" in newest.data.metrics

    # another merge method and a weight search, queued and run in parallel by
    # `dvc queue start -j 2`: each re-runs only merge onward, both log to the
    # one store at the repo root, each under its own parent
    _run(["dvc", "exp", "run", "--queue", "-n", "ties", "-S", "merge.method=ties"], proj, env)
    _run(["dvc", "exp", "run", "--queue", "-n", "search", "-S", "merge.search.strategy=coordinate",
          "-S", "merge.search.max_evaluations=3", "-S", "merge.search.num_samples=40",
          "-S", "merge.search.ddim_steps=3"], proj, env)
    # the workers outlive `dvc queue start`: give them no pipe of ours to hold open
    subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=proj, env=env, check=True, timeout=120,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    while True:
        status = _run(["dvc", "queue", "status"], proj, env)
        if not re.search(r"Queued|Running", status):
            break
        assert time.time() < deadline, status
        time.sleep(5)
    subprocess.run(["dvc", "queue", "stop"], cwd=proj, env=env, timeout=120,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert status.count("Success") == 2, status
    for name in ("ties", "search"):
        assert stages_run(_run(["dvc", "queue", "logs", name], proj, env)) == {"merge", "evaluate@merged", "report"}
    parents, children = runs_by_parent(proj)
    by_name = {p.info.run_name: p for p in parents}
    for name in ("ties", "search"):
        assert set(children[by_name[name].info.run_id]) == {"merge", "evaluate-merged", "report"}
        assert by_name[name].info.status == "FINISHED"
    assert not list(proj.glob(".dvc/tmp/exps/**/mlflow.db"))

    _run(["dvc", "exp", "apply", "search"], proj, env)
    rows = (proj / "merge" / "search.tsv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3
    merge_metrics = json.loads((proj / "metrics" / "merge.json").read_text())
    assert merge_metrics["search"]["evaluations"] == 3
    assert json.loads((proj / "models" / "merged" / "dtm_info.json").read_text())["weights"] == \
        merge_metrics["search"]["best_weights"]
    report = json.loads((proj / "reports" / "comparison.json").read_text())
    assert report["merge"]["search"]["strategy"] == "coordinate"
    assert report["merged"]["fd_ci"][0] <= report["merged"]["fd"] <= report["merged"]["fd_ci"][1]
    assert report["merged"]["vs_shared"]["verdict"] in ("better", "worse", "not distinguishable")
    md = (proj / "reports" / "comparison.md").read_text()
    assert "Weight search (coordinate, 3 candidates" in md and "tv_cosine.png" in md
