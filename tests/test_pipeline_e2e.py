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
from stagehelp import PIPELINE
from tiny_params import tiny_params

from dtm_core.io import dir_digest

ROOT = Path(__file__).resolve().parents[1]
COPY = ["dtm_core", "stages", "base", "dvc.yaml", "params.yaml", "pyproject.toml", ".dvcignore", ".gitignore"]
EXPECTED_CHILDREN = {stage if not args else f"{stage}@{args[1]}" for stage, args in PIPELINE}


def _run(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def make_project(dest: Path, overrides=None) -> dict:
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.state"))
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
    children = {p.info.run_id: {r.info.run_name: r for r in runs
                                if r.data.tags.get("mlflow.parentRunId") == p.info.run_id} for p in parents}
    return parents, children


def _status(proj, env) -> set[str]:
    status = subprocess.run(["dvc", "status", "--json"], cwd=proj, env=env, capture_output=True, text=True)
    return set(json.loads(status.stdout))


def _git_dirty(proj, env) -> list[str]:
    return [line for line in _run(["git", "status", "--porcelain"], proj, env).splitlines() if line.strip()]


@pytest.mark.slow(minutes=9)
def test_dvc_repro_end_to_end_then_experiments(tmp_path):
    """One `dvc repro` of the tiny profile, committed, serves every end-to-end assertion: the run itself, the
    re-run that does nothing, the code and params deps, a fresh clone's metrics, then DVC experiments on it."""
    proj = tmp_path / "proj"
    proj.mkdir()
    env = make_project(proj)
    out = _run(["dvc", "repro"], proj, env)
    parent_id = runs_by_parent(proj)[0][0].info.run_id
    _run(["git", "add", "-A"], proj, env)
    _run(["git", "commit", "-qm", "baseline run"], proj, env)
    assert stages_run(out) == EXPECTED_CHILDREN

    # every out exists where users and scripts expect it
    for path in ["data/prepared/train.npz", "models/classifier", "models/pretrained", "models/ranges/range-0",
                 "models/ranges/range-1", "models/shared", "models/merged", "task_vectors/range-1.safetensors",
                 "partition/ranges.json", "reports/comparison.md", "samples/ensemble.png", "evaluation/merged.json",
                 "plots/task_vector_norms.tsv", "plots/heldout_loss.tsv", "task_vectors/tv_cosine.png",
                 "reports/figures/heldout_loss.png", "merge/weights.json", "samples/merged.npz",
                 "metrics/comparison.json"]:
        assert (proj / path).exists(), path
    from diffusers import UNet2DModel

    for name in ("pretrained", "shared"):
        assert type(UNet2DModel.from_pretrained(proj / "models" / name)) is UNet2DModel
    report = json.loads((proj / "reports/comparison.json").read_text())
    for name in ("pretrained", "shared", "merged", "ensemble"):
        m = report["models"][name]
        # the memorised fraction counts samples: a multiple of 1 / num_samples (80 in the tiny profile)
        assert (80 * m["memorised_fraction"]).is_integer()
        assert m["fd_ci"][0] <= m["fd"] <= m["fd_ci"][1] and m["kid_ci"][0] <= m["kid"] <= m["kid_ci"][1]
        assert json.loads((proj / "metrics" / f"{name}.json").read_text())["fd"] == m["fd"]
        # 80 samples, fewer than the 359 held-out images of the floor: no FD at the floor's n, a dash in the table
        assert m["fd_at_floor_n"] is None
    c = report["contrasts"]["merged_minus_shared"]
    assert c["fd"] == pytest.approx(report["models"]["merged"]["fd"] - report["models"]["shared"]["fd"])
    assert c["fd_ci"][0] <= c["fd"] <= c["fd_ci"][1]
    assert len(c["heldout_loss_by_range"]) == 2 and len(report["range_models"]) == 2
    assert report["floor"]["fd"] < report["models"]["pretrained"]["fd"]
    assert "– where a run has fewer samples than that" in (proj / "reports/comparison.md").read_text()

    # MLflow: one parent, one child per stage, each child logging exactly the params its stage declares
    parents, children = runs_by_parent(proj)
    parents = [p for p in parents if p.info.run_id == parent_id]
    kids = children[parent_id]
    assert set(kids) == EXPECTED_CHILDREN
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["merged/fd"] == pytest.approx(report["models"]["merged"]["fd"])
    assert "DeMe comparison" in parents[0].data.tags["mlflow.note.content"]
    from dtm_core.config import load_params, select
    from stages.common import STAGES

    params = load_params(proj / "params.yaml")
    for name, run in kids.items():
        declared = select(params, STAGES[name.split("@")[0]].params)
        assert set(run.data.params) == set(declared), name
        assert "stage_seconds" in run.data.metrics
    assert not [p for p in proj.rglob("*.tmp-*")]

    # MLflow as its users look at it: logged models with linked metrics, the data version as dataset input,
    # the source columns, the merged model registered, the comparison as the parent's description
    client = MlflowClient(f"sqlite:///{proj / 'mlflow.db'}")
    exp_id = parents[0].info.experiment_id
    logged = {m.name: m for m in client.search_logged_models([exp_id])}
    assert {"pretrained", "shared", "merged", "ensemble", "range-0", "range-1"} <= set(logged)
    merged_model = logged["merged"]
    linked = {m.key: m.value for m in merged_model.metrics}
    assert linked["fd"] == pytest.approx(report["models"]["merged"]["fd"]) and "heldout_loss" in linked
    assert merged_model.tags["dvc.path"] == "models/merged" and merged_model.tags["dtm.content_digest"]
    assert {m.key for m in logged["range-1"].metrics} == {"heldout_loss", "heldout_loss_own_range"}
    versions = client.search_model_versions("name='deme-merged'")
    # the sqlite store keeps the link as the version source (its model_id column stays empty in MLflow 3.x)
    assert len(versions) == 1 and versions[0].source == f"models:/{merged_model.model_id}"
    assert versions[0].tags["params_digest"] == parents[0].data.tags["dtm.params_digest"]
    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    data_md5 = lock["stages"]["prepare"]["outs"][0]["md5"]
    for run_id in (parents[0].info.run_id, kids["finetune_shared"].info.run_id, kids["evaluate@merged"].info.run_id):
        inputs = client.get_run(run_id).inputs.dataset_inputs
        assert [d.dataset.digest for d in inputs] == [data_md5[:36]], run_id
    assert kids["evaluate@merged"].data.tags["mlflow.source.name"] == "stages/evaluate.py"

    # a second repro does nothing and logs nothing
    before = len(runs_by_parent(proj)[0])
    again = _run(["dvc", "repro"], proj, env)
    assert stages_run(again) == set()
    assert len(runs_by_parent(proj)[0]) == before

    # code deps are per stage: an edit invalidates the stages that run that file, not training
    for edited, invalidated in (
        ("stages/report.py", {"report"}),
        ("dtm_core/distances.py", {"classifier", "merge_weights", "evaluate@pretrained", "evaluate@shared",
                                   "evaluate@merged", "evaluate@ensemble", "controls", "report"}),
    ):
        code = proj / edited
        original = code.read_text()
        code.write_text(original + "\n# an edit\n")
        status = _status(proj, env)
        code.write_text(original)
        assert status == invalidated, (edited, status)
    assert stages_run(_run(["dvc", "repro"], proj, env)) == set()
    # params deps are per stage: another partition method invalidates the partition stage and nothing upstream
    # of it; another p invalidates the range fine-tunes and the controls (trained with the fine-tunes' recipe),
    # not the shared fine-tune
    params_file = proj / "params.yaml"
    original = params_file.read_text()
    for edit, invalidated in ((("method: uniform", "method: snr"), {"partition"}),
                              (("p: 0.3", "p: 0.5"), {"finetune@0", "finetune@1", "controls"})):
        assert original.count(edit[0]) == 1, edit
        params_file.write_text(original.replace(*edit))
        status = _status(proj, env)
        params_file.write_text(original)
        assert status == invalidated, (edit, status)

    # DVC's conventions: dvc.lock and the cache: false files are committed (nothing left dirty), and a fresh
    # clone shows the committed metrics before any run. (That a re-run rewrites the committed files byte for
    # byte is tests/test_resume_determinism.py's: same params and seed, identical outputs.)
    assert _git_dirty(proj, env) == []
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(proj), str(clone)], tmp_path, env)
    shown = subprocess.run(["dvc", "metrics", "show", "--json"], cwd=clone, env=env, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    committed = json.loads(shown.stdout)
    assert "metrics/merged.json" in json.dumps(committed) and "metrics/comparison.json" in json.dumps(committed)

    experiments_rerun_only_what_they_change_and_queue_in_parallel(proj, env)


def experiments_rerun_only_what_they_change_and_queue_in_parallel(proj: Path, env: dict) -> None:

    # another merge method and a weight search, queued and run in parallel by
    # `dvc queue start -j 2`: each re-runs only the weights onward, both log to the
    # one store at the repo root, each under its own parent
    _run(["dvc", "exp", "run", "--queue", "-n", "ties", "-S", "merge.method=ties"], proj, env)
    _run(["dvc", "exp", "run", "--queue", "-n", "search", "-S", "merge.search.strategy=coordinate",
          "-S", "merge.search.max_evaluations=3", "-S", "merge.search.num_samples=40",
          "-S", "merge.search.sampling_steps=3"], proj, env)
    # the workers outlive `dvc queue start`: give them no pipe of ours to hold open
    subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=proj, env=env, check=True, timeout=120,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    while True:
        status = _run(["dvc", "queue", "status"], proj, env)
        if not re.search(r"Queued|Running", status):
            break
        assert time.time() < deadline, status
        time.sleep(15)  # each `dvc queue status` is a DVC process: a core for ~2 s, taken from the workers
    subprocess.run(["dvc", "queue", "stop"], cwd=proj, env=env, timeout=120,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert status.count("Success") == 2, status
    # evaluate@merged is skipped when the merged model comes out unchanged (a search may keep the start)
    needed = {"merge_weights", "merge", "controls", "report"}
    possible = {"merge_weights", "merge", "evaluate@merged", "controls", "analysis", "report"}
    parents, children = runs_by_parent(proj)
    by_name = {p.info.run_name: p for p in parents}
    for name in ("ties", "search"):
        log = _run(["dvc", "queue", "logs", name], proj, env)
        ran = stages_run(log)
        assert needed <= ran <= possible, (name, ran, log[-3000:])
        assert set(children[by_name[name].info.run_id]) == ran
        assert by_name[name].info.status == "FINISHED"
        # the report fills the experiment's parent summary, the cached stages' numbers included
        assert {"pretrained/fd", "shared/fd", "merged/fd"} <= set(by_name[name].data.metrics)
    ties_log = _run(["dvc", "queue", "logs", "ties"], proj, env)
    assert "evaluate@merged" in stages_run(ties_log), ties_log[-3000:]
    assert not list(proj.glob(".dvc/tmp/exps/**/mlflow.db"))

    # tools read an experiment's files, git-tracked or inside a DVC-cached out, as the experiment left them
    read = [sys.executable, "-c", "import json, sys; from tools import exps; "
            "print(json.dumps([exps.experiment_file('ties', p) for p in sys.argv[1:]]))",
            "evaluation/merged.json", "metrics/merged.json", "evaluation/no-such.json", "reports/comparison.json"]
    tool_env = {**env, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(read, cwd=proj, env=tool_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cached, tracked, missing, ties_report = json.loads(proc.stdout.strip().splitlines()[-1])
    # a contrast across runs computed by tools.contrast is the report's own contrast when both sides are one run's
    proc = subprocess.run([sys.executable, "-m", "tools.contrast", "ties:merged", "ties:shared"], cwd=proj,
                          env=tool_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    across = json.loads(proc.stdout[proc.stdout.index("{"):])
    within = ties_report["contrasts"]["merged_minus_shared"]
    assert across["fd"] == pytest.approx(within["fd"], abs=1e-12) and across["fd_ci"] == within["fd_ci"]
    assert across["heldout_loss_ci"] == within["heldout_loss"]["ci"]
    _run(["dvc", "exp", "apply", "ties"], proj, env)
    assert cached == json.loads((proj / "evaluation" / "merged.json").read_text())
    assert tracked == json.loads((proj / "metrics" / "merged.json").read_text()) and missing is None
    _run(["dvc", "exp", "apply", "search"], proj, env)
    rows = (proj / "merge" / "search" / "search.tsv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3
    weights = json.loads((proj / "merge" / "weights.json").read_text())
    assert weights["search"]["evaluations"] == 3 and weights["search"]["strategy"] == "coordinate"
    report = json.loads((proj / "reports" / "comparison.json").read_text())
    assert report["merge"]["weights"] == weights["weights"]
    md = (proj / "reports" / "comparison.md").read_text()
    assert "The search scored 3 candidates" in md and "tv_cosine.png" in md


@pytest.mark.slow(minutes=2)
def test_parallel_ranges_runs_the_finetunes_at_once_and_records_them(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copytree(ROOT / "tools", proj / "tools", ignore=shutil.ignore_patterns("__pycache__"))
    env = make_project(proj)
    out = _run([sys.executable, "-m", "tools.parallel_ranges", "-j", "2", "--threads", "1", "--no-rest"], proj, env)
    assert '"ranges": 2' in out and '"threads_each": 1' in out
    # dvc commit recorded both fine-tunes: DVC sees them as run, and the rest of the pipeline as to do
    stale = _status(proj, env)
    assert not stale & {"finetune@0", "finetune@1"} and {"task_vectors", "report"} <= stale

    # the fine-tunes run at once, a thread each, equal the same fine-tunes run one after the other
    seq = tmp_path / "seq"
    shutil.copytree(proj, seq, ignore=shutil.ignore_patterns(".git", ".dvc", "mlflow.db", "ranges"))
    for i in (0, 1):
        _run([sys.executable, "-m", "stages.finetune", "--range", str(i)], seq,
             {**env, "DTM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{seq}/mlflow.db"})
    for i in (0, 1):
        d = f"models/ranges/range-{i}"
        assert dir_digest(seq / d) == dir_digest(proj / d), d

    # the first stage downstream of both runs; they do not re-run (the rest of the pipeline is left to do)
    rest = stages_run(_run(["dvc", "repro", "task_vectors"], proj, env))
    assert "task_vectors" in rest and not rest & {"prepare", "pretrain", "partition", "finetune@0", "finetune@1"}
    assert not _status(proj, env) & {"finetune@0", "finetune@1", "task_vectors"}
