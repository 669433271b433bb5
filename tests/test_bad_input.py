"""Bad input: each case stops its stage with exit status 2 and a message that
names the offending key or file, leaves no out (not even a half-written one)
and no MLflow run in RUNNING state."""

import math
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from stagehelp import new_project, run_stage, set_param, write_params

@pytest.fixture(scope="module")
def base_project(tmp_path_factory):
    """prepare + partition + pretrain + one range fine-tune on the tiny profile."""
    proj = tmp_path_factory.mktemp("bad") / "proj"
    params = new_project(proj)
    mp = pytest.MonkeyPatch()
    mp.chdir(proj)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{proj / 'mlflow.db'}")
    for stage, args in (("prepare", ()), ("partition", ()), ("pretrain", ()), ("finetune", ("--range", "0"))):
        assert run_stage(stage, *args) == 0, stage
    mp.undo()
    return proj, params


@pytest.fixture
def project(base_project, tmp_path, monkeypatch):
    src, params = base_project
    proj = tmp_path / "proj"
    shutil.copytree(src, proj)
    (proj / "mlflow.db").unlink()
    monkeypatch.chdir(proj)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{proj / 'mlflow.db'}")
    monkeypatch.delenv("DTM_PARENT_RUN_ID", raising=False)
    return proj, {k: (dict(v) if isinstance(v, dict) else v) for k, v in params.items()}


