import pytest
import torch

from dtm_core.task_vector import TaskVector, TaskVectorError


def _state(seed, shapes=None):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"a.weight": (4, 3), "b.bias": (5,)}
    s = {k: torch.randn(v, generator=g) for k, v in shapes.items()}
    s["steps"] = torch.tensor(seed, dtype=torch.long)  # an integer buffer
    return s


def test_roundtrip_theta_plus_tau_is_theta_i():
    base, ft = _state(0), _state(1)
    tv = TaskVector.from_states(base, ft)
    rebuilt = tv.apply_to(base, 1.0)
    for k in ("a.weight", "b.bias"):
        torch.testing.assert_close(rebuilt[k], ft[k], rtol=0, atol=1e-6)
    # integer buffers are skipped by the vector and copied from the base
    assert "steps" not in tv.vector and torch.equal(rebuilt["steps"], base["steps"])


def test_shape_mismatch_names_tensor():
    base = _state(0)
    other = _state(1, {"a.weight": (4, 4), "b.bias": (5,)})
    with pytest.raises(TaskVectorError, match="a.weight"):
        TaskVector.from_states(base, other, what="range model 2")


def test_key_mismatch():
    with pytest.raises(TaskVectorError, match="different tensors"):
        TaskVector.from_states(_state(0), _state(1, {"a.weight": (4, 3)}))


def test_save_load(tmp_path):
    tv = TaskVector.from_states(_state(0), _state(1))
    tv.save(tmp_path / "t.safetensors")
    back = TaskVector.load(tmp_path / "t.safetensors")
    assert back.vector.keys() == tv.vector.keys()
    assert all(torch.equal(back.vector[k], tv.vector[k]) for k in tv.vector)


def test_load_corrupt(tmp_path):
    (tmp_path / "t.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(TaskVectorError, match="corrupt"):
        TaskVector.load(tmp_path / "t.safetensors")
