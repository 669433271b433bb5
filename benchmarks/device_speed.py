"""Training steps/s and sampling images/s of the default model on whatever device this machine has.

    python benchmarks/device_speed.py                          # fp32 (mixed_precision: "no")
    python benchmarks/device_speed.py --mixed-precision bf16   # Accelerate autocast (GPU)
    DTM_THREADS=1 python benchmarks/device_speed.py --train-only  # one worker's share of the cores

The device is chosen at run time as the pipeline chooses it (CUDA when
present, else the CPU); training goes through the pipeline's own loop
(Accelerate, EMA) with the default fine-tune recipe and the DeMe step
(projection + consistency loss), sampling through the pipeline's DDIM
sampler. Prints one line per figure.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from machine import ROOT, deme_train, timing_recipe

from dtm_core.config import load_params
from dtm_core.data import load_digits_source
from dtm_core.distributed import apply_thread_share
from dtm_core.model import build_scheduler, build_unet, with_projection
from dtm_core.sampling import initial_noise, sample


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--ddim", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--train-only", action="store_true", help="skip the sampling figure")
    args = ap.parse_args()
    apply_thread_share()
    params = load_params(ROOT / "params.yaml")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ft = timing_recipe(params, mixed_precision=args.mixed_precision)
    images = torch.as_tensor(load_digits_source().images)
    scheduler = build_scheduler(params.model)
    torch.manual_seed(0)
    base = build_unet(params.model, 8, 1).eval()

    def run(steps: int):
        return deme_train(with_projection(base, True), base, scheduler, images, ft, steps)
    run(10)  # warm-up: kernels, allocator
    res = run(args.steps)
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu x {torch.get_num_threads()} threads"
    if args.train_only:
        print(f"device {name} | DeMe training {res.steps_per_second:.2f} steps/s (batch {ft.batch_size})")
        return 0
    noise = initial_noise(0, args.samples, (1, 8, 8))
    model = with_projection(base, True)
    sample([model], scheduler, noise[: args.batch_size], 2, batch_size=args.batch_size)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    sample([model], scheduler, noise, args.ddim, batch_size=args.batch_size)
    if device == "cuda":
        torch.cuda.synchronize()
    ips = args.samples / (time.perf_counter() - start)
    print(f"device {name} | mixed_precision {args.mixed_precision} | DeMe training {res.steps_per_second:.1f} "
          f"steps/s (batch {ft.batch_size}) | sampling {ips:.0f} images/s (DDIM {args.ddim}, batch {args.batch_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
