"""ONNX Runtime against eager torch for the sampler's UNet call, in one run on this machine.

    pip install onnxruntime onnx    # not project dependencies: see docs/RESULTS.md
    python benchmarks/onnx_speed.py [--out docs/results/onnx_speed.json]

The shipped digits base (``base/digits-unet``), exported with
``torch.onnx.export``, one UNet forward on a batch of ``--batch`` 8x8 images
at a mid-range timestep, as the sampler calls it: one thread per stream
(``inference_map`` runs one batch per core) and two threads on one stream.
Each figure is the best of ``--repeats`` rounds of ``--calls`` forwards;
the ratio is torch time / ONNX Runtime time; the outputs' largest absolute
difference is printed beside it. Issue #36 adopts ONNX Runtime only if it
beats compiled torch (docs/results/speed.json "compile") by a clear margin.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import ROOT, cpu_model

from dtm_core.io import write_json
from dtm_core.model import load_unet


class _Eps(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t):
        return self.unet(x, t).sample


def best(fn, calls: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import onnxruntime as ort

    model = _Eps(load_unet(ROOT / "base" / "digits-unet")).eval()
    x = torch.randn(args.batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        path = Path(tmp) / "unet.onnx"
        torch.onnx.export(model, (x, t), str(path), input_names=["x", "t"], output_names=["eps"],
                          dynamic_axes={"x": {0: "batch"}, "eps": {0: "batch"}}, opset_version=17, dynamo=False)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            feed = {"x": x.numpy(), "t": t.numpy()}
            eager = best(lambda: model(x, t), args.calls, args.repeats)
            onnx = best(lambda s=session, f=feed: s.run(None, f), args.calls, args.repeats)
            diff = float(np.abs(session.run(None, feed)[0] - model(x, t).numpy()).max())
            rows[f"{threads}_threads"] = {"torch_eager_ms": eager * 1e3, "onnxruntime_ms": onnx * 1e3,
                                          "ratio": eager / onnx, "max_abs_difference": diff}
            print(f"{threads} thread(s): torch {eager * 1e3:.1f} ms, onnxruntime {onnx * 1e3:.1f} ms per forward "
                  f"of {args.batch}: {eager / onnx:.2f}x; max |diff| {diff:.2e}")
    result = {"command": "python benchmarks/onnx_speed.py", "cpu": cpu_model(), "torch": torch.__version__,
              "onnxruntime": ort.__version__, "batch": args.batch, "calls": args.calls, "repeats": args.repeats,
              "rows": rows}
    if args.out:
        write_json(args.out, result)
    else:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
