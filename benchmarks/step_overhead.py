"""Time one plain fine-tune step against one DeMe step and print the ratio.

plain: the shared baseline's step (no projection, no consistency loss).
DeMe:  channel-wise projection + consistency loss (one extra no-grad forward
       of the frozen pretrained model) + probabilistic timestep sampling.
Target: DeMe/plain <= 1.35. Run: `make bench` (or python benchmarks/step_overhead.py).
"""

from __future__ import annotations

import argparse

import torch
from machine import deme_train, timing_recipe

from dtm_core.config import load_params
from dtm_core.data import load_digits_source
from dtm_core.model import build_scheduler, build_unet, with_projection
from dtm_core.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    params = load_params()
    ft = timing_recipe(params)
    images = torch.as_tensor(load_digits_source().images)
    scheduler = build_scheduler(params.model)
    torch.manual_seed(0)
    base = build_unet(params.model, 8, 1).eval()

    def plain() -> float:
        return train(with_projection(base, False), scheduler, images, ft, seed=0, steps=args.steps).seconds

    def deme() -> float:
        return deme_train(with_projection(base, True), base, scheduler, images, ft, args.steps).seconds

    plain(), deme()  # warm-up
    t_plain = min(plain() for _ in range(args.repeats)) / args.steps
    t_deme = min(deme() for _ in range(args.repeats)) / args.steps
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, threads: {torch.get_num_threads()}, "
          f"batch {ft.batch_size}, {args.steps} steps x {args.repeats} repeats (best)")
    print(f"plain fine-tune step: {1000 * t_plain:.1f} ms")
    print(f"DeMe step:            {1000 * t_deme:.1f} ms")
    print(f"ratio DeMe/plain:     {t_deme / t_plain:.3f}  (target <= 1.35)")


if __name__ == "__main__":
    main()
