import pytest
import torch

from dtm_core.errors import MissingInputError
from dtm_core.merge import (
    METHODS,
    dare_linear,
    magnitude_prune,
    merge_files,
    merge_tensor,
    parameter_distance,
    task_arithmetic,
    ties,
)
from dtm_core.task_vector import TaskVector, TaskVectorError


def _states(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(4, generator=g)}
    models = [{k: v + 0.1 * (i + 1) * torch.randn(v.shape, generator=g) for k, v in base.items()} for i in range(n)]
    return base, models


def _save(tmp_path, base, models):
    files = []
    for i, m in enumerate(models):
        f = tmp_path / f"range-{i}.safetensors"
        TaskVector.from_states(base, m).save(f)
        files.append(f)
    return files


def test_a_soup_of_one_model_is_that_model(tmp_path):
    base, models = _states(1)
    soup = merge_files(base, _save(tmp_path, base, models), [1.0])
    for k in base:
        torch.testing.assert_close(soup[k], models[0][k], atol=1e-6, rtol=0)


def test_scaling_the_shared_task_vector_by_one_gives_the_shared_model_and_by_zero_the_base():
    base, (shared,) = _states(1)
    tau = TaskVector.from_states(base, shared)
    one, zero = tau.apply_to(base, scale=1.0), tau.apply_to(base, scale=0.0)
    for k in base:
        torch.testing.assert_close(one[k], shared[k], atol=1e-6, rtol=0)
        torch.testing.assert_close(zero[k], base[k], atol=0, rtol=0)


def test_task_arithmetic_weighted_sum():
    taus = torch.stack([torch.ones(3), 2 * torch.ones(3), 4 * torch.ones(3)])
    out = task_arithmetic(taus, torch.tensor([0.5, 0.25, 0.125]))
    torch.testing.assert_close(out, torch.full((3,), 1.5))


@pytest.mark.parametrize("which", [0, 1, 2, 3])
def test_one_hot_weights_reproduce_the_range_model(tmp_path, which):
    base, models = _states(4)
    files = _save(tmp_path, base, models)
    w = [0.0] * 4
    w[which] = 1.0
    merged = merge_files(base, files, w)
    for k in base:
        torch.testing.assert_close(merged[k], models[which][k], rtol=0, atol=1e-6)


def test_uniform_weights_average(tmp_path):
    base, models = _states(3)
    merged = merge_files(base, _save(tmp_path, base, models), [1 / 3] * 3)
    for k in base:
        torch.testing.assert_close(merged[k], sum(m[k] for m in models) / 3)


def test_streaming_equals_in_memory(tmp_path):
    base, models = _states(4)
    w = [0.1, 0.1, 0.2, 0.5]
    merged = merge_files(base, _save(tmp_path, base, models), w)
    tvs = [TaskVector.from_states(base, m) for m in models]
    for k in base:
        torch.testing.assert_close(merged[k], base[k] + sum(wi * tv.vector[k] for wi, tv in zip(w, tvs)))


def test_missing_and_mismatched_files(tmp_path):
    base, models = _states(2)
    files = _save(tmp_path, base, models)
    with pytest.raises(MissingInputError, match="range-9"):
        merge_files(base, [files[0], tmp_path / "range-9.safetensors"], [0.5, 0.5])
    small = {"w": torch.zeros(2, 2), "b": torch.zeros(4)}
    with pytest.raises(TaskVectorError, match="'w'"):
        merge_files(small, files, [0.5, 0.5])


def test_parameter_distance():
    a = {"x": torch.zeros(4), "n": torch.tensor(3)}
    b = {"x": torch.full((4,), 0.5), "n": torch.tensor(9)}
    assert parameter_distance(a, b) == pytest.approx(1.0)


# ---------------------------------------------------------------- merge methods


