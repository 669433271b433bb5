import numpy as np
import pytest
import torch

from dtm_core.affinity import count_sketch, gradient_affinity, sketch
from dtm_core.config import ModelConfig
from dtm_core.data import load_digits_source
from dtm_core.model import build_scheduler, build_unet


def test_count_sketch_preserves_inner_products_and_is_seeded():
    rng = np.random.default_rng(0)
    a = torch.as_tensor(rng.normal(size=20000))
    b = 0.6 * a + 0.8 * torch.as_tensor(rng.normal(size=20000))
    buckets, signs = count_sketch(20000, 2048, seed=3)
    sa, sb = sketch(a, buckets, signs, 2048), sketch(b, buckets, signs, 2048)
    cos = float(sa @ sb / (sa.norm() * sb.norm()))
    true = float(a @ b / (a.norm() * b.norm()))
    assert abs(cos - true) < 0.05
    again = count_sketch(20000, 2048, seed=3)
    assert torch.equal(again[0], buckets) and torch.equal(again[1], signs)


def test_gradient_affinity_is_a_seeded_cosine_matrix():
    torch.manual_seed(0)
    unet = build_unet(ModelConfig(block_out_channels=[16, 32]), 8, 1)
    sched = build_scheduler(ModelConfig())
    images = load_digits_source().images[:32]
    res = gradient_affinity(unet, sched, images, bins=6, seed=1, dim=512)
    A = res["affinity"]
    assert A.shape == (6, 6) and np.allclose(A, A.T) and np.allclose(np.diag(A), 1.0)
    assert A.min() >= -1 - 1e-9 and A.max() <= 1 + 1e-9
    assert res["bin_edges"] == [0, 167, 333, 500, 667, 833, 1000] and len(res["grad_norms"]) == 6
    # neighbouring bins pull the weights more alike than the two ends of [0, T)
    assert A[0, 1] > A[0, 5]
    assert np.array_equal(A, gradient_affinity(unet, sched, images, bins=6, seed=1, dim=512)["affinity"])
    with pytest.raises(ValueError):
        gradient_affinity(unet, sched, images, bins=1, seed=1)
