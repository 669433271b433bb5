"""The CPU a benchmark ran on, as every stated time must name it (lscpu's model, family and model number)."""

from __future__ import annotations

import platform
import subprocess


def cpu_model() -> str:
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
