import numpy as np
import pytest
import torch

from dtm_core.config import ModelConfig
from dtm_core.denoising import _noise, denoising_losses, timestep_grid
from dtm_core.model import build_scheduler, build_unet
from dtm_core.partition import range_columns


class _Const(torch.nn.Module):
    """A 'model' that predicts a constant eps: its loss is known in closed form."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x, t):
        return type("Out", (), {"sample": torch.full_like(x, self.value)})()


def test_timestep_grid_spans_0_to_T_minus_1():
    g = timestep_grid(1000, 50)
    assert g[0] == 0 and g[-1] == 999 and len(g) == 50 and np.all(np.diff(g) > 0)
    assert list(timestep_grid(5, 50)) == [0, 1, 2, 3, 4]


def test_range_columns_partition_the_grid():
    g = timestep_grid(1000, 40)
    cols = range_columns(g, [(0, 250), (250, 1000)])
    assert sorted(np.concatenate(cols).tolist()) == list(range(len(g)))
    assert all(g[c].max() < 250 for c in cols[:1]) and all(g[c].min() >= 250 for c in cols[1:])


def test_losses_match_the_closed_form_for_a_constant_model():
    images = np.zeros((7, 1, 4, 4), dtype=np.float32)
    grid = np.array([0, 10, 500])
    sched = build_scheduler(ModelConfig())
    losses = denoising_losses([_Const(0.0)], sched, images, grid, seed=3, batch_size=3)
    assert losses.shape == (7, 3)
    for j, t in enumerate(grid):
        noise = _noise(3, int(t), images.shape)
        np.testing.assert_allclose(losses[:, j], (noise**2).flatten(1).mean(1).numpy(), rtol=1e-6)


def test_every_model_sees_the_same_noise_and_the_ensemble_picks_by_range():
    torch.manual_seed(0)
    unet = build_unet(ModelConfig(block_out_channels=[16, 32]), 8, 1).eval()
    sched = build_scheduler(ModelConfig())
    images = np.random.default_rng(0).uniform(-1, 1, (5, 1, 8, 8)).astype(np.float32)
    grid = timestep_grid(1000, 6)
    a = denoising_losses([unet], sched, images, grid, seed=1)
    assert np.array_equal(a, denoising_losses([unet], sched, images, grid, seed=1))  # the same noise again
    np.testing.assert_allclose(a, denoising_losses([unet], sched, images, grid, seed=1, batch_size=2), rtol=1e-5)
    zero = denoising_losses([_Const(0.0)], sched, images, grid, seed=1)
    ranges = [(0, 500), (500, 1000)]
    ens = denoising_losses([unet, _Const(0.0)], sched, images, grid, seed=1, ranges=ranges)
    low, high = range_columns(grid, ranges)
    np.testing.assert_allclose(ens[:, low], a[:, low])
    np.testing.assert_allclose(ens[:, high], zero[:, high])
    with pytest.raises(ValueError):
        denoising_losses([unet, unet], sched, images, grid, seed=1)
