"""How close sampling and the DeMe fine-tune step run to this CPU's fp32 matrix-multiply speed, in one run.

    python benchmarks/roofline.py                           # the digits base, prints JSON
    python benchmarks/roofline.py --out docs/results/roofline.json
    python benchmarks/roofline.py --base base/fashion-unet --samples 1000

A speed-up of a UNet call cannot exceed the ratio of the machine's matrix-multiply
rate to the rate the call already reaches. This script measures both:
- the UNet's FLOPs per image and call (torch's FlopCounterMode: convolutions and
  matrix products, the arithmetic that dominates; norms and activations are not counted);
- sampling as the evaluate stage runs it (params.yaml's sampler, steps and batch on
  inference_map's one-thread streams), in images/s and so in GFLOP/s;
- the DeMe step as ``make bench`` times it (student forward and backward, the frozen
  base's forward for the consistency loss), in GFLOP/s;
- the ceiling: a square fp32 matrix product on the same threads (one product per
  stream for sampling's layout, one product on all threads for training's).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from machine import DIGITS_BASE, ROOT, cpu_model, deme_train, publish, timing_images, timing_recipe
from torch.utils.flop_counter import FlopCounterMode

from dtm_core.config import load_params
from dtm_core.model import load_scheduler, load_unet, with_projection
from dtm_core.sampling import initial_noise, sample


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_gflops(streams: int, threads_each: int, size: int = 2048, repeats: int = 10, trials: int = 3) -> float:
    """fp32 GFLOP/s of ``streams`` concurrent square products, each on ``threads_each`` intra-op threads: the
    best of ``trials`` (a ceiling, so the fastest trial is the one least disturbed). The calling thread's own
    thread count is restored afterwards (the warm-up runs on it)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    caller_threads = torch.get_num_threads()

    def run(_):
        torch.set_num_threads(threads_each)
        for _ in range(repeats):
            torch.mm(a, b)

    run(0)  # warm-up
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            list(pool.map(run, range(streams)))
        best = max(best, streams * repeats * 2 * size**3 / (time.perf_counter() - start) / 1e9)
    torch.set_num_threads(caller_threads)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=40, help="fine-tune steps timed")
    ap.add_argument("--base", type=Path, default=DIGITS_BASE, help="the UNet (default: the digits base)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    params = load_params(ROOT / "params.yaml")
    ev, ft = params.evaluate, timing_recipe(params)
    threads = torch.get_num_threads()
    scheduler = load_scheduler(args.base)
    unet = load_unet(args.base, what="base").eval()
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    t = torch.full((1,), 500)
    with torch.inference_mode():
        forward_flops = counted_flops(lambda: unet(torch.zeros(1, *shape), t))

    noise = initial_noise(0, args.samples, shape)
    run = lambda: sample([unet], scheduler, noise, ev.sampling_steps, sampler=ev.sampler,  # noqa: E731
                         batch_size=ev.batch_size)
    run()  # warm-up
    start = time.perf_counter()
    run()
    sample_seconds = time.perf_counter() - start
    images_per_second = args.samples / sample_seconds
    sampling_gflops = images_per_second * ev.sampling_steps * forward_flops / 1e9
    sampling_ceiling = matmul_gflops(streams=threads, threads_each=1)

    images = timing_images(args.base, shape)
    base = load_unet(args.base, what="base").eval()
    student = with_projection(load_unet(args.base, what="base"), True)
    batch, steps = images[: ft.batch_size], torch.full((ft.batch_size,), 500)
    with torch.no_grad():
        teacher_flops = counted_flops(lambda: base(batch, steps))
    step_flops = teacher_flops + counted_flops(lambda: student(batch, steps).sample.square().mean().backward())
    deme_train(student, base, scheduler, images, ft, 5)  # warm-up
    student = with_projection(load_unet(args.base, what="base"), True)
    step_seconds = deme_train(student, base, scheduler, images, ft, args.steps).seconds / args.steps
    training_gflops = step_flops / step_seconds / 1e9
    training_ceiling = matmul_gflops(streams=1, threads_each=threads)

    result = {
        "cpu": cpu_model(), "threads": threads, "torch": torch.__version__, "base": os.path.relpath(args.base, ROOT),
        "forward_gflop_per_image": forward_flops / 1e9,
        "sampling": {
            "sampler": ev.sampler, "steps": ev.sampling_steps, "batch_size": ev.batch_size, "samples": args.samples,
            "images_per_second": images_per_second, "gflops": sampling_gflops,
            "matmul_ceiling_gflops": sampling_ceiling, "fraction_of_ceiling": sampling_gflops / sampling_ceiling,
        },
        "finetune_step": {
            "batch_size": ft.batch_size, "gflop_per_step": step_flops / 1e9, "ms": 1000 * step_seconds,
            "gflops": training_gflops, "matmul_ceiling_gflops": training_ceiling,
            "fraction_of_ceiling": training_gflops / training_ceiling,
        },
    }
    return publish(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
