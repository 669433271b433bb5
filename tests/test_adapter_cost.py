"""benchmarks/adapter_cost.py: the CPU training-memory count is the peak of live tensor bytes."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from adapter_cost import live_peak_bytes  # noqa: E402

MiB = 2**20


def test_live_peak_counts_tensors_alive_together_not_ones_freed_before_the_next():
    def together():
        a = torch.ones(4 * MiB // 4)  # 4 MiB of float32
        b = torch.ones(4 * MiB // 4)
        return float(a[0] + b[0])

    def one_after_another():
        for _ in range(2):
            a = torch.ones(4 * MiB // 4)
            del a

    both, single = live_peak_bytes(together), live_peak_bytes(one_after_another)
    assert 8 * MiB <= both < 9 * MiB
    assert 4 * MiB <= single < 5 * MiB
