"""DVC stage merge: theta + sum_i w_i tau_i -> models/merged/."""
import sys

from dtm_core import cli
from dtm_core.steps import common
from dtm_core.steps import merge as step

if __name__ == "__main__":
    sys.exit(cli.main(
        "merge", lambda params, args, run: step.merge(params, run),
        sections=("merge",), metrics_file=lambda a: common.METRICS_DIR / "merge.json",
    ))
