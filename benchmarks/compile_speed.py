"""torch.compile and bf16 against eager on this machine: sampling throughput and the DeMe fine-tune step, in one run.

    python benchmarks/compile_speed.py                      # prints a table
    python benchmarks/compile_speed.py --out docs/results/compile_speed.json
    python benchmarks/compile_speed.py --base base/fashion-unet --samples 1000 --repeats 2

Sampling: the default evaluation's path (the shipped digits base, or ``--base``; DPM-Solver++
20 steps, batches of evaluate.batch_size on inference_map's threads) for
``--samples`` samples: eager; the UNet's forward compiled (inductor); compiled
with inductor's ``freezing`` (weights folded in as constants, oneDNN's
pre-packed convolutions: inference only, and stale if the weights change);
eager under bf16 autocast. Compiled runs are timed after a warm-up that
compiles every batch shape.
Training: the DeMe step (projection, consistency loss to the frozen base) as
``make bench`` times it, eager and compiled. Each figure is the best of
``--repeats``; ratios are eager time / the variant's, measured in the same process. A variant's
first-run seconds include its compilation only when inductor's on-disk cache does not already hold
that graph (a second run on the same machine finds it there).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import DIGITS_BASE, ROOT, cpu_model, deme_train, publish, timing_images, timing_recipe

from dtm_core.config import load_params
from dtm_core.model import load_scheduler, load_unet, with_projection
from dtm_core.sampling import initial_noise, sample


def compiled(model):
    model.forward = torch.compile(model.forward, dynamic=False)
    return model


def frozen(model):
    """``model`` compiled with inductor's freezing (set while it compiles, on its first call)."""
    import torch._inductor.config as inductor

    forward = torch.compile(model.forward, dynamic=False)

    def call(*args, **kwargs):
        with inductor.patch(freezing=True):
            return forward(*args, **kwargs)

    model.forward = call
    return model


def bf16(model):
    forward = model.forward

    def call(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(*args, **kwargs)
        out.sample = out.sample.float()
        return out

    model.forward = call
    return model


VARIANTS = {"compiled": compiled, "compiled_freezing": frozen, "bf16_autocast": bf16}


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=40, help="fine-tune steps per timing")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--base", type=Path, default=DIGITS_BASE, help="the UNet to time (default: the digits base)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    params = load_params(ROOT / "params.yaml")
    ev, ft = params.evaluate, timing_recipe(params)
    scheduler = load_scheduler(args.base)
    eager_unet = load_unet(args.base, what="base")
    shape = (eager_unet.config.in_channels, eager_unet.config.sample_size, eager_unet.config.sample_size)
    noise = initial_noise(0, args.samples, shape)

    def sampler(model):
        return lambda: sample([model], scheduler, noise, ev.sampling_steps, sampler=ev.sampler,
                              batch_size=ev.batch_size)

    reference = sampler(eager_unet)()
    t_eager = best(sampler(eager_unet), args.repeats)
    sampling = {"samples": args.samples, "sampler": ev.sampler, "steps": ev.sampling_steps,
                "eager_seconds": t_eager}
    for name, wrap in VARIANTS.items():
        unet = wrap(load_unet(args.base, what="base"))
        start = time.perf_counter()
        out = sampler(unet)()  # compiles, where it compiles
        first = time.perf_counter() - start
        seconds = best(sampler(unet), args.repeats)
        sampling[name] = {"seconds": seconds, "ratio": t_eager / seconds, "first_run_seconds": first,
                          "max_abs_difference": float(np.abs(reference - out).max())}
        print(f"sampling {name}: {t_eager / seconds:.2f}x eager", flush=True)

    images = timing_images(args.base, shape)

    def step(compile_it: bool):
        base = load_unet(args.base, what="base").eval()
        student = with_projection(base, True)
        if compile_it:
            compiled(student)
        return deme_train(student, base, scheduler, images, ft, args.steps).seconds  # the loop's own seconds

    step(False), step(True)  # warm-up, compiling
    s_eager = min(step(False) for _ in range(args.repeats)) / args.steps
    s_comp = min(step(True) for _ in range(args.repeats)) / args.steps
    result = {
        "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "sampling": sampling,
        "finetune_step": {"batch_size": ft.batch_size, "eager_ms": 1000 * s_eager, "compiled_ms": 1000 * s_comp,
                          "ratio": s_eager / s_comp},
        "base": os.path.relpath(args.base, ROOT),
    }
    return publish(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
