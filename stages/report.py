"""DVC stage report: the comparison table -> reports/comparison.{json,md}; fills the MLflow parent."""
import sys

from dtm_core import cli, pipeline

if __name__ == "__main__":
    sys.exit(cli.main(
        "report", lambda params, args, run: pipeline.report(params, run),
        sections=("seed", "partition", "finetune", "merge", "evaluate"), metrics_file=None,
    ))
