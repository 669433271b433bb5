import numpy as np
import pytest
import torch

from dtm_core.config import ModelConfig
from dtm_core.model import build_scheduler, build_unet
from dtm_core.partition import uniform_ranges
from dtm_core.sampling import initial_noise, sample, save_grid, to_uint8

CFG = ModelConfig(block_out_channels=[16, 32])


def _unet(seed):
    torch.manual_seed(seed)
    return build_unet(CFG, 8, 1).eval()


def test_common_noise_depends_only_on_seed():
    assert torch.equal(initial_noise(7, 5, (1, 8, 8)), initial_noise(7, 5, (1, 8, 8)))
    assert not torch.equal(initial_noise(7, 5, (1, 8, 8)), initial_noise(8, 5, (1, 8, 8)))


def test_ddim_is_deterministic_and_batch_independent():
    sched = build_scheduler(CFG)
    noise = initial_noise(0, 6, (1, 8, 8))
    a = sample([_unet(0)], sched, noise, steps=5, batch_size=6)
    b = sample([_unet(0)], sched, noise, steps=5, batch_size=4)
    assert a.shape == (6, 1, 8, 8) and a.min() >= -1 and a.max() <= 1
    np.testing.assert_allclose(a, b, atol=1e-4)  # batch size changes the float kernels, not the result


def test_ensemble_of_identical_models_equals_single_model():
    sched = build_scheduler(CFG)
    noise = initial_noise(1, 4, (1, 8, 8))
    single = sample([_unet(0)], sched, noise, steps=5)
    ens = sample([_unet(0), _unet(0)], sched, noise, steps=5, ranges=uniform_ranges(1000, 2))
    np.testing.assert_array_equal(single, ens)


def test_ensemble_uses_each_model_in_its_range():
    sched = build_scheduler(CFG)
    noise = initial_noise(1, 4, (1, 8, 8))
    a, b = _unet(0), _unet(1)
    ens = sample([a, b], sched, noise, steps=5, ranges=uniform_ranges(1000, 2))
    only_a = sample([a], sched, noise, steps=5)
    only_b = sample([b], sched, noise, steps=5)
    assert not np.allclose(ens, only_a) and not np.allclose(ens, only_b)


def test_grid_png(tmp_path):
    imgs = np.linspace(-1, 1, 16 * 64).reshape(16, 1, 8, 8).astype(np.float32)
    save_grid(imgs, tmp_path / "g.png", nrow=4, scale=2)
    from PIL import Image

    with Image.open(tmp_path / "g.png") as im:
        assert im.size == ((4 * 9 + 1) * 2, (4 * 9 + 1) * 2)
    assert to_uint8(imgs).dtype == np.uint8


def test_samples_and_losses_are_the_same_bits_on_one_thread_or_several():
    """inference_map runs every batch with one intra-op thread, in as many streams as there are threads."""
    from dtm_core.denoising import denoising_losses, timestep_grid

    sched = build_scheduler(CFG)
    noise = initial_noise(2, 12, (1, 8, 8))
    images = np.random.default_rng(0).uniform(-1, 1, (12, 1, 8, 8)).astype(np.float32)
    grid = timestep_grid(1000, 6)
    threads = torch.get_num_threads()
    results = {}
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            results[n] = (sample([_unet(0)], sched, noise, steps=4, batch_size=4, eta=0.5, seed=9),
                          denoising_losses([_unet(0)], sched, images, grid, seed=1, batch_size=5))
            assert torch.get_num_threads() == n  # the caller's share is restored
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(results[1][0], results[3][0])  # eta > 0 draws its noise per batch
    np.testing.assert_array_equal(results[1][1], results[3][1])


def test_inference_map_keeps_order_runs_in_inference_mode_and_spreads_over_threads():
    import threading
    import time

    from dtm_core.distributed import inference_map

    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    seen = []

    def square(x):
        seen.append((threading.get_ident(), torch.is_inference_mode_enabled(), torch.get_num_threads()))
        time.sleep(0.002)  # long enough that one stream cannot take every item
        return x * x

    try:
        out = inference_map(square, range(30), torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert out == [x * x for x in range(30)]
    assert all(inference and n == 1 for _, inference, n in seen)
    assert len({ident for ident, _, _ in seen}) > 1  # more than one stream


@pytest.mark.parametrize("solver", ["dpmsolver", "unipc"])
def test_ode_solver_is_deterministic_routes_the_ensemble_and_converges(solver):
    sched = build_scheduler(CFG)
    noise = initial_noise(3, 6, (1, 8, 8))
    net = _unet(0)
    a = sample([net], sched, noise, steps=8, batch_size=6, sampler=solver)
    b = sample([net], sched, noise, steps=8, batch_size=4, sampler=solver)
    np.testing.assert_allclose(a, b, atol=1e-4)
    ens = sample([_unet(0), _unet(0)], sched, noise, steps=8, ranges=uniform_ranges(1000, 2), sampler=solver)
    np.testing.assert_array_equal(a, ens)
    mixed = sample([_unet(0), _unet(1)], sched, noise, steps=8, ranges=uniform_ranges(1000, 2), sampler=solver)
    assert not np.allclose(mixed, a)
    # it converges: more steps land nearer its own many-step solution of the ODE
    exact = sample([net], sched, noise, steps=200, sampler=solver)
    err = {k: np.abs(sample([net], sched, noise, steps=k, sampler=solver) - exact).mean() for k in (4, 50)}
    assert err[50] < 0.5 * err[4]
    # to the same solution: both solve the same probability-flow ODE
    if solver != "dpmsolver":
        other = sample([net], sched, noise, steps=200, sampler="dpmsolver")
        assert np.abs(exact - other).mean() < err[4] / 10


def test_unknown_samplers_are_refused():
    sched = build_scheduler(CFG)
    noise = initial_noise(0, 2, (1, 8, 8))
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        sample([_unet(0)], sched, noise, steps=2, sampler="euler")
