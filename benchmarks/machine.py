"""What the benchmarks share: the CPU they ran on, and the DeMe fine-tune step they time.

Importing this module puts the repository root first on ``sys.path``, so a
benchmark run as ``python benchmarks/<name>.py`` imports this checkout's
``dtm_core`` (isort places ``from machine import ...`` above first-party imports).
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DIGITS_BASE = ROOT / "base" / "digits-unet"


def cpu_model() -> str:
    """lscpu's model, family and model number: every stated time must name its CPU."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}
    flags = fields.get("Flags", "").split()
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return (f"{fields.get('Model name', 'unknown')} (family {fields.get('CPU family', '?')}, model "
            f"{fields.get('Model', '?')}; {simd}{', AMX' if 'amx_tile' in flags else ''}), "
            f"{fields.get('CPU(s)', '?')} cores")


def timing_recipe(params, **update):
    """params' fine-tune recipe without checkpoints or progress lines, which a timing must not include."""
    return params.finetune.model_copy(update={"checkpoint_every": 0, "log_every": 1000, **update})


def deme_train(student, base, scheduler, images, ft, steps: int, lo: int = 250, hi: int = 500,
               consistency_weight: float = 1.0, **kwargs):
    """train() of ``student`` as a DeMe fine-tune of range [lo, hi): probabilistic timestep sampling and the
    consistency loss to the frozen ``base``."""
    from dtm_core.partition import sample_timesteps
    from dtm_core.train import train

    T = scheduler.config.num_train_timesteps

    def draw(b, g):
        return sample_timesteps(b, lo, hi, T, ft.p, g)[0]

    return train(student, scheduler, images, ft, seed=0, steps=steps, timestep_sampler=draw, teacher=base,
                 consistency_weight=consistency_weight, **kwargs)


def timing_images(base: Path, shape: tuple[int, ...]):
    """Images to time training on: the digits for the digits base; for another base noise of its shape
    (a step's time does not depend on the pixels)."""
    import torch

    from dtm_core.data import load_digits_source

    if base.resolve() == DIGITS_BASE.resolve():
        return torch.as_tensor(load_digits_source().images)
    return torch.randn((1024, *shape), generator=torch.Generator().manual_seed(0)).clamp(-1, 1)


def publish(result: dict, out: Path | None) -> int:
    """Print a benchmark's result with the command that produced it, and write it to ``out`` when given."""
    import json

    from dtm_core.io import write_json

    result["command"] = " ".join([f"python benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    print(json.dumps(result, indent=2))
    if out:
        write_json(out, result)
    return 0
