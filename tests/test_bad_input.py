"""Bad input: each case stops its stage with exit status 2 and a message that
names the offending key or file, leaves no out (not even a half-written one)
and no MLflow run in RUNNING state."""

import json
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from stagehelp import built_project, run_stage, set_param, write_params


@pytest.fixture(scope="module")
def base_project(tmp_path_factory):
    """prepare + partition + pretrain + one range fine-tune on the tiny profile."""
    return built_project(tmp_path_factory, "bad", (("prepare", ()), ("partition", ()), ("pretrain", ()),
                                                   ("finetune", ("--range", "0"))))


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


def user_checkpoint(proj: Path, params: dict, drop: str | None = None) -> Path:
    """The tiny pretrained model copied to ckpt/ as a user's checkpoint (minus ``drop``), in params."""
    ckpt = proj / "ckpt"
    shutil.copytree(proj / "models" / "pretrained", ckpt)
    if drop:
        (ckpt / drop).unlink()
    shutil.rmtree(proj / "models" / "pretrained")  # as DVC does before re-running pretrain
    write_params(proj, set_param(params, "model.pretrained_path", str(ckpt)))
    return ckpt



# one stage-level case per kind of config error (the stage runner's handling); tests/test_config.py has the rest
CONFIG_CASES = [
    ("finetune.lrr", 0.1, "finetune.lrr"),  # misspelled key
    ("finetune.steps", "many", "finetune.steps"),  # wrong type
    ("merge.weights", [0.5, 0.2, 0.3], "merge.weights"),  # a cross-field rule: wrong length for N = 2
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
    w = user_checkpoint(proj, params) / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    expect_failure(proj, capsys, "pretrain", must_mention=(str(w), "corrupt or truncated"),
                   absent=("models/pretrained",))


def test_pretrained_weight_file_missing(project, capsys):
    proj, params = project
    user_checkpoint(proj, params, drop="diffusion_pytorch_model.safetensors")
    expect_failure(proj, capsys, "pretrain", must_mention=("diffusion_pytorch_model.safetensors", "missing"),
                   absent=("models/pretrained",))


def test_prompt_conditioning_of_an_unconditional_checkpoint(project, capsys):
    proj, params = project
    user_checkpoint(proj, set_param(params, "model.conditioning", "prompt"))
    expect_failure(proj, capsys, "pretrain", must_mention=("model.conditioning", "model.pretrained_path: null"),
                   absent=("models/pretrained",))


def test_pretrained_checkpoint_wrong_T(project, capsys):
    proj, params = project
    user_checkpoint(proj, set_param(params, "model.num_train_timesteps", 500))
    expect_failure(proj, capsys, "pretrain", must_mention=("model.num_train_timesteps: 1000",),
                   absent=("models/pretrained",))


def test_range_model_with_mismatched_shapes(project, capsys):
    proj, params = project
    from dtm_core.config import ModelConfig
    from dtm_core.model import build_scheduler, build_unet, save_model, with_projection

    odd = with_projection(build_unet(ModelConfig(block_out_channels=[16, 32]), 8, 1), True)
    save_model(odd, build_scheduler(ModelConfig()), proj / "models" / "ranges" / "range-1")
    expect_failure(proj, capsys, "task_vectors", must_mention=("range model 1", "shape"), absent=("task_vectors",))


def test_range_index_outside_partition(project, capsys):
    proj, _ = project
    expect_failure(proj, capsys, "finetune", ("--range", "5"), must_mention=("range index 5",),
                   absent=("models/ranges/range-5",))


def test_imagefolder_empty(project, capsys):
    proj, params = project
    (proj / "imgs" / "cls").mkdir(parents=True)
    shutil.rmtree(proj / "data" / "prepared")  # as DVC does before re-running a stage
    write_params(proj, {**params, "data": {"source": "imagefolder", "image_folder": str(proj / "imgs"),
                                            "image_size": 8, "channels": 1, "holdout_fraction": 0.2}})
    expect_failure(proj, capsys, "prepare", must_mention=("data.image_folder", "no images"),
                   absent=("data/prepared",))


def test_imagefolder_non_image(project, capsys):
    proj, params = project
    (proj / "imgs" / "cls").mkdir(parents=True)
    (proj / "imgs" / "cls" / "readme.txt").write_text("not an image")
    shutil.rmtree(proj / "data" / "prepared")  # as DVC does before re-running a stage
    write_params(proj, {**params, "data": {"source": "imagefolder", "image_folder": str(proj / "imgs"),
                                            "image_size": 8, "channels": 1, "holdout_fraction": 0.2}})
    expect_failure(proj, capsys, "prepare", must_mention=("readme.txt", "not an image"), absent=("data/prepared",))


def test_missing_upstream_out(project, capsys):
    proj, _ = project
    shutil.rmtree(proj / "models" / "pretrained")
    expect_failure(proj, capsys, "finetune", ("--range", "1"), must_mention=("models/pretrained", "dvc repro"),
                   absent=("models/ranges/range-1",))


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


def test_hub_id_as_pretrained_path(project, capsys):
    proj, params = project
    shutil.rmtree(proj / "models" / "pretrained")
    write_params(proj, set_param(params, "model.pretrained_path", "google/ddpm-cifar10-32"))
    err = expect_failure(proj, capsys, "pretrain", must_mention=("Hugging Face Hub id", "save_pretrained"),
                         absent=("models/pretrained",))
    assert "dvc repro" not in err  # pipeline advice is for pipeline outputs, not a user's checkpoint


def test_checkpoint_image_shape_is_checked_in_prepare(project, capsys):
    proj, params = project
    config = user_checkpoint(proj, params) / "config.json"
    config.write_text(config.read_text().replace('"sample_size": 8', '"sample_size": 32'))
    shutil.rmtree(proj / "data" / "prepared")
    expect_failure(proj, capsys, "prepare", must_mention=("32x32", "data.image_size: 32"), absent=("data/prepared",))


def test_heldout_split_too_small_for_the_floor(project, capsys):
    proj, params = project
    (proj / "imgs").mkdir()
    import numpy as np
    from PIL import Image

    for c in range(2):
        (proj / "imgs" / f"c{c}").mkdir()
        for i in range(40):
            Image.fromarray(np.full((8, 8), 6 * i + c, dtype=np.uint8)).save(proj / "imgs" / f"c{c}" / f"{i}.png")
    write_params(proj, {**params, "data": {"source": "imagefolder", "image_folder": str(proj / "imgs"),
                                            "image_size": 8, "channels": 1, "holdout_fraction": 0.1}})
    shutil.rmtree(proj / "data" / "prepared")
    assert run_stage("prepare") == 0
    capsys.readouterr()
    expect_failure(proj, capsys, "classifier", must_mention=("held-out split (8 images)",
                   "evaluate.classifier.feature_dim", "data.holdout_fraction"), absent=("models/classifier",))


def test_checkpoint_without_scheduler_is_said_and_recorded(project, caplog):
    proj, params = project
    user_checkpoint(proj, params, drop="scheduler_config.json")
    with caplog.at_level("WARNING", logger="dtm.pretrain"):
        assert run_stage("pretrain") == 0
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("has no scheduler_config.json" in m and "building the noise schedule from params.yaml" in m
               for m in said)
    info = json.loads((proj / "models" / "pretrained" / "dtm_info.json").read_text())
    assert info["schedule_source"] == "params (the checkpoint has none)"


def test_an_internal_bug_shows_its_traceback(project, capsys, monkeypatch):
    """Only the project's own errors are one-line messages; a ValueError from a bug is not hidden."""
    import dtm_core.partition

    def buggy(params):
        raise ValueError("an internal bug")

    proj, _ = project
    # run_stage re-executes stages/partition.py, which imports the patched function
    monkeypatch.setattr(dtm_core.partition, "ranges_from_params", buggy)
    with pytest.raises(ValueError, match="an internal bug"):
        run_stage("partition")
    err = capsys.readouterr().err
    assert "error: partition" not in err
    db = proj / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.info.status for r in runs} == {"FAILED"}  # the child and its parent, nothing left RUNNING


def test_an_internal_bug_exits_nonzero_with_traceback_in_a_process(project):
    """As DVC runs it: a separate process, exit status 1 (not the user-error 2), traceback on stderr."""
    import subprocess

    from stagehelp import stage_command, stage_env

    proj, _ = project
    (proj / "partition" / "ranges.json").write_text('{"num_train_timesteps": 1000, "ranges": [[0, 1000]]}')
    code = "import runpy, sys; import dtm_core.partition as p; " \
           "p.validate_ranges = lambda *a, **k: (_ for _ in ()).throw(RuntimeError('planted')); " \
           "sys.argv = ['x', '--range', '0']; runpy.run_module('stages.finetune', run_name='__main__')"
    proc = subprocess.run([stage_command("finetune")[0], "-c", code], cwd=proj, env=stage_env(proj),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "RuntimeError: planted" in proc.stderr
