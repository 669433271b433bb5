"""Channels-last against contiguous weights: the UNet's time per call, sampling and training.

    python benchmarks/conv_layout.py                    # the shipped base model (base/digits-unet)
    python benchmarks/conv_layout.py --model models/shared --repeats 20 --out docs/results/conv_layout.json

dtm_core.model.compute_layout holds a UNet's 4-d weights channels-last while
it trains and samples. This prints what that buys on this machine: the
median milliseconds of one forward pass of a sampling batch (no grad) on one
thread (as each of distributed.inference_map's streams runs it) and on all of
the process's threads, and of one training step (forward, backward, AdamW) on
a training batch, for each layout; and how far the outputs move (the kernels
differ, the weights' values do not). Run it alone: another job on the cores
spoils the timings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dtm_core.io import write_json  # noqa: E402
from dtm_core.model import compute_layout, load_unet  # noqa: E402


def _median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(model_dir: str, layout: str, sample_batch, train_batch, repeats: int, threads: int):
    """Median ms of a sampling forward (1 thread, ``threads``) and a training step with ``layout``; and one output."""
    net = load_unet(model_dir, "benchmark model").eval()
    if layout == "channels_last":
        compute_layout(net)
    x, t = sample_batch
    xt, tt = train_batch

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return net(x, t).sample

    output = forward()
    row = {"forward_ms_all_threads": _median_ms(forward, repeats)}
    torch.set_num_threads(1)
    row["forward_ms_one_thread"] = _median_ms(forward, repeats)
    torch.set_num_threads(threads)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)

    def step() -> None:
        loss = (net(xt, tt).sample - xt).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    row["train_step_ms"] = _median_ms(step, repeats)
    return row, output


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "base" / "digits-unet"))
    ap.add_argument("--sample-batch", type=int, default=500, help="evaluate.batch_size")
    ap.add_argument("--train-batch", type=int, default=128, help="finetune.batch_size")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", type=Path, default=None, help="also write the figures here (JSON)")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    base = load_unet(args.model, "benchmark model")
    size, channels = base.config.sample_size, base.config.in_channels
    x = torch.randn(args.sample_batch, channels, size, size, generator=gen)
    t = torch.full((args.sample_batch,), 500)
    xt = torch.randn(args.train_batch, channels, size, size, generator=gen)
    tt = torch.randint(0, 1000, (args.train_batch,), generator=gen)

    results: dict = {"model": args.model, "threads": threads, "sample_batch": args.sample_batch,
                     "train_batch": args.train_batch, "repeats": args.repeats, "layouts": {}}
    outputs = {}
    for layout in ("contiguous", "channels_last"):
        row, outputs[layout] = measure(args.model, layout, (x, t), (xt, tt), args.repeats, threads)
        results["layouts"][layout] = row
        print(f"{layout:>13}: forward of {args.sample_batch} {row['forward_ms_one_thread']:.1f} ms on 1 thread, "
              f"{row['forward_ms_all_threads']:.1f} ms on {threads}; train step of {args.train_batch} "
              f"{row['train_step_ms']:.1f} ms", flush=True)
    plain, fast = results["layouts"]["contiguous"], results["layouts"]["channels_last"]
    results["speedup"] = {k: plain[k] / fast[k] for k in plain}
    results["max_abs_output_difference"] = float((outputs["contiguous"] - outputs["channels_last"]).abs().max())
    print("speed-up: " + ", ".join(f"{k} {v:.2f}x" for k, v in results["speedup"].items())
          + f"; outputs differ by at most {results['max_abs_output_difference']:.1e}")
    if args.out:
        write_json(args.out, results)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
