"""What a LoRA range fine-tune saves against a full one: disk, training memory, speed.

Each variant (full, lora) trains the same DeMe fine-tune (channel projection,
consistency loss to the frozen base, one range's timestep sampler) for
``--steps`` steps in a fresh process, so each one's peak memory is its own.
Training memory is the peak of live tensor bytes: on CUDA
``torch.cuda.max_memory_allocated``, on the CPU the same count from the
profiler's memory events over a few more steps of a fresh copy (the profiler
slows steps, so the timing run is a separate one). The growth of the process's
peak resident set is reported beside it; on the CPU it also counts what
glibc's allocator keeps after tensors are freed (its dynamic mmap threshold),
which is how LoRA's extra short-lived tensors showed up there. The trained
model is saved as the pipeline saves it, and its weight file is measured.
The base is a fresh UNet of the configuration's model section (weights do not
change these costs); the images are random of the configuration's size.

    python benchmarks/adapter_cost.py                                # digits (params.yaml)
    python benchmarks/adapter_cost.py --config configs/fashion.yaml  # the Fashion UNet
    python benchmarks/adapter_cost.py --prompt                       # its prompt-conditioned UNet
    ... --out docs/results/adapters.json   (adds a section per configuration)

Targets (issue #35): an adapter at most 5% of a full range model on disk;
peak training memory below the full fine-tune's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import ROOT, cpu_model, deme_train, timing_recipe

PROFILED_STEPS = 4  # the live-memory count: Adam's state exists from the first step on


def _params(config: Path | None, prompt: bool = False):
    """params.yaml with ``config`` on top; with ``prompt``, the prompt-conditioned UNet of that shape."""
    from dtm_core.config import load_params

    params = load_params(ROOT / "params.yaml", config)
    if prompt:
        params = params.model_copy(update={"model": params.model.model_copy(update={"conditioning": "prompt"})})
    return params


def live_peak_bytes(train_steps) -> int:
    """The peak of live CPU tensor bytes allocated while ``train_steps()`` runs (the profiler's counter)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_steps()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")


def one(variant: str, config: Path | None, steps: int, prompt: bool) -> dict:
    """Train one variant here and measure it (run in its own process by :func:`main`)."""
    import torch

    from dtm_core.conditioning import class_prompts
    from dtm_core.data import FASHION_CLASSES, load_digits_source
    from dtm_core.model import build_prompt_unet, build_scheduler, build_unet, save_model
    from stages.finetune import trainee

    params = _params(config, prompt)
    ft = timing_recipe(params, adapter=variant)
    torch.manual_seed(0)
    if params.data.source == "digits":
        digits = load_digits_source()
        images, labels, classes = torch.as_tensor(digits.images), torch.as_tensor(digits.labels), digits.classes
    else:  # grayscale at the configured size: the costs depend on the shapes alone
        images = torch.rand(2048, 1, params.data.image_size, params.data.image_size) * 2 - 1
        labels, classes = torch.randint(0, 10, (2048,)), FASHION_CLASSES
    size, channels = images.shape[-1], images.shape[1]
    if params.model.conditioning == "prompt":  # as stages/finetune.py trains it: the labels' prompts, dropout
        base = build_prompt_unet(params.model, size, channels, class_prompts(classes),
                                 params.model.cross_attention_dim).eval()
        prompted = {"labels": labels, "prompt_dropout": ft.prompt_dropout}
    else:
        base, prompted = build_unet(params.model, size, channels).eval(), {}
    scheduler = build_scheduler(params.model)
    T = params.model.num_train_timesteps
    model = trainee(base, ft, projection=True)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    res = deme_train(model, base, scheduler, images, ft, steps, T // 4, T // 2, ft.consistency_weight, desc=variant,
                     **prompted)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if cuda:
        live = torch.cuda.max_memory_allocated()
    else:
        fresh = trainee(base, ft, projection=True)
        live = live_peak_bytes(lambda: deme_train(fresh, base, scheduler, images, ft, PROFILED_STEPS, T // 4,
                                                  T // 2, ft.consistency_weight, desc=f"{variant} (profiled)",
                                                  **prompted))
    with tempfile.TemporaryDirectory() as tmp:
        info = {"base": "unused", "channel_projection": True,
                "lora": {"rank": ft.lora.rank, "alpha": ft.lora.alpha, "targets": ft.lora.targets}}
        save_model(res.model, scheduler, Path(tmp) / "m", info)
        disk = sum(f.stat().st_size for f in (Path(tmp) / "m").glob("*.safetensors"))
    return {
        "variant": variant,
        "trained_parameters": res.model.num_parameters(only_trainable=True),
        "parameters": base.num_parameters(),
        "weights_bytes": disk,
        "training_peak_bytes": live,
        "training_peak_rss_bytes": peak - before,
        "process_peak_bytes": peak,
        "steps_per_second": steps / seconds,
        "device": "cuda" if cuda else "cpu",
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, help="a configuration on top of params.yaml (configs/fashion.yaml)")
    ap.add_argument("--prompt", action="store_true", help="the prompt-conditioned UNet (model.conditioning: prompt)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", type=Path, help="a JSON file to add this configuration's section to")
    ap.add_argument("--one", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.config, args.steps, args.prompt)))
        return
    rows = {}
    for variant in ("full", "lora"):
        cmd = [sys.executable, __file__, "--one", variant, "--steps", str(args.steps)]
        if args.config:
            cmd += ["--config", str(args.config)]
        if args.prompt:
            cmd.append("--prompt")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
        rows[variant] = json.loads(out.strip().splitlines()[-1])
    full, lora = rows["full"], rows["lora"]
    ratios = {
        "disk_lora_over_full": lora["weights_bytes"] / full["weights_bytes"],
        "training_memory_lora_over_full": lora["training_peak_bytes"] / full["training_peak_bytes"],
        "training_rss_lora_over_full": lora["training_peak_rss_bytes"] / full["training_peak_rss_bytes"],
        "step_time_lora_over_full": full["steps_per_second"] / lora["steps_per_second"],
    }
    name = str(args.config or "params.yaml") + (" + model.conditioning=prompt" if args.prompt else "")
    lora_cfg = _params(args.config).finetune.lora
    section = {"config": name, "cpu": cpu_model(), "steps": args.steps, "lora": lora_cfg.model_dump(), **rows,
               "ratios": ratios, "targets": {"disk_at_most": 0.05, "training_memory_below": 1.0},
               "command": f"python benchmarks/adapter_cost.py{' --config ' + str(args.config) if args.config else ''}"
                          f"{' --prompt' if args.prompt else ''} --steps {args.steps}"}
    for variant in ("full", "lora"):
        r = rows[variant]
        print(f"{variant:4s}: {r['trained_parameters']:>9,} trained params, "
              f"{r['weights_bytes'] / 1e6:7.3f} MB on disk, "
              f"training peak {r['training_peak_bytes'] / 2**20:6.1f} MiB live "
              f"(+{r['training_peak_rss_bytes'] / 2**20:6.1f} MiB RSS), {r['steps_per_second']:.2f} steps/s")
    print(f"lora/full: disk {ratios['disk_lora_over_full']:.3f} (target <= 0.05), training memory "
          f"{ratios['training_memory_lora_over_full']:.3f} (target < 1; "
          f"RSS {ratios['training_rss_lora_over_full']:.3f}), "
          f"step time {ratios['step_time_lora_over_full']:.3f}")
    if args.out:
        from dtm_core.io import write_json

        data = json.loads(args.out.read_text()) if args.out.is_file() else {}
        data[name] = section
        write_json(args.out, data)


if __name__ == "__main__":
    main()
