"""How FD's noise falls with the number of samples, whether DDIM steps change the ranking, and images/s.

    python benchmarks/eval_power.py                        # on the workspace's models (after dvc repro)
    python benchmarks/eval_power.py --pool 32000 --sizes 1000 2000 4000 8000 16000

Run after ``dvc repro``: it reads models/{pretrained,shared,merged}, the range
models and the feature classifier. Three measurements:

1. **Noise against sample count.** Each model is sampled once on a pool of
   ``--pool`` initial noises (DDIM ``--ddim``; the noise is iid, so disjoint
   chunks of the pool are independent noise seeds). For each size n the pool
   is cut into pool/n disjoint chunks and FD, and the paired differences
   merged - shared and merged - pretrained (same chunk for both: common random
   numbers), are computed per chunk: their spread across chunks is the
   sampling noise at n, beside the 95% paired-bootstrap half-width on one chunk.
2. **Ranking against DDIM steps.** FD of every model (the ensemble too) on
   the first ``--rank-samples`` noises at each of ``--rank-steps``.
3. **Throughput.** Images per second of one model at several batch sizes.

Prints a table per measurement and writes docs/results/eval_power.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dtm_core import distances, features  # noqa: E402
from dtm_core.io import write_json  # noqa: E402
from dtm_core.model import load_scheduler, load_unet  # noqa: E402
from dtm_core.partition import load_partition  # noqa: E402
from dtm_core.sampling import initial_noise, sample  # noqa: E402
from dtm_core.seeding import derive_seed  # noqa: E402
from stages.common import CLASSIFIER_DIR, PARTITION_FILE, load_reference, range_dir  # noqa: E402


def models():
    ranges, _ = load_partition(PARTITION_FILE)
    out = {m: ([load_unet(Path("models") / m, what=m)], None) for m in ("pretrained", "shared", "merged")}
    out["ensemble"] = ([load_unet(range_dir(i)) for i in range(len(ranges))], ranges)
    return out, load_scheduler(Path("models/pretrained"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", type=int, default=32000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 4000, 8000, 16000])
    ap.add_argument("--ddim", type=int, default=20)
    ap.add_argument("--rank-samples", type=int, default=8000)
    ap.add_argument("--rank-steps", type=int, nargs="+", default=[10, 20, 50])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[250, 500, 1000, 2000])
    ap.add_argument("--bootstrap", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "eval_power.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    nets, scheduler = models()
    clf = features.load_classifier(CLASSIFIER_DIR / "classifier")
    ref = load_reference()["train_classifier"]
    fd = distances.frechet_distance
    shape = tuple(nets["shared"][0][0].config[k] for k in ("in_channels", "sample_size", "sample_size"))
    # an evaluation seed of its own: neither the test nor the validation noise
    pool_noise = initial_noise(derive_seed(0, "eval-power-pool"), args.pool, shape)
    result: dict = {"pool": args.pool, "ddim_steps": args.ddim, "noise": [], "ranking": [], "throughput": []}

    feats = {}
    for name in ("pretrained", "shared", "merged"):
        start = time.perf_counter()
        images = sample(nets[name][0], scheduler, pool_noise, args.ddim, batch_size=1000, desc=f"pool {name}")
        feats[name] = features.extract_features(clf, images)
        print(f"sampled {args.pool} from {name} in {time.perf_counter() - start:.0f}s", flush=True)
    print(f"\n1. noise against samples (DDIM {args.ddim}; spread over disjoint chunks of the pool)")
    print(f"{'n':>6} {'chunks':>6} {'FD(shared) sd':>14} {'merged-shared sd':>17} {'merged-pre sd':>14} "
          f"{'paired CI half-width':>21}")
    for n in args.sizes:
        chunks = [slice(i * n, (i + 1) * n) for i in range(args.pool // n)]
        fd_shared = [fd(feats["shared"][c], ref) for c in chunks]
        d_ms = [fd(feats["merged"][c], ref) - fd(feats["shared"][c], ref) for c in chunks]
        d_mp = [fd(feats["merged"][c], ref) - fd(feats["pretrained"][c], ref) for c in chunks]
        first = chunks[0]
        lo, hi = distances.bootstrap_ci(feats["merged"][first], ref, fd, args.bootstrap, seed=1, estimate=d_ms[0],
                                        paired_with=feats["shared"][first])
        row = {"n": n, "chunks": len(chunks), "fd_shared_mean": float(np.mean(fd_shared)),
               "fd_shared_sd": float(np.std(fd_shared, ddof=1)) if len(chunks) > 1 else None,
               "merged_minus_shared_mean": float(np.mean(d_ms)),
               "merged_minus_shared_sd": float(np.std(d_ms, ddof=1)) if len(chunks) > 1 else None,
               "merged_minus_pretrained_sd": float(np.std(d_mp, ddof=1)) if len(chunks) > 1 else None,
               "paired_ci_half_width": (hi - lo) / 2}
        result["noise"].append(row)
        sd = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"{n:>6} {len(chunks):>6} {sd(row['fd_shared_sd']):>14} {sd(row['merged_minus_shared_sd']):>17} "
              f"{sd(row['merged_minus_pretrained_sd']):>14} {row['paired_ci_half_width']:>21.4f}", flush=True)

    print(f"\n2. FD by DDIM steps ({args.rank_samples} samples, the same noise for every model)")
    rank_noise = pool_noise[: args.rank_samples]
    for steps in args.rank_steps:
        row = {"ddim_steps": steps}
        for name, (net, ranges) in nets.items():
            images = sample(net, scheduler, rank_noise, steps, ranges=ranges, batch_size=1000,
                            desc=f"{name} DDIM {steps}")
            row[name] = fd(features.extract_features(clf, images), ref)
        row["order"] = sorted(nets, key=lambda m: row[m])
        result["ranking"].append(row)
        print(f"DDIM {steps:>3}: " + "  ".join(f"{m} {row[m]:.4f}" for m in nets) + f"   order {row['order']}",
              flush=True)

    print("\n3. throughput (one model, DDIM steps as above)")
    net = nets["shared"][0]
    for bs in args.batch_sizes:
        noise = pool_noise[: max(bs, 2000)]
        start = time.perf_counter()
        sample(net, scheduler, noise, args.ddim, batch_size=bs, desc=f"batch {bs}")
        ips = len(noise) / (time.perf_counter() - start)
        result["throughput"].append({"batch_size": bs, "images_per_second": ips, "ddim_steps": args.ddim})
        print(f"batch {bs:>5}: {ips:8.1f} images/s at DDIM {args.ddim}", flush=True)
    write_json(args.out, result)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
