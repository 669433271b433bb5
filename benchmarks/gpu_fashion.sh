#!/usr/bin/env bash
# The Fashion-MNIST regime on one GPU, prepared to run in one go (budget: 8 minutes on one H100):
# configs/fashion.yaml at the native 28x28, the base trained inside the pipeline (model.pretrained_path: null,
# GPU_FASHION_BASE_STEPS steps, default 8000), all eight models and their contrasts, in a scratch copy.
# Prints each stage's seconds, the report's table and the controls' contrasts.
# Usage (from the repository root, after `make setup` and `apt-get install dataset-fashion-mnist`):
#   bash benchmarks/gpu_fashion.sh           # on CUDA; refuses to run without it
#   bash benchmarks/gpu_fashion.sh --tiny    # the same commands with the tests' tiny budget, on any device
# GPU_FASHION_KEEP=<dir>: copy reports/, controls/controls.json, metrics/ and timings/ there as fashion_run.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
tiny=0; [[ " $* " == *" --tiny "* ]] && tiny=1
if [ "$tiny" = 0 ]; then
  python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('cuda:', torch.cuda.get_device_name(0))" || exit 1
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
source benchmarks/scratch.sh
copy_to "$scratch/repo"
TINY=$tiny BASE_STEPS=${GPU_FASHION_BASE_STEPS:-8000} python - "$scratch/repo" <<'PY' || exit 1
import os, sys, yaml
sys.path.insert(0, "tests")
from dtm_core.config import overlay, parse_params
from tiny_params import tiny_params
p = overlay(yaml.safe_load(open("params.yaml")), yaml.safe_load(open("configs/fashion.yaml")))
p = overlay(p, {"data": {"image_size": 28}, "model": {"pretrained_path": None},
                "pretrain": {"steps": int(os.environ["BASE_STEPS"]), "checkpoint_every": 0},
                "evaluate": {"batch_size": 2000}})
if os.environ["TINY"] == "1":
    p = tiny_params(p)
    p = overlay(p, {"controls": {"num_samples": 40, "scales": [0.0, 1.0]}, "evaluate": {"heldout_images": 50},
                    "analysis": {"heldout_images": 50, "gradient_bins": 4}, "partition": {"affinity_images": 16}})
parse_params(p)  # a bad combination fails here, before any work
yaml.safe_dump(p, open(f"{sys.argv[1]}/params.yaml", "w"), sort_keys=False)
PY
cd "$scratch/repo" || exit 1
commit_all
start=$(date +%s)
dvc repro -q; rc=$?
echo "== dvc repro: exit $rc after $(( $(date +%s) - start )) s"
stage_seconds
[ -f reports/comparison.md ] && sed -n '/^| model/,/^$/p' reports/comparison.md
[ -f controls/controls.md ] && cat controls/controls.md
[ -n "${GPU_FASHION_KEEP:-}" ] && tar czf "$GPU_FASHION_KEEP/fashion_run.tgz" reports controls/controls.json metrics timings 2>/dev/null
exit $rc