def expect_failure(proj: Path, capsys, stage: str, args=(), must_mention=(), absent=()):
    code = run_stage(stage, *args)
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}; stderr:\n{err}"
    assert "Traceback" not in err
    for text in must_mention:
        assert text in err, f"'{text}' not in:\n{err}"
    for path in absent:
        assert not (proj / path).exists(), f"{path} was left behind"
    assert not [p for p in proj.rglob("*") if ".tmp-" in p.name]
    db = proj / "mlflow.db"
    if db.exists():
        client = MlflowClient(f"sqlite:///{db}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert not [r for r in runs if r.info.status == "RUNNING"]
    return err


CONFIG_CASES = [
    ("finetune.lrr", 0.1, "finetune.lrr"),  # misspelled key
    ("finetune.steps", "many", "finetune.steps"),  # wrong type
    ("partition.ranges", [], "partition.ranges"),  # N < 1
    ("finetune.p", 1.5, "finetune.p"),
    ("finetune.p", -0.2, "finetune.p"),
    ("finetune.steps", -3, "finetune.steps"),
    ("finetune.lr", 0, "finetune.lr"),
    ("finetune.batch_size", 0, "finetune.batch_size"),
    ("merge.weights", [0.5, 0.2, 0.3], "merge.weights"),  # wrong length for N = 2
    ("merge.weights", [0.5, math.nan], "merge.weights"),  # non-finite
    ("merge.method", "average", "merge.method"),
    ("partition.boundaries", [0, 600, 500], "partition.boundaries"),  # overlapping
    ("partition.boundaries", [0, 500, 900], "partition.boundaries"),  # gap at the end
    ("evaluate.num_samples", 10, "evaluate.num_samples"),  # fewer samples than feature dims
]


@pytest.mark.parametrize("key, value, mention", CONFIG_CASES, ids=[f"{c[0]}={c[1]!r}" for c in CONFIG_CASES])
def test_bad_params(project, capsys, key, value, mention):
    proj, params = project
    write_params(proj, set_param(params, key, value))
    shutil.rmtree(proj / "partition")
    expect_failure(proj, capsys, "partition", must_mention=(mention,), absent=("partition",))


def test_n_greater_than_T(project, capsys):
    proj, params = project
    set_param(params, "model.num_train_timesteps", 2)
    write_params(proj, set_param(params, "partition.ranges", [0, 1, 2]))
    expect_failure(proj, capsys, "partition", must_mention=("N must not exceed T",))


def test_missing_params_file(project, capsys):
    proj, _ = project
    (proj / "params.yaml").unlink()
    expect_failure(proj, capsys, "partition", must_mention=("params.yaml", "not found"))


def test_pretrained_path_missing(project, capsys):
    proj, params = project
    shutil.rmtree(proj / "models" / "pretrained")
    write_params(proj, set_param(params, "model.pretrained_path", str(proj / "nowhere")))
    expect_failure(proj, capsys, "pretrain", must_mention=("model.pretrained_path", "nowhere", "does not exist"),
                   absent=("models/pretrained",))


def test_pretrained_path_not_diffusers(project, capsys):
    proj, params = project
    (proj / "ckpt").mkdir()
    (proj / "ckpt" / "model.pt").write_bytes(b"\0" * 64)
    shutil.rmtree(proj / "models" / "pretrained")
    write_params(proj, set_param(params, "model.pretrained_path", str(proj / "ckpt")))
    expect_failure(proj, capsys, "pretrain", must_mention=("not a diffusers UNet2DModel directory",),
                   absent=("models/pretrained",))


def test_pretrained_checkpoint_truncated(project, capsys):
    proj, params = project
    ckpt = proj / "ckpt"
    shutil.copytree(proj / "models" / "pretrained", ckpt)
    w = ckpt / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    shutil.rmtree(proj / "models" / "pretrained")
    write_params(proj, set_param(params, "model.pretrained_path", str(ckpt)))
    expect_failure(proj, capsys, "pretrain", must_mention=(str(w), "corrupt or truncated"),
                   absent=("models/pretrained",))


def test_pretrained_weight_file_missing(project, capsys):
    proj, params = project
    ckpt = proj / "ckpt"
    shutil.copytree(proj / "models" / "pretrained", ckpt)
    (ckpt / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(proj / "models" / "pretrained")
    write_params(proj, set_param(params, "model.pretrained_path", str(ckpt)))
    expect_failure(proj, capsys, "pretrain", must_mention=("diffusion_pytorch_model.safetensors", "missing"))


def test_pretrained_checkpoint_wrong_T(project, capsys):
    proj, params = project
    ckpt = proj / "ckpt"
    shutil.copytree(proj / "models" / "pretrained", ckpt)
    shutil.rmtree(proj / "models" / "pretrained")
    set_param(params, "model.num_train_timesteps", 500)
    write_params(proj, set_param(params, "model.pretrained_path", str(ckpt)))
    expect_failure(proj, capsys, "pretrain", must_mention=("model.num_train_timesteps: 1000",))


def test_range_model_with_mismatched_shapes(project, capsys):
    proj, params = project
    from dtm_core.config import ModelConfig
    from dtm_core.model import build_scheduler, build_unet, save_model, with_projection

    odd = with_projection(build_unet(ModelConfig(block_out_channels=[16, 32]), 8, 1), True)
    save_model(odd, build_scheduler(ModelConfig()), proj / "models" / "range-1")
    expect_failure(proj, capsys, "task_vectors", must_mention=("range model 1", "shape"), absent=("task_vectors",))


def test_range_index_outside_partition(project, capsys):
    proj, _ = project
    expect_failure(proj, capsys, "finetune", ("--range", "5"), must_mention=("range index 5",),
                   absent=("models/range-5", "metrics/finetune/range-5.json"))


def test_imagefolder_empty(project, capsys):
    proj, params = project
    (proj / "imgs" / "cls").mkdir(parents=True)
    shutil.rmtree(proj / "data" / "prepared")  # as DVC does before re-running a stage
    (proj / "metrics" / "prepare.json").unlink()
    write_params(proj, {**params, "data": {"source": "imagefolder", "image_folder": str(proj / "imgs"),
                                            "image_size": 8, "channels": 1, "holdout_fraction": 0.2}})
    expect_failure(proj, capsys, "prepare", must_mention=("data.image_folder", "no images"),
                   absent=("data/prepared", "metrics/prepare.json"))


def test_imagefolder_non_image(project, capsys):
    proj, params = project
    (proj / "imgs" / "cls").mkdir(parents=True)
    (proj / "imgs" / "cls" / "readme.txt").write_text("not an image")
    shutil.rmtree(proj / "data" / "prepared")  # as DVC does before re-running a stage
    (proj / "metrics" / "prepare.json").unlink()
    write_params(proj, {**params, "data": {"source": "imagefolder", "image_folder": str(proj / "imgs"),
                                            "image_size": 8, "channels": 1, "holdout_fraction": 0.2}})
    expect_failure(proj, capsys, "prepare", must_mention=("readme.txt", "not an image"), absent=("data/prepared",))


def test_missing_upstream_out(project, capsys):
    proj, _ = project
    shutil.rmtree(proj / "models" / "pretrained")
    expect_failure(proj, capsys, "finetune", ("--range", "1"), must_mention=("models/pretrained", "dvc repro"),
                   absent=("models/range-1",))


def test_output_not_writable(project, capsys):
    proj, _ = project
    shutil.rmtree(proj / "partition")
    (proj / "partition").write_text("a file where the output directory should be")
    expect_failure(proj, capsys, "partition", must_mention=("cannot create output directory", "partition"))


def test_tracking_server_unreachable(project, capsys, monkeypatch):
    proj, _ = project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    shutil.rmtree(proj / "partition")
    expect_failure(proj, capsys, "partition", must_mention=("cannot reach the MLflow tracking store", "127.0.0.1:9"),
                   absent=("partition",))


def test_inception_weights_missing_fails_before_sampling(project, capsys):
    proj, params = project
    set_param(params, "evaluate.features", "inception")
    set_param(params, "evaluate.num_samples", 2100)
    write_params(proj, set_param(params, "evaluate.inception_dir", str(proj / "weights")))
    err = expect_failure(proj, capsys, "evaluate", ("--model", "pretrained"),
                         must_mention=(str(proj / "weights" / "inception-2015-12-05.pt"), "evaluate.inception_dir"),
                         absent=("samples/pretrained.png", "metrics/pretrained.json"))
    assert "sample" not in err.split("error:")[0]  # no sampling progress before the error
    expect_failure(proj, capsys, "classifier", must_mention=("inception-2015-12-05.pt",),
                   absent=("models/classifier",))
