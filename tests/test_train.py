import pytest
import torch

from dtm_core.config import FinetuneConfig, ModelConfig
from dtm_core.data import load_digits_source
from dtm_core.errors import TrainingDivergedError
from dtm_core.model import build_scheduler, build_unet, float_state, with_projection
from dtm_core.partition import sample_timesteps
from dtm_core.train import TrainResult, lr_factor, smoothed, train
from stages import report

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
    assert smoothed(res.losses) == res.losses[-1][1]  # the last quarter of 3 logged values: the last one


def test_same_seed_same_weights(images):
    a = train(with_projection(_base(), True), build_scheduler(CFG), images, _ft(), seed=3).model
    b = train(with_projection(_base(), True), build_scheduler(CFG), images, _ft(), seed=3).model
    c = train(with_projection(_base(), True), build_scheduler(CFG), images, _ft(), seed=4).model
    sa, sb, sc = float_state(a), float_state(b), float_state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("channels_last", [True, False])
def test_layout_while_training_and_after(images, channels_last):
    seen = []
    model, teacher = with_projection(_base(), True), _base().eval()
    for net in (model, teacher):
        net.conv_out.register_forward_pre_hook(  # conv_in's one input channel fits both layouts
            lambda m, args: seen.append(m.weight.is_contiguous(memory_format=torch.channels_last)
                                        and not m.weight.is_contiguous()))
    res = train(model, build_scheduler(CFG), images, _ft(steps=2), seed=1, teacher=teacher, consistency_weight=1.0,
                channels_last=channels_last)
    assert seen and all(s == channels_last for s in seen)  # the trained model and the teacher, every step
    # both leave in the storage layout, so they save as safetensors and difference into task vectors
    assert all(v.is_contiguous() for v in float_state(res.model).values())
    assert all(v.is_contiguous() for v in float_state(teacher).values())
    assert all(p.requires_grad for p in teacher.parameters())  # the caller's teacher as it came: train runs a copy


def test_layouts_train_the_same_model_up_to_rounding(images):
    runs = [float_state(train(with_projection(_base(), True), build_scheduler(CFG), images, _ft(), seed=2,
                              channels_last=cl).model) for cl in (True, False)]
    diff = sum(float((runs[0][k] - runs[1][k]).norm() ** 2) for k in runs[0]) ** 0.5
    norm = sum(float(runs[1][k].norm() ** 2) for k in runs[1]) ** 0.5
    assert diff < 1e-4 * norm


def test_consistency_loss_is_logged_and_pulls_towards_teacher(images):
    teacher = _base().eval()
    draw = lambda b, g: sample_timesteps(b, 0, 250, 1000, 0.3, g)[0]  # noqa: E731
    ft = _ft(steps=20, lr=3e-3)
    runs = {w: train(with_projection(teacher, True), build_scheduler(CFG), images, ft, seed=1, timestep_sampler=draw,
                     teacher=teacher, consistency_weight=w) for w in (0.0, 10.0)}
    assert len(runs[10.0].consistency) == 10 and not runs[0.0].consistency
    # the same steps and noise: the run with the consistency term ends closer to the frozen model
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 250, (64,), generator=g)
    with torch.no_grad():
        target = teacher(x, t).sample
        gap = {w: torch.mean((r.model(x, t).sample - target) ** 2).item() for w, r in runs.items()}
    assert gap[10.0] < 0.5 * gap[0.0]


