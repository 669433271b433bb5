#!/usr/bin/env bash
# The GPU check, prepared to run in one go on a lent GPU machine (about 6-8 minutes):
#   1. the tiny pipeline end to end on CUDA (dvc repro in a scratch copy), fp32, then its fine-tunes in bf16;
#   2. training steps/s and sampling images/s on CUDA in fp32, bf16 and fp16, then the same on the CPU.
#   with --default, between 1. and the rest: the default pipeline (dvc repro, shipped base) in a scratch copy, stopped after
#      GPU_CHECK_DEFAULT_TIMEOUT seconds (default 600) or at GPU_CHECK_DEADLINE (epoch seconds); prints each stage's seconds and the report's table.
# Usage (from the repository root, after `make setup`): bash benchmarks/gpu_check.sh [--default] [--no-speed]
# GPU_CHECK_KEEP=<dir>: copy the default run's reports/, metrics/ and timings/ there as default_run.tgz.
# Each part runs even when an earlier one failed; the exit status says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
if ! command -v python >/dev/null; then  # machines with only python3: the stages' commands call `python`
  mkdir -p "$scratch/.bin" && printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" >"$scratch/.bin/python"
  chmod +x "$scratch/.bin/python" && export PATH="$scratch/.bin:$PATH"
fi
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('cuda:', torch.cuda.get_device_name(0), 'torch', torch.__version__)" || exit 1
failed=0
part() {  # part <label> <command...>: run, time, and remember a failure
  local label=$1 start; shift; start=$(date +%s)
  if "$@"; then echo "== $label: ok in $(( $(date +%s) - start )) s"; else echo "== $label: FAILED after $(( $(date +%s) - start )) s"; failed=1; fi
}
source benchmarks/scratch.sh
copy_to "$scratch/repo"
python - "$scratch/repo" <<'PY'
import sys, yaml
sys.path.insert(0, "tests")
from tiny_params import tiny_params
p = tiny_params(yaml.safe_load(open("params.yaml")))
yaml.safe_dump(p, open(f"{sys.argv[1]}/params.yaml", "w"), sort_keys=False)
PY
tiny_fp32() { (cd "$scratch/repo" && commit_all && dvc repro -q && head -12 reports/comparison.md); }
tiny_bf16() { (cd "$scratch/repo" && dvc exp run -q -S finetune.mixed_precision=bf16 && head -12 reports/comparison.md); }
default_seconds() {  # GPU_CHECK_DEADLINE (epoch seconds) wins over GPU_CHECK_DEFAULT_TIMEOUT
  if [ -n "${GPU_CHECK_DEADLINE:-}" ]; then echo $(( GPU_CHECK_DEADLINE - $(date +%s) )); else echo "${GPU_CHECK_DEFAULT_TIMEOUT:-600}"; fi
}
default_run() {
  copy_to "$scratch/default"
  (cd "$scratch/default" && commit_all && timeout "$(default_seconds)" dvc repro -q; rc=$?
   stage_seconds
   [ -f reports/comparison.md ] && sed -n '/^| model/,/^$/p' reports/comparison.md
   [ -n "${GPU_CHECK_KEEP:-}" ] && tar czf "$GPU_CHECK_KEEP/default_run.tgz" reports metrics timings 2>/dev/null
   exit $rc)
}
part "tiny pipeline on CUDA (fp32)" tiny_fp32
[[ " $* " == *" --default "* ]] && part "default pipeline on CUDA (dvc repro)" default_run
part "tiny pipeline, bf16 fine-tunes (dvc exp run)" tiny_bf16
if [[ " $* " != *" --no-speed "* ]]; then
  for mp in no bf16 fp16; do
    part "device_speed CUDA $mp" python benchmarks/device_speed.py --mixed-precision "$mp"
  done
  part "device_speed CPU" env CUDA_VISIBLE_DEVICES="" python benchmarks/device_speed.py --steps 30 --samples 2000
fi
exit $failed
