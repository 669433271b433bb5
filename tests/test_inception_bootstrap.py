"""The Inception path (offline, with a stand-in TorchScript module) and bootstrap intervals."""

import numpy as np
import pytest
import torch

from dtm_core import distances, features
from dtm_core.config import ConfigError, parse_params
from dtm_core.errors import WeightsMissingError


class _StandIn(torch.nn.Module):
    """Shaped like clean-fid's Inception: .layers maps (B,3,299,299) in [-1,1] to (B,2048)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
                                          torch.nn.Linear(48, 2048))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


@pytest.fixture
def standin_dir(tmp_path):
    torch.jit.script(_StandIn()).save(str(tmp_path / features.INCEPTION_FILE))
    return tmp_path


def test_missing_weights_message_names_file_and_fix(tmp_path):
    with pytest.raises(WeightsMissingError) as exc:
        features.inception_weights(str(tmp_path))
    msg = str(exc.value)
    assert str(tmp_path / "inception-2015-12-05.pt") in msg
    assert "evaluate.inception_dir" in msg and "curl -L -o inception-2015-12-05.pt https://" in msg


def test_inception_wiring_resize_batching_stats(standin_dir):
    extract = features.InceptionFeatures(features.inception_weights(str(standin_dir)), batch_size=3)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(7, 1, 8, 8)).astype(np.float32)
    feats = extract(images)
    assert feats.shape == (7, 2048) and np.isfinite(feats).all()
    # batching does not change features
    np.testing.assert_allclose(features.InceptionFeatures(standin_dir / features.INCEPTION_FILE, batch_size=7)(images),
                               feats, rtol=1e-5, atol=1e-5)
    # grayscale is repeated to RGB: identical to feeding a 3-channel copy
    np.testing.assert_allclose(extract(np.repeat(images, 3, axis=1)), feats, rtol=1e-5, atol=1e-5)
    # the resize is clean-fid's: 8x8 uint8 -> 299x299 float, per channel, PIL bicubic
    assert extract.resize(np.zeros((8, 8, 3), dtype=np.uint8)).shape == (299, 299, 3)


def test_feature_extractor_selects_inception(standin_dir):
    fx = features.feature_extractor("inception", classifier=None, inception_dir=str(standin_dir))
    assert isinstance(fx, features.InceptionFeatures)


def test_inception_needs_more_samples_than_2048(default_params_dict):
    d = dict(default_params_dict)
    d["evaluate"] = {**d["evaluate"], "features": "inception", "num_samples": 1000}
    with pytest.raises(ConfigError, match="2048"):
        parse_params(d)


def test_bootstrap_ci_covers_the_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(3000, 4))
    small, large = rng.normal(0.3, size=(200, 4)), rng.normal(0.3, size=(3000, 4))
    fd = distances.frechet_distance
    est_s, est_l = fd(small, ref), fd(large, ref)
    lo_s, hi_s = distances.bootstrap_ci(small, ref, fd, 100, seed=1, estimate=est_s)
    lo_l, hi_l = distances.bootstrap_ci(large, ref, fd, 100, seed=1, estimate=est_l)
    # duplicates in a resample inflate FD; the interval is placed around the estimate
    assert lo_s < est_s < hi_s
    assert lo_l < est_l < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s)
    assert distances.bootstrap_ci(small, ref, fd, 50, seed=2, estimate=est_s) == \
        distances.bootstrap_ci(small, ref, fd, 50, seed=2, estimate=est_s)


def test_kid_interval_holds_the_reported_kid_on_a_small_folder():
    """The bootstrap uses fewer KID subsets than the estimate; the interval must still hold the estimate
    (seen before on a user's small folder: KID 9.67 with an interval of [10.80, 10.90])."""
    rng = np.random.default_rng(3)
    feats, ref = rng.normal(0.5, size=(60, 8)) * 3, rng.normal(size=(90, 8))
    d = distances.distances(feats, ref, kid_subsets=100, kid_subset_size=1000, bootstrap_rounds=30, seed=0)
    assert d["kid_ci"][0] <= d["kid"] <= d["kid_ci"][1]
    assert d["fd_ci"][0] <= d["fd"] <= d["fd_ci"][1]


def test_paired_bootstrap_sees_a_consistent_difference():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2000, 4))
    noise = rng.normal(size=(1000, 4))  # common random numbers: the same noise, two 'models'
    good, bad = noise * 1.0, noise * 1.0 + 0.4
    fd = distances.frechet_distance
    delta = fd(bad, ref) - fd(good, ref)
    contrast = distances.fd_contrast({"features": bad}, {"features": good}, ref, 100, seed=0)
    lo, hi = contrast["fd_ci"]
    assert contrast["fd"] == pytest.approx(delta) and 0 < lo < delta < hi  # worse, beyond the interval
    assert distances.fd_contrast({"features": good}, {"features": good}, ref, 100, seed=0)["fd_ci"] == [0.0, 0.0]