def test_resume_after_interruption_matches_uninterrupted(images, tmp_path):
    ft = _ft(steps=8, checkpoint_every=3)
    full = train(with_projection(_base(), True), build_scheduler(CFG), images, ft, seed=2)
    ck = tmp_path / "ck"

    def interrupt(step, _):  # the run is killed after step 5: its newest checkpoint is step 3
        raise KeyboardInterrupt(step)

    with pytest.raises(KeyboardInterrupt):
        train(with_projection(_base(), True), build_scheduler(CFG), images, ft, seed=2,
              checkpoint_dir=ck, checkpoint_every=3, snapshot_every=5, on_snapshot=interrupt)
    assert (ck / "step-3" / "COMPLETE").is_file() and not (ck / "step-6").exists()
    resumed = train(with_projection(_base(), True), build_scheduler(CFG), images, ft, seed=2,
                    checkpoint_dir=ck, checkpoint_every=3)
    assert resumed.resumed_from == 3
    sf, sr = float_state(full.model), float_state(resumed.model)
    assert all(torch.equal(sf[k], sr[k]) for k in sf)
    assert resumed.losses == full.losses


def test_divergence_is_reported(images):
    with pytest.raises(TrainingDivergedError, match="lower the learning rate"):
        train(_base(), build_scheduler(CFG), images * float("nan"), _ft(), seed=0)


def test_lr_schedule_warmup_then_cosine_and_resume_safe():
    assert [lr_factor(s, 10, "constant", 0) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert [lr_factor(s, 10, "constant", 4) for s in (0, 1, 3, 4)] == [0.25, 0.5, 1.0, 1.0]
    cos = [lr_factor(s, 104, "cosine", 4) for s in range(104)]
    assert cos[3] == 1.0 and cos[4] == pytest.approx(1.0) and cos[54] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(cos[4:], cos[5:])) and cos[-1] < 0.01


def test_cosine_schedule_is_applied_to_the_optimiser(images):
    const = train(_base(), build_scheduler(CFG), images, _ft(), seed=1).model
    cos = train(_base(), build_scheduler(CFG), images, _ft(lr_schedule="cosine", warmup_steps=2), seed=1).model
    sa, sb = float_state(const), float_state(cos)
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)


def test_loss_weights_reweight_by_timestep(images):
    plain = train(_base(), build_scheduler(CFG), images, _ft(), seed=1)
    ones = train(_base(), build_scheduler(CFG), images, _ft(), seed=1, loss_weights=torch.ones(1000))
    for k, v in float_state(plain.model).items():
        torch.testing.assert_close(float_state(ones.model)[k], v, rtol=1e-4, atol=1e-6)
    skewed = torch.linspace(0.01, 2.0, 1000)
    other = train(_base(), build_scheduler(CFG), images, _ft(), seed=1, loss_weights=skewed)
    assert any(not torch.allclose(float_state(other.model)[k], v) for k, v in float_state(plain.model).items())


def test_a_shorter_run_is_the_snapshot_of_a_longer_one_at_a_constant_lr(images):
    """finetune.shared_steps = S trains exactly the S-step snapshot of a longer run: an early stop."""
    snaps = {}
    train(with_projection(_base(), False), build_scheduler(CFG), images, _ft(steps=6), seed=5, snapshot_every=2,
          on_snapshot=lambda step, m: snaps.setdefault(step, float_state(m)))
    assert sorted(snaps) == [2, 4, 6]
    short = train(with_projection(_base(), False), build_scheduler(CFG), images, _ft(steps=4), seed=5).model
    short = float_state(short)
    assert all(torch.equal(short[k], snaps[4][k]) for k in short)
    assert any(not torch.equal(snaps[4][k], snaps[6][k]) for k in short)


def test_the_report_says_whether_the_shared_baseline_had_equal_steps():
    equal = {"num_ranges": 4, "finetune_steps_per_range": 200, "shared_steps": 800}
    assert report.compute_label(equal) == "equal steps"
    label = report.compute_label({"num_ranges": 4, "finetune_steps_per_range": 1500, "shared_steps": 3000})
    assert "finetune.shared_steps" in label and "0.50 x" in label and "6000" in label


def test_steps_per_second_counts_only_the_steps_a_resumed_run_took():
    assert TrainResult(model=None, steps=100, seconds=10.0).steps_per_second == 10.0
    assert TrainResult(model=None, steps=100, seconds=10.0, resumed_from=60).steps_per_second == 4.0
