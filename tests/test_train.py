import pytest
import torch

from dtm_core.config import FinetuneConfig, ModelConfig
from dtm_core.data import load_digits_source
from dtm_core.model import build_scheduler, build_unet, float_state, with_projection
from dtm_core.partition import sample_timesteps
from dtm_core.train import smoothed, train

CFG = ModelConfig(block_out_channels=[16, 32], norm_num_groups=8)


@pytest.fixture(scope="module")
def images():
    return torch.as_tensor(load_digits_source().images[:256])


def _ft(**kw):
    return FinetuneConfig(**{"steps": 6, "batch_size": 16, "lr": 1e-3, "log_every": 2, "checkpoint_every": 0, **kw})


def _base():
    torch.manual_seed(0)
    return build_unet(CFG, 8, 1)


def test_training_changes_weights_and_logs_loss(images):
    base = _base()
    before = {k: v.clone() for k, v in float_state(base).items()}
    res = train(with_projection(base, True), build_scheduler(CFG), images, _ft(), seed=1)
    assert res.steps == 6 and len(res.losses) == 3
    assert all(torch.isfinite(torch.tensor(v)) for _, v in res.losses)
    after = float_state(res.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert smoothed(res.losses) > 0


def test_same_seed_same_weights(images):
    a = train(with_projection(_base(), True), build_scheduler(CFG), images, _ft(), seed=3).model
    b = train(with_projection(_base(), True), build_scheduler(CFG), images, _ft(), seed=3).model
    c = train(with_projection(_base(), True), build_scheduler(CFG), images, _ft(), seed=4).model
    sa, sb, sc = float_state(a), float_state(b), float_state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_consistency_loss_is_logged_and_pulls_towards_teacher(images):
    teacher = _base().eval()
    draw = lambda b, g: sample_timesteps(b, 0, 250, 1000, 0.3, g)[0]  # noqa: E731
    with_c = train(with_projection(teacher, True), build_scheduler(CFG), images, _ft(consistency_weight=1.0), seed=1,
                   timestep_sampler=draw, teacher=teacher, consistency_weight=1.0)
    assert len(with_c.consistency) == 3 and all(v >= 0 for _, v in with_c.consistency)


def test_resume_after_interruption_matches_uninterrupted(images, tmp_path):
    ft = _ft(steps=8, checkpoint_every=3)
    full = train(with_projection(_base(), True), build_scheduler(CFG), images, ft, seed=2)
    ck = tmp_path / "ck"
    partial = train(with_projection(_base(), True), build_scheduler(CFG), images, ft, seed=2,
                    checkpoint_dir=ck, checkpoint_every=3, stop_after=5)
    assert partial.steps == 5 and (ck / "step-3" / "COMPLETE").is_file()
    resumed = train(with_projection(_base(), True), build_scheduler(CFG), images, ft, seed=2,
                    checkpoint_dir=ck, checkpoint_every=3)
    assert resumed.resumed_from == 3
    sf, sr = float_state(full.model), float_state(resumed.model)
    assert all(torch.equal(sf[k], sr[k]) for k in sf)
    assert resumed.losses == full.losses


def test_divergence_is_reported(images):
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        train(_base(), build_scheduler(CFG), images * float("nan"), _ft(), seed=0)
