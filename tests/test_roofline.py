"""benchmarks/roofline.py: the FLOPs it divides by are a call's convolution and matrix-product FLOPs."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from roofline import counted_flops  # noqa: E402


def test_counted_flops_are_two_per_multiply_add_of_products_and_convolutions():
    linear = torch.nn.Linear(8, 4, bias=False)
    conv = torch.nn.Conv2d(3, 5, kernel_size=3, padding=1, bias=False)
    with torch.no_grad():
        assert counted_flops(lambda: linear(torch.zeros(3, 8))) == 2 * 3 * 8 * 4
        # every output pixel of every output channel: 3 x 3 x 3 multiply-adds
        assert counted_flops(lambda: conv(torch.zeros(2, 3, 6, 6))) == 2 * (2 * 5 * 6 * 6) * (3 * 3 * 3)
        # an activation adds none: the count is a floor on the work a UNet call does
        assert counted_flops(lambda: torch.nn.functional.silu(linear(torch.zeros(3, 8)))) == 2 * 3 * 8 * 4
