import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))  # the stages package (not installed: it is the pipeline, not the library)

from tiny_params import tiny_params  # noqa: E402

torch = pytest.importorskip("torch")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def default_params_dict() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.fixture
def tiny_dict(default_params_dict) -> dict:
    return tiny_params(default_params_dict)


@pytest.fixture
def tiny(tiny_dict):
    from dtm_core.config import parse_params

    return parse_params(tiny_dict)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty directory with its own MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("DTM_PARENT_RUN_ID", raising=False)
    return tmp_path
