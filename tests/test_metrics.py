import numpy as np
import pytest

from dtm_core.config import ClassifierConfig
from dtm_core.data import load_digits_source, split
from dtm_core.distances import frechet_distance, kernel_distance, memorisation, nearest_distances
from dtm_core.errors import MissingInputError
from dtm_core.features import extract_features, load_classifier, save_classifier, train_classifier


def _gauss(n, d, shift=0.0, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def test_fd_of_a_set_with_itself_is_zero():
    x = _gauss(500, 8)
    assert abs(frechet_distance(x, x)) < 1e-6


def test_fd_sees_a_mean_shift():
    a, b = _gauss(4000, 4, seed=0), _gauss(4000, 4, shift=1.0, seed=1)
    # ||mu_a - mu_b||^2 = 4 for a unit shift in 4 dims; covariances equal
    assert frechet_distance(a, b) == pytest.approx(4.0, abs=0.3)
    assert frechet_distance(a, _gauss(4000, 4, seed=2)) < 0.05


def test_fd_is_clean_fids_formula_and_runs_on_a_scipy_without_sqrtm_disp(monkeypatch):
    """clean-fid calls sqrtm(..., disp=False), which scipy 1.18 removed (seen on a GPU machine):
    our FD is clean-fid's number bit for bit (clean-fid run under the old sqrtm API, so this test
    holds on any scipy), and needs no disp."""
    import scipy.linalg
    from cleanfid.fid import frechet_distance as clean_fid_fd

    from dtm_core.distances import feature_stats

    pairs = [(_gauss(300, 12, seed=s) * (1 + s / 4), _gauss(450, 12, shift=0.2 * s, seed=s + 9)) for s in range(4)]
    real_sqrtm = scipy.linalg.sqrtm

    def sqrtm_with_disp(a, disp=True):  # the old API clean-fid calls, on any scipy: (root, error estimate)
        return (real_sqrtm(a), 0.0) if disp is False else real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", sqrtm_with_disp)
    theirs = [float(clean_fid_fd(*feature_stats(a), *feature_stats(b))) for a, b in pairs]
    assert [frechet_distance(a, b) for a, b in pairs] == theirs

    def sqrtm_without_disp(a, **kwargs):
        if kwargs:
            raise TypeError(f"sqrtm() got an unexpected keyword argument {next(iter(kwargs))!r}")
        return real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", sqrtm_without_disp)
    assert [frechet_distance(a, b) for a, b in pairs] == theirs


def test_fd_needs_more_samples_than_dims():
    with pytest.raises(ValueError, match="more samples than feature dimensions"):
        frechet_distance(_gauss(10, 16), _gauss(100, 16))


def test_kid_is_seeded_and_near_zero_for_same_distribution():
    a, b = _gauss(600, 8, seed=0), _gauss(600, 8, seed=1)
    k1 = kernel_distance(a, b, 20, 200, seed=3)
    assert k1 == kernel_distance(a, b, 20, 200, seed=3)
    assert k1 == kernel_distance(a, b, 20, 200, seed=3, workers=3)  # threads sum the subsets in draw order
    assert abs(k1) < 0.05
    assert kernel_distance(a, _gauss(600, 8, shift=2.0), 20, 200, seed=3) > 10 * max(abs(k1), 1e-3)


def test_frechet_to_reference_is_clean_fids_fd():
    from dtm_core.distances import FrechetToReference

    ref = _gauss(700, 16, seed=1)
    to_ref = FrechetToReference(ref)
    for shift, seed in ((0.0, 2), (0.3, 3), (2.0, 4)):
        feats = _gauss(900, 16, shift=shift, seed=seed)
        assert to_ref(feats) == pytest.approx(frechet_distance(feats, ref), rel=1e-8, abs=1e-12)
    # a correlated, anisotropic reference: R S1 R is not diagonal
    rng = np.random.default_rng(5)
    mix = rng.normal(size=(16, 16))
    corr_ref, corr = _gauss(800, 16, seed=6) @ mix, _gauss(900, 16, shift=0.2, seed=7) @ mix.T
    assert FrechetToReference(corr_ref)(corr) == pytest.approx(frechet_distance(corr, corr_ref), rel=1e-8)


def test_kid_reference_sums_cached_across_calls_give_the_same_numbers():
    from dtm_core.distances import bootstrap_replicates

    a, b = _gauss(500, 8, seed=0), _gauss(400, 8, shift=0.2, seed=1)
    sums: dict = {}
    assert kernel_distance(a, b, 6, 150, seed=2, b_sums=sums) == kernel_distance(a, b, 6, 150, seed=2)
    assert len(sums) == 6  # one per reference subset
    # the bootstrap's replicates draw the same reference subsets in every round: cached once, same replicates
    cached = bootstrap_replicates(a, b, lambda x, y: kernel_distance(x, y, 6, 150, 2, b_sums=sums), 7, seed=4)
    plain = bootstrap_replicates(a, b, lambda x, y: kernel_distance(x, y, 6, 150, 2), 7, seed=4)
    assert len(sums) == 6 and (cached == plain).all()


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_kid_is_clean_fids_estimator_and_leaves_numpys_random_state_alone(dtype, rtol):
    from cleanfid.fid import kernel_distance as clean_fid_kid

    a, b = _gauss(900, 16, seed=0).astype(dtype), _gauss(700, 16, shift=0.3, seed=1).astype(dtype)
    np.random.seed(11)
    before = np.random.get_state()[1].copy()
    ours = kernel_distance(a, b, 7, 300, seed=5)
    assert (np.random.get_state()[1] == before).all()
    np.random.seed(5)
    assert ours == pytest.approx(clean_fid_kid(a, b, num_subsets=7, max_subset_size=300), rel=rtol)


@pytest.fixture(scope="module")
def trained():
    ds = load_digits_source()
    tr, ho = split(ds, 0.2, seed=0)
    cfg = ClassifierConfig(steps=300, feature_dim=32)
    res = train_classifier(tr.images, tr.labels, ho.images, ho.labels, 10, cfg, 0)
    return res, tr, ho


def test_classifier_learns_digits_and_features_are_alive(trained):
    res, tr, ho = trained
    assert res.heldout_accuracy > 0.85
    assert res.dead_feature_fraction == 0.0
    feats = extract_features(res.model, ho.images)
    assert feats.shape == (len(ho), 32)
    # real-vs-real floor is far below real-vs-noise
    noise = np.random.default_rng(0).uniform(-1, 1, size=(len(ho), 1, 8, 8)).astype(np.float32)
    floor = frechet_distance(feats, extract_features(res.model, tr.images))
    noisy = frechet_distance(extract_features(res.model, noise), extract_features(res.model, tr.images))
    assert noisy > 10 * floor


def test_classifier_save_load(tmp_path, trained):
    res, _, ho = trained
    save_classifier(res.model, tmp_path / "c")
    back = load_classifier(tmp_path / "c")
    np.testing.assert_array_equal(extract_features(back, ho.images), extract_features(res.model, ho.images))
    with pytest.raises(MissingInputError, match="dvc repro classifier"):
        load_classifier(tmp_path / "missing")


def test_nearest_distances_match_brute_force():
    rng = np.random.default_rng(0)
    q, bank = rng.normal(size=(37, 2, 3)), rng.normal(size=(11, 2, 3))
    brute = np.array([min(np.linalg.norm(a.ravel() - b.ravel()) for b in bank) for a in q])
    np.testing.assert_allclose(nearest_distances(q, bank, batch_size=5), brute, rtol=1e-9, atol=1e-9)


def test_memorisation_tells_copies_from_fresh_draws():
    rng = np.random.default_rng(1)
    train, heldout = rng.normal(size=(300, 6)), rng.normal(size=(200, 6))
    fresh = rng.normal(size=(400, 6))
    copies = train[rng.integers(0, 300, 400)] + rng.normal(scale=1e-3, size=(400, 6))
    m_fresh = memorisation(fresh, heldout, train, percentile=5.0)
    m_copy = memorisation(copies, heldout, train, percentile=5.0)
    # a fresh draw from the same distribution is as close as held-out data: about 5% below the 5th percentile
    assert 0.0 < m_fresh["memorised_fraction"] < 0.15
    assert m_copy["memorised_fraction"] == 1.0
    assert m_copy["sample_nn_median"] < 0.01 < m_fresh["sample_nn_median"]
    half = np.concatenate([fresh[:200], copies[:200]])
    assert memorisation(half, heldout, train, 5.0)["memorised_fraction"] == pytest.approx(
        0.5 + m_fresh["memorised_fraction"] / 2, abs=0.05)
