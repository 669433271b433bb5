"""DVC stage prepare: load the data source, split train/held-out -> data/prepared/."""
import sys

from dtm_core import cli, pipeline

if __name__ == "__main__":
    sys.exit(cli.main(
        "prepare", lambda params, args, run: pipeline.prepare(params, run),
        sections=("seed", "data"), metrics_file=lambda a: pipeline.METRICS_DIR / "prepare.json",
    ))
