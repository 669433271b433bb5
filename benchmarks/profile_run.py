"""Where a pipeline run's time goes, per stage and per phase, from a py-spy profile of it.

    py-spy record --format raw --rate 20 --subprocesses -o profile.txt -- dvc repro -f
    python benchmarks/profile_run.py profile.txt --rate 20 --out docs/results/profile_default.json

A stage is a ``python -m stages.<name>`` process (``evaluate@merged``, ``finetune@2``). A phase is the
outermost project function a sample was inside (``dtm_core.sampling.sample``), or ``import`` for
module loading (start-up, and lazy imports later), or the stage's own code when no library function was.
Seconds are samples over the sampling rate, summed over a process's Python threads (inference runs one
worker thread per core): thread time on the CPU, not wall time.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from collections import Counter, defaultdict
from pathlib import Path

from machine import cpu_model

from dtm_core.io import atomic_file

DISPATCH = "dtm_core.distributed."  # runs other functions on worker threads or processes: not a phase
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*):\d+\)$")


def stage_name(cmdline: str) -> str:
    """``python -m stages.evaluate --model merged`` -> ``evaluate@merged``; anything else: ``dvc and other``."""
    words = shlex.split(cmdline, posix=True) if cmdline.count('"') % 2 == 0 else cmdline.split()
    module = next((w for w in words if w.startswith("stages.")), None)
    if module is None:
        return "dvc and other"
    item = next((words[i + 1] for i, w in enumerate(words[:-1]) if w in ("--model", "--range")), None)
    return module[len("stages."):] + (f"@{item}" if item else "")


def project_name(path: str, func: str) -> str | None:
    for package in ("dtm_core", "stages"):
        marker = f"{package}/"
        if marker in path:
            module = path[path.rindex(marker):].removesuffix(".py").replace("/", ".")
            return f"{module}.{func}"
    return None


def phase(frames: list[str]) -> str:
    parsed = [m.groupdict() for m in map(FRAME.match, frames) if m]
    if any(f["func"] in ("_find_and_load", "_call_with_frames_removed") for f in parsed):
        return "import"
    names = [project_name(f["file"], f["func"]) for f in parsed]
    library = [n for n in names if n and n.startswith("dtm_core.")]
    work = [n for n in library if not n.startswith(DISPATCH)]  # a worker thread's task, not its dispatcher
    if work or library:
        return (work or library)[0]
    own = [n for n in names if n]
    return own[-1] if own else "interpreter and other"


def summarise(lines: list[str], rate: float) -> dict:
    samples: dict[str, Counter] = defaultdict(Counter)
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = stack.split(";")
        processes = [p for p in parts if p.startswith("process ")]
        frames = [p for p in parts if not p.startswith("process ") and not p.startswith("thread ")]
        cmd = processes[-1].partition(":")[2].strip('"') if processes else ""
        samples[stage_name(cmd)][phase(frames)] += int(count)
    stages = {}
    for stage, phases in sorted(samples.items(), key=lambda kv: -sum(kv[1].values())):
        stages[stage] = {"seconds": round(sum(phases.values()) / rate, 1),
                         "phases": {p: round(n / rate, 1) for p, n in phases.most_common()}}
    totals = sum(samples.values(), Counter())
    return {"total_seconds": round(sum(totals.values()) / rate, 1), "stages": stages,
            "phases": {p: round(n / rate, 1) for p, n in totals.most_common()}}


def add_wall_seconds(result: dict, timings: Path) -> None:
    """Each stage's wall seconds inside its run (``timings/<stage>.json``, imports excluded), where recorded."""
    for stage, row in result["stages"].items():
        path = timings / f"{stage}.json"
        if path.is_file():
            row["wall_seconds"] = round(json.loads(path.read_text())["stage_seconds"], 1)


def render(result: dict, top: int = 3) -> str:
    lines = ["| stage | wall s (run) | thread s | largest phases (thread s) |", "|---|---:|---:|---|"]
    for stage, row in result["stages"].items():
        largest = ", ".join(f"{p} {s:.0f}" for p, s in list(row["phases"].items())[:top])
        wall = f"{row['wall_seconds']:.0f}" if "wall_seconds" in row else ""
        lines.append(f"| {stage} | {wall} | {row['seconds']:.0f} | {largest} |")
    lines.append(f"| all | | {result['total_seconds']:.0f} | "
                 + ", ".join(f"{p} {s:.0f}" for p, s in list(result["phases"].items())[:top + 2]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, help="py-spy's --format raw output")
    parser.add_argument("--rate", type=float, required=True, help="py-spy's --rate (samples per second)")
    parser.add_argument("--command", default="py-spy record --format raw --rate 20 --subprocesses -- dvc repro -f")
    parser.add_argument("--timings", type=Path, default=Path("timings"), help="the run's stage seconds")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = {"cpu": cpu_model(), "command": args.command, "rate": args.rate,
              **summarise(args.profile.read_text().splitlines(), args.rate)}
    add_wall_seconds(result, args.timings)
    print(render(result))
    if args.out:  # not write_json: it sorts keys, and these are ordered largest first
        with atomic_file(args.out) as handle:
            handle.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
