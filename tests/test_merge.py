import pytest
import torch

from dtm_core.merge import get_method, merge_files, parameter_distance, task_arithmetic
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
    expected = sum(wi * tv for wi, tv in zip(w, tvs)).apply_to(base)
    for k in base:
        torch.testing.assert_close(merged[k], expected[k])


def test_weight_count_mismatch(tmp_path):
    base, models = _states(2)
    with pytest.raises(ValueError, match="2 task vectors"):
        merge_files(base, _save(tmp_path, base, models), [1.0])


def test_missing_and_mismatched_files(tmp_path):
    base, models = _states(2)
    files = _save(tmp_path, base, models)
    with pytest.raises(FileNotFoundError, match="range-9"):
        merge_files(base, [files[0], tmp_path / "range-9.safetensors"], [0.5, 0.5])
    small = {"w": torch.zeros(2, 2), "b": torch.zeros(4)}
    with pytest.raises(TaskVectorError, match="'w'"):
        merge_files(small, files, [0.5, 0.5])


def test_unknown_method():
    with pytest.raises(ValueError, match="merge.method"):
        get_method("mean")


def test_parameter_distance():
    a = {"x": torch.zeros(4), "n": torch.tensor(3)}
    b = {"x": torch.full((4,), 0.5), "n": torch.tensor(9)}
    assert parameter_distance(a, b) == pytest.approx(1.0)
