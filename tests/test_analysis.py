import json

import pytest
import torch
from PIL import Image

from dtm_core.analysis import layer_of, range_labels, task_vector_stats, write_analysis
from dtm_core.errors import MissingInputError
from dtm_core.task_vector import TaskVector, TaskVectorError

SHAPES = {
    "down.0.conv.weight": (4, 3, 3, 3),
    "down.0.conv.bias": (4,),
    "mid.attn.to_q.weight": (6, 6),
    "out.weight": (2, 4),
}


def _vectors(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{k: (i + 1) * torch.randn(s, generator=g) for k, s in SHAPES.items()} for i in range(n)]


def _save(tmp_path, vectors):
    files = []
    for i, v in enumerate(vectors):
        f = tmp_path / f"range-{i}.safetensors"
        TaskVector(v).save(f)
        files.append(f)
    return files


def _flat(v):
    return torch.cat([v[k].reshape(-1) for k in sorted(v)]).double()


def test_norms_and_cosine_match_direct_computation(tmp_path):
    vectors = _vectors(3)
    stats = task_vector_stats(_save(tmp_path, vectors))
    flats = [_flat(v) for v in vectors]
    assert stats["num_vectors"] == 3
    for i, f in enumerate(flats):
        assert stats["total_norm"][i] == pytest.approx(float(f.norm()), rel=1e-9)
        for key, t in vectors[i].items():
            assert stats["per_tensor"][key][i] == pytest.approx(float(t.double().norm()), rel=1e-9)
        for j, g in enumerate(flats):
            expected = float(torch.nn.functional.cosine_similarity(f, g, dim=0))
            assert stats["cosine"][i][j] == pytest.approx(expected, abs=1e-9)
    conv = torch.cat([vectors[1]["down.0.conv.weight"].reshape(-1), vectors[1]["down.0.conv.bias"]]).double()
    assert stats["per_layer"]["down.0.conv"][1] == pytest.approx(float(conv.norm()), rel=1e-9)
    assert set(stats["per_layer"]) == {"down.0.conv", "mid.attn.to_q", "out"}


def test_cosine_with_itself_and_its_negative(tmp_path):
    v = _vectors(1)[0]
    stats = task_vector_stats(_save(tmp_path, [v, {k: -t for k, t in v.items()}, {k: 3 * t for k, t in v.items()}]))
    c = stats["cosine"]
    assert c[0][0] == pytest.approx(1.0) and c[1][1] == pytest.approx(1.0)
    assert c[0][1] == pytest.approx(-1.0) and c[1][0] == pytest.approx(-1.0)
    assert c[0][2] == pytest.approx(1.0)
    assert stats["total_norm"][2] == pytest.approx(3 * stats["total_norm"][0])


def test_layer_of():
    assert layer_of("down_blocks.0.resnets.1.conv1.weight") == "down_blocks.0.resnets.1.conv1"
    assert layer_of("scale") == "scale"


def test_range_labels():
    assert range_labels(2, [(0, 500), (500, 1000)]) == ["[0, 500)", "[500, 1000)"]
    assert range_labels(2) == ["range 0", "range 1"]
    with pytest.raises(TaskVectorError, match="3 timestep ranges for 2 task vectors"):
        range_labels(2, [(0, 1), (1, 2), (2, 3)])


def test_mismatched_and_missing_files(tmp_path):
    files = _save(tmp_path, _vectors(2))
    TaskVector({"other": torch.zeros(3)}).save(tmp_path / "odd.safetensors")
    with pytest.raises(TaskVectorError, match="odd.safetensors"):
        task_vector_stats([files[0], tmp_path / "odd.safetensors"])
    with pytest.raises(MissingInputError, match="range-7"):
        task_vector_stats([files[0], tmp_path / "range-7.safetensors"])


def test_write_analysis_writes_pngs_and_json(tmp_path):
    vectors = _vectors(4)
    vectors[3] = {k: torch.zeros_like(t) for k, t in vectors[3].items()}  # an all-zero task vector
    ranges = [(0, 250), (250, 500), (500, 750), (750, 1000)]
    out = tmp_path / "analysis"
    stats = write_analysis(_save(tmp_path, vectors), ranges, out)
    for name in ("tv_norms.png", "tv_layer_heatmap.png", "tv_cosine.png"):
        with Image.open(out / name) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0
    data = json.loads((out / "cosine.json").read_text())
    assert data["labels"][0] == "[0, 250)" and data["ranges"][3] == [750, 1000]
    assert data["cosine"][0][0] == pytest.approx(1.0)
    assert data["cosine"][3][0] is None  # undefined for the zero vector
    assert stats["total_norm"][3] == 0.0
    assert sorted(p.name for p in out.iterdir()) == [
        "cosine.json", "tv_cosine.png", "tv_layer_heatmap.png", "tv_norms.png"]


def test_write_analysis_checks_ranges_first(tmp_path):
    with pytest.raises(TaskVectorError, match="2 timestep ranges for 3 task vectors"):
        write_analysis(_save(tmp_path, _vectors(3)), [(0, 1), (1, 2)], tmp_path / "out")
    assert not (tmp_path / "out").exists()
