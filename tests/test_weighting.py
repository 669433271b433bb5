import pytest
import torch

from dtm_core.config import ModelConfig
from dtm_core.model import build_scheduler
from dtm_core.weighting import raw_weights, snr, timestep_weights

ALPHAS = build_scheduler(ModelConfig()).alphas_cumprod  # the linear schedule, T = 1000


@pytest.mark.parametrize("t", [0, 10, 250, 600, 999])
def test_each_weighting_is_its_formula(t):
    a = float(ALPHAS[t])
    s = a / (1 - a)
    assert float(snr(ALPHAS)[t]) == pytest.approx(s, rel=1e-9)
    expected = {
        "none": 1.0,
        "snr_plus_one": (s + 1) / s,
        "trunc_snr": max(s, 1.0) / s,
        "min_snr": min(s, 5.0) / s,
        "p2": 1.0 / (1.0 + s) ** 1.0,
    }
    for name, value in expected.items():
        assert float(raw_weights(name, ALPHAS)[t]) == pytest.approx(value, rel=1e-9), name
    assert float(raw_weights("min_snr", ALPHAS, gamma=1.0)[t]) == pytest.approx(min(s, 1.0) / s, rel=1e-9)
    assert float(raw_weights("p2", ALPHAS, gamma=0.5)[t]) == pytest.approx(1.0 / (1.0 + s) ** 0.5, rel=1e-9)


@pytest.mark.parametrize("name", ["none", "snr_plus_one", "trunc_snr", "min_snr", "p2"])
def test_normalised_to_mean_one_over_all_timesteps(name):
    w = timestep_weights(name, ALPHAS)
    assert w.shape == (1000,) and w.dtype == torch.float32
    assert float(w.double().mean()) == pytest.approx(1.0, rel=1e-5)
    ratio = w / raw_weights(name, ALPHAS).float()
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)  # a rescale of the formula, nothing else


def test_the_weightings_shift_emphasis_as_documented():
    low, high = 10, 990
    # SNR+1 and truncated SNR weigh noisy (high t) samples up; min-SNR weighs clean (low t) ones down
    assert timestep_weights("snr_plus_one", ALPHAS)[high] > timestep_weights("snr_plus_one", ALPHAS)[low]
    assert timestep_weights("min_snr", ALPHAS)[low] < timestep_weights("min_snr", ALPHAS)[high]
    # P2 weighs low-SNR (high t) timesteps up as well
    assert timestep_weights("p2", ALPHAS)[high] > timestep_weights("p2", ALPHAS)[low]
