"""DVC stage prepare: load the data source, split train/held-out -> data/prepared/."""
import sys

from dtm_core import cli
from dtm_core.steps import common
from dtm_core.steps import prepare as step

if __name__ == "__main__":
    sys.exit(cli.main(
        "prepare", lambda params, args, run: step.prepare(params, run),
        sections=("seed", "data"), metrics_file=lambda a: common.METRICS_DIR / "prepare.json",
    ))
