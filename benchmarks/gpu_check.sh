#!/usr/bin/env bash
# The GPU check, prepared to run in one go on a lent GPU machine (at most ~8 minutes):
#   1. the tiny pipeline end to end on CUDA (dvc repro in a scratch copy), fp32 and bf16 fine-tunes;
#   2. training steps/s and sampling images/s on CUDA in fp32, bf16 and fp16, then the same on the CPU.
# Usage (from the repository root, after `make setup`): bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('cuda:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cp -r dtm_core stages base dvc.yaml params.yaml pyproject.toml .dvcignore .gitignore .dvc "$scratch"/
rm -rf "$scratch/.dvc/cache" "$scratch/.dvc/tmp"
python - "$scratch" <<'PY'
import sys, yaml
sys.path.insert(0, "tests")
from tiny_params import tiny_params
p = tiny_params(yaml.safe_load(open("params.yaml")))
yaml.safe_dump(p, open(f"{sys.argv[1]}/params.yaml", "w"), sort_keys=False)
PY
(cd "$scratch" && git init -q && git add -A && git -c user.email=ci@local -c user.name=ci commit -qm tiny \
  && start=$(date +%s) && dvc repro -q && echo "tiny pipeline on CUDA (fp32): $(( $(date +%s) - start )) s" \
  && start=$(date +%s) && dvc exp run -q -S finetune.mixed_precision=bf16 \
  && echo "tiny pipeline, bf16 fine-tunes: $(( $(date +%s) - start )) s" && cat reports/comparison.md | head -12)
for mp in no bf16 fp16; do
  python benchmarks/device_speed.py --mixed-precision "$mp"
done
CUDA_VISIBLE_DEVICES="" python benchmarks/device_speed.py --steps 30 --samples 2000
