"""benchmarks/antithetic.py: its bootstrap resamples antithetic pairs whole and equals the resampled sets' FDs."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from antithetic import contrast_se  # noqa: E402

from dtm_core.distances import frechet_distance  # noqa: E402


@pytest.mark.parametrize("paired", [False, True])
def test_contrast_se_is_the_spread_of_the_resampled_sets_contrasts(paired):
    rng = np.random.default_rng(1)
    reference = rng.standard_normal((600, 6))
    merged = rng.standard_normal((200, 6))
    shared = merged + 0.2 * rng.standard_normal((200, 6))
    delta, se = contrast_se(merged, shared, reference, 40, paired, seed=5)
    # the same draws, each resample built as a set: a pair (i, i + m) enters together when paired
    draws = np.random.default_rng(5)
    boot = []
    for _ in range(40):
        if paired:
            half = draws.integers(0, 100, 100)
            idx = np.concatenate([half, half + 100])
        else:
            idx = draws.integers(0, 200, 200)
        boot.append(frechet_distance(merged[idx], reference) - frechet_distance(shared[idx], reference))
    assert delta == frechet_distance(merged, reference) - frechet_distance(shared, reference)
    assert se == pytest.approx(np.std(boot, ddof=1), rel=1e-9)
    assert se > 0
