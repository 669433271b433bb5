"""The partition stage's automatic methods on the tiny profile: snr and gradient affinity."""

import json

import pytest
from stagehelp import built_project, run_stage, write_params


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return built_project(tmp_path_factory, "part", (("prepare", ()), ("pretrain", ())))


def _run(proj, params, monkeypatch, **partition):
    monkeypatch.chdir(proj)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{proj / 'mlflow.db'}")
    write_params(proj, {**params, "partition": {**params["partition"], **partition}})
    assert run_stage("partition") == 0
    return json.loads((proj / "partition" / "ranges.json").read_text())


def test_snr_method_writes_non_uniform_ranges(project, monkeypatch):
    proj, params = project
    out = _run(proj, params, monkeypatch, method="snr", ranges=[0, 1, 2, 3])
    assert out["method"] == "snr" and len(out["ranges"]) == 4
    assert out["ranges"] != [[0, 250], [250, 500], [500, 750], [750, 1000]]
    assert not (proj / "partition" / "analysis" / "affinity.png").exists()


def test_affinity_method_writes_ranges_matrix_and_picture(project, monkeypatch):
    proj, params = project
    out = _run(proj, params, monkeypatch, method="affinity", ranges=[0, 1, 2], bins=10, min_width=2,
               sketch_dim=256, affinity_images=16)
    assert out["method"] == "affinity" and len(out["ranges"]) == 3
    edges = [r[0] for r in out["ranges"]] + [1000]
    assert all(e % 100 == 0 for e in edges) and min(b - a for a, b in zip(edges, edges[1:])) >= 200
    analysis = json.loads((proj / "partition" / "analysis" / "affinity.json").read_text())
    assert len(analysis["affinity"]) == 10 and analysis["score"]["chosen"] >= analysis["score"]["uniform"] - 1e-9
    assert (proj / "partition" / "analysis" / "affinity.png").stat().st_size > 1000
    again = _run(proj, params, monkeypatch, method="affinity", ranges=[0, 1, 2], bins=10, min_width=2,
                 sketch_dim=256, affinity_images=16)
    assert again == out  # seeded: the same split again


def test_explicit_boundaries_win_over_the_method(project, monkeypatch):
    proj, params = project
    out = _run(proj, params, monkeypatch, method="affinity", ranges=[0, 1], boundaries=[0, 300, 1000])
    assert out["method"] == "boundaries" and out["ranges"] == [[0, 300], [300, 1000]]
