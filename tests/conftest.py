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

# `make test` runs the tests in parallel (pytest-xdist, one worker per core). Each worker, and every
# stage process it starts (DTM_THREADS reaches them through the environment: dtm_core/distributed.py),
# takes its share of the cores: two torch processes with a full share each on two cores run many
# times slower than one.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and not os.environ.get("DTM_THREADS"):
    os.environ["DTM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))
from dtm_core.distributed import thread_share  # noqa: E402  (validates DTM_THREADS as the stages do)

torch.set_num_threads(thread_share() or min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    """Heaviest first, so that parallel workers finish together: the tests marked slow by their
    estimated minutes (``@pytest.mark.slow(minutes=9)``; 1 when not given), then the rest in file order."""

    def cost(item) -> float:
        mark = item.get_closest_marker("slow")
        return -float(mark.kwargs.get("minutes", 1)) if mark else 0.0

    items.sort(key=cost)


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