def test_paired_mean_ci():
    rng = np.random.default_rng(0)
    lo, hi = distances.paired_mean_ci(rng.normal(0.5, 1.0, size=400), 200, seed=0)
    assert 0.3 < lo < 0.5 < hi < 0.7
    lo0, hi0 = distances.paired_mean_ci(rng.normal(0.0, 1.0, size=400), 200, seed=0)
    assert lo0 < 0 < hi0


def test_distances_and_coverage():
    rng = np.random.default_rng(0)
    d = distances.distances(rng.normal(size=(300, 4)), rng.normal(size=(300, 4)), 10, 100, 20, seed=0)
    assert d["fd_ci"][0] <= d["fd_ci"][1] and d["kid_ci"][0] <= d["kid_ci"][1]
    probs = np.eye(3)[[0, 0, 1, 1]]
    cov = distances.class_coverage(probs, np.array([0.25, 0.25, 0.5]))
    assert cov["class_histogram"] == [0.5, 0.5, 0.0]
    assert cov["class_tv_distance"] == pytest.approx(0.5)
    assert cov["class_kl_divergence"] > 1.0 and cov["mean_confidence"] == 1.0


def test_report_contrasts_reuse_each_models_replicates_and_equal_the_paired_bootstrap():
    from dtm_core.distances import fd_contrast

    rng = np.random.default_rng(4)
    ref = rng.normal(size=(300, 4))
    a, b, c = (rng.normal(loc, 1, size=(200, 4)) for loc in (0.1, 0.3, 0.0))
    fd = distances.frechet_distance
    models = {name: {"features": f} for name, f in (("a", a), ("b", b), ("c", c))}
    ab = fd_contrast(models["a"], models["b"], ref, 40, seed=3)
    boot = {name: distances.bootstrap_replicates(f, ref, fd, 40, 3) for name, f in (("a", a), ("b", b), ("c", c))}
    lo, hi = distances.centred_percentile_ci(boot["a"] - boot["b"], ab["fd"])
    np.testing.assert_allclose(ab["fd_ci"], [lo, hi], rtol=1e-12)
    assert ab["fd"] == pytest.approx(fd(a, ref) - fd(b, ref))
    cached = models["a"]["fd_replicates"][40, 3]
    ac = fd_contrast(models["a"], models["c"], ref, 40, seed=3)
    assert models["a"]["fd_replicates"][40, 3] is cached  # drawn once, shared by a's contrasts
    lo, hi = distances.centred_percentile_ci(boot["a"] - boot["c"], ac["fd"])
    np.testing.assert_allclose(ac["fd_ci"], [lo, hi], rtol=1e-12)
    assert fd_contrast(models["a"], models["b"], ref, 40, seed=4)["fd_ci"] != ab["fd_ci"]  # another draw


def test_fd_replicates_from_counts_equal_fd_of_the_resampled_sets():
    # FrechetToReference.of_resamples weights the features by each resample's counts instead of copying them;
    # both of its routes (feature-pair products for many resamples, a weighted copy each for few) give the FD
    # of the resampled set, far from the origin too (it centres first)
    rng = np.random.default_rng(4)
    feats, ref = rng.normal(50.0, 1.0, size=(300, 6)), rng.normal(50.2, 1.1, size=(250, 6))
    to_ref = distances.FrechetToReference(ref)
    draws = np.random.default_rng(9)
    idx = [draws.integers(0, 300, 300) for _ in range(23)]
    plain = np.array([to_ref(feats[i]) for i in idx])
    np.testing.assert_allclose(plain, [distances.frechet_distance(feats[i], ref) for i in idx], rtol=1e-8)
    counts = [np.bincount(i, minlength=300) for i in idx]
    np.testing.assert_allclose(to_ref.of_resamples(feats, counts), plain, rtol=1e-10)  # 23 resamples > 6 / 2
    np.testing.assert_allclose(to_ref.of_resamples(feats, counts[:2]), plain[:2], rtol=1e-10)  # 2 <= 6 / 2
    # bootstrap_replicates draws the same indices in the same order
    np.testing.assert_allclose(distances.bootstrap_replicates(feats, ref, distances.frechet_distance, 23, seed=9),
                               plain, rtol=1e-10)


def test_bootstrap_replicates_equal_the_plain_loop_whatever_the_threads(monkeypatch):
    # the threaded, chunked replicates of any other statistic are bit for bit the one-resample-at-a-time definition
    rng = np.random.default_rng(4)
    feats, ref = rng.normal(size=(300, 6)), rng.normal(0.2, 1.1, size=(250, 6))
    stat = lambda a, b: distances.kernel_distance(a, b, 3, 50, 1)  # noqa: E731
    draws = np.random.default_rng(9)
    plain = np.array([stat(feats[draws.integers(0, 300, 300)], ref) for _ in range(23)])
    monkeypatch.setenv("DTM_THREADS", "1")
    assert distances.bootstrap_workers() == 1
    assert np.array_equal(distances.bootstrap_replicates(feats, ref, stat, 23, seed=9), plain)
    monkeypatch.setenv("DTM_THREADS", "2")
    threaded = distances.bootstrap_replicates(feats, ref, stat, 23, seed=9, chunk=5)
    assert np.array_equal(threaded, plain)
