"""DVC stage finetune_shared: the shared-parameter baseline, N x steps on all t -> models/shared/."""
import sys

from dtm_core import cli
from dtm_core.steps import common
from dtm_core.steps import finetune as step

if __name__ == "__main__":
    sys.exit(cli.main(
        "finetune_shared", lambda params, args, run: step.finetune_shared(params, run),
        sections=("seed", "finetune", "partition"), metrics_file=lambda a: common.METRICS_DIR / "finetune_shared.json",
        run_name=lambda a: "finetune-shared",
    ))
