"""DVC stage merge: theta + sum_i w_i tau_i -> models/merged/."""
import sys

from dtm_core import cli, pipeline

if __name__ == "__main__":
    sys.exit(cli.main(
        "merge", lambda params, args, run: pipeline.merge(params, run),
        sections=("merge",), metrics_file=lambda a: pipeline.METRICS_DIR / "merge.json",
    ))