def _taus(n=3, shape=(5, 7), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.tensor([0.5, -0.25, 1.5, 0.75][:n])


def test_task_arithmetic_by_hand():
    taus = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    assert torch.equal(task_arithmetic(taus, torch.tensor([0.5, 2.0])), torch.tensor([6.5, -7.0]))


def test_ties_by_hand():
    taus = torch.tensor(
        [
            [3.0, -1.0, 0.5, 2.0],  # trimmed to [3, 0, 0, 2]
            [-2.0, 4.0, 1.0, -0.5],  # trimmed to [-2, 4, 0, 0]
            [2.5, -3.0, -0.2, 0.1],  # trimmed to [2.5, -3, 0, 0]
        ]
    )
    # elected signs from the trimmed sum [3.5, 1, 0, 2]: + + + +; entry 2 has no agreeing entry.
    # entry 0: (1*3 + 2*2.5) / 2; entry 1: 0.5*4 / 1; entry 2: 0; entry 3: 1*2 / 1
    out = ties(taus, torch.tensor([1.0, 0.5, 2.0]), density=0.5)
    torch.testing.assert_close(out, torch.tensor([4.0, 2.0, 0.0, 2.0]))


def test_magnitude_prune_keeps_top_fraction():
    tau = torch.tensor([[0.1, -0.9, 0.3, 0.05, -0.7, 0.2, 0.6, -0.4, 0.8, -0.01]])
    out = magnitude_prune(tau, torch.tensor([2.0]), density=0.3)
    expected = torch.zeros(10)
    expected[[1, 4, 8]] = 2.0 * tau[0, [1, 4, 8]]
    assert torch.equal(out, expected)
    assert int((out != 0).sum()) == 3


def test_dare_density_one_is_task_arithmetic():
    taus, w = _taus()
    torch.testing.assert_close(dare_linear(taus, w, density=1.0), task_arithmetic(taus, w), rtol=0, atol=1e-6)


def test_dare_linear_drops_and_rescales():
    taus = torch.ones(1, 4000)
    out = merge_tensor(taus, torch.tensor([1.0]), "dare_linear", density=0.25, seed=3, key="k")
    kept = out != 0
    assert torch.all(out[kept] == 4.0)
    assert 0.2 < kept.float().mean() < 0.3


def test_ties_elects_the_sign_by_mass():
    # one large positive entry against two small negative ones: the summed mass
    # elects + (a count of signs would elect -); only the agreeing entries are averaged
    taus = torch.tensor([[5.0], [-1.0], [-2.0]])
    assert torch.equal(ties(taus, torch.ones(3), density=1.0), torch.tensor([5.0]))


def test_ties_and_magnitude_prune_keep_int_density_times_numel():
    tau = torch.arange(1.0, 8.0).view(1, 7)  # int(0.5 * 7) = 3 entries survive: 5, 6, 7
    expected = torch.tensor([0.0, 0, 0, 0, 5, 6, 7])
    assert torch.equal(magnitude_prune(tau, torch.ones(1), density=0.5), expected)
    assert torch.equal(ties(tau, torch.ones(1), density=0.5), expected)
    assert torch.equal(magnitude_prune(torch.ones(1, 1), torch.ones(1), density=0.5), torch.zeros(1))


def test_dare_ties_averages_the_kept_rescaled_entries():
    # all taus 1: every kept entry is 1/density and agrees with the + sign, so
    # each output entry is 1/density where any model kept it and 0 where none did
    taus, density = torch.ones(3, 20000), 0.4
    out = merge_tensor(taus, torch.ones(3), "dare_ties", density=density, seed=2, key="k")
    assert set(out.unique().tolist()) <= {0.0, 1 / density}
    assert abs(float((out == 0).float().mean()) - (1 - density) ** 3) < 0.01
    # dare_linear sums instead: 0..3 kept entries of 1/density each
    lin = merge_tensor(taus, torch.ones(3), "dare_linear", density=density, seed=2, key="k")
    torch.testing.assert_close(lin.mean(), torch.tensor(3.0), atol=0.05, rtol=0)


def test_density_one_prunes_nothing():
    taus, w = _taus()
    assert torch.equal(magnitude_prune(taus, w, density=1.0), task_arithmetic(taus, w))
    for method in ("ties", "dare_ties"):
        assert torch.equal(merge_tensor(taus, w, method, density=1.0, seed=1, key="k"), ties(taus, w, density=1.0))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_reproducible_per_seed_and_key(method):
    taus, w = _taus()
    a = merge_tensor(taus, w, method, seed=5, key="w")
    torch.rand(100)  # the global stream must not matter ...
    b = merge_tensor(taus, w, method, seed=5, key="w")
    assert torch.equal(a, b)
    assert not torch.equal(a, merge_tensor(taus, w, method, seed=6, key="w"))
    assert not torch.equal(a, merge_tensor(taus, w, method, seed=5, key="b"))


def test_merge_leaves_global_rng_alone():
    taus, w = _taus()
    state = torch.random.get_rng_state()
    merge_tensor(taus, w, "dare_ties", seed=1, key="w")
    assert torch.equal(torch.random.get_rng_state(), state)


def test_dare_merge_files_reproducible_and_order_free(tmp_path):
    base, models = _states(3)
    files = _save(tmp_path, base, models)
    w = [0.3, 0.3, 0.4]
    a = merge_files(base, files, w, "dare_ties", density=0.5, seed=7)
    b = merge_files(base, files, w, "dare_ties", density=0.5, seed=7)
    c = merge_files(base, files, w, "dare_ties", density=0.5, seed=8)
    assert all(torch.equal(a[k], b[k]) for k in base)
    assert any(not torch.equal(a[k], c[k]) for k in base)
    # each tensor depends only on (seed, key), not on which tensors were merged before it
    taus = torch.stack([TaskVector.from_states(base, m).vector["w"] for m in models])
    alone = merge_tensor(taus, torch.tensor(w), "dare_ties", density=0.5, seed=7, key="w")
    assert torch.equal(a["w"], (base["w"] + alone).to(base["w"].dtype))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_scale_multiplies_the_combined_task_vector(tmp_path, method):
    base, models = _states(3)
    files = _save(tmp_path, base, models)
    w = [0.2, 0.3, 0.5]
    one = merge_files(base, files, w, method, density=0.6, seed=2)
    half = merge_files(base, files, w, method, density=0.6, scale=0.5, seed=2)
    for k in base:
        torch.testing.assert_close(half[k] - base[k], 0.5 * (one[k] - base[k]), rtol=1e-5, atol=1e-6)


def test_ties_merge_files_matches_per_tensor(tmp_path):
    base, models = _states(3)
    files = _save(tmp_path, base, models)
    w = torch.tensor([1.0, 0.5, 0.25])
    merged = merge_files(base, files, w.tolist(), "ties", density=0.3)
    for k in base:
        taus = torch.stack([TaskVector.from_states(base, m).vector[k] for m in models])
        torch.testing.assert_close(merged[k], base[k] + ties(taus, w, density=0.3), rtol=0, atol=1e-6)


def test_no_task_vectors():
    with pytest.raises(MissingInputError, match="no task vector files"):
        merge_files({"w": torch.zeros(2)}, [], [])
