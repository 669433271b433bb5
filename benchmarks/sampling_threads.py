"""Sampling images/s on CPU: one stream of batches over all cores (torch's intra-op threads) against
one stream per core with one thread each (dtm_core.distributed.inference_map, what the pipeline does).

    python benchmarks/sampling_threads.py                    # the shipped base model, 2000 samples, DDIM 20
    python benchmarks/sampling_threads.py --samples 4000 --ddim 50

Prints images/s for both and whether the pipeline's samples are bit-identical with one worker and with
all of them (they are computed with one intra-op thread either way). Run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dtm_core.model import load_scheduler, load_unet  # noqa: E402
from dtm_core.sampling import initial_noise, sample, sampling_scheduler  # noqa: E402


@torch.inference_mode()
def one_stream(model, train_scheduler, noise: torch.Tensor, steps: int, batch_size: int) -> torch.Tensor:
    """The sampler before inference_map: batches one after another, each over all intra-op threads."""
    out = []
    for start in range(0, len(noise), batch_size):
        scheduler = sampling_scheduler(train_scheduler, steps)
        x = noise[start : start + batch_size]
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t).sample, t, x).prev_sample
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "base" / "digits-unet"))
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--ddim", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=500)
    args = ap.parse_args()
    model, scheduler = load_unet(args.model, what="benchmark model").eval(), load_scheduler(args.model)
    cfg = model.config
    noise = initial_noise(0, args.samples, (cfg.in_channels, cfg.sample_size, cfg.sample_size))
    cores = torch.get_num_threads()
    print(f"cpu threads: {cores}, samples: {args.samples}, DDIM steps: {args.ddim}, batch: {args.batch_size}")
    one_stream(model, scheduler, noise[: args.batch_size], 2, args.batch_size)  # warm-up
    start = time.perf_counter()
    one_stream(model, scheduler, noise, args.ddim, args.batch_size)
    old = args.samples / (time.perf_counter() - start)
    print(f"one stream, {cores} intra-op threads: {old:.1f} images/s")
    start = time.perf_counter()
    parallel = sample([model], scheduler, noise, args.ddim, batch_size=args.batch_size, desc="streams")
    new = args.samples / (time.perf_counter() - start)
    print(f"{cores} streams, 1 thread each (the pipeline): {new:.1f} images/s ({new / old:.2f}x)")
    torch.set_num_threads(1)
    single = sample([model], scheduler, noise, args.ddim, batch_size=args.batch_size, desc="one worker")
    torch.set_num_threads(cores)
    print(f"pipeline samples identical with 1 and {cores} workers: {bool((single == parallel).all())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
