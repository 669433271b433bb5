import os

import pytest

from dtm_core.errors import MissingInputError
from dtm_core.io import OutputError, atomic_dir, atomic_file, read_json, write_json


def test_atomic_dir_success_replaces(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "new").write_text("new")
        assert not (target / "new").exists()
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    with pytest.raises(KeyError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half").write_text("x")
            raise KeyError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_file_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "m.json") as fh:
            fh.write("{")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def test_json_roundtrip_and_nan(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1.5, "nan": float("nan"), "l": (1, 2)})
    assert read_json(tmp_path / "a.json") == {"x": 1.5, "nan": None, "l": [1, 2]}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(MissingInputError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(MissingInputError, match="dvc repro"):
        read_json(tmp_path / "none.json")


def test_output_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "models").write_text("a file where a directory should be")
    with pytest.raises(OutputError, match="cannot create output directory"):
        write_json(tmp_path / "models" / "m.json", {})


def test_unwritable_parent(tmp_path, monkeypatch):
    # root ignores permission bits, so stand in for a read-only mount
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(OutputError, match="not writable"):
        write_json(tmp_path / "m.json", {})
    assert list(tmp_path.iterdir()) == []


def test_outs_get_ordinary_permissions(tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("1")
        with atomic_file(tmp_path / "f.txt") as handle:
            handle.write("2")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644
