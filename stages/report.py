"""DVC stage report: the comparison table -> reports/comparison.{json,md}; fills the MLflow parent."""
import sys

from dtm_core import cli
from dtm_core.steps import report as step

if __name__ == "__main__":
    sys.exit(cli.main(
        "report", lambda params, args, run: step.report(params, run),
        sections=("seed", "partition", "finetune", "merge", "evaluate"), metrics_file=None,
    ))
