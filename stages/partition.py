"""DVC stage partition: the N timestep ranges over [0, T) -> partition/ranges.json."""
import sys

from dtm_core import cli
from dtm_core.steps import partition as step

if __name__ == "__main__":
    sys.exit(cli.main(
        "partition", lambda params, args, run: step.partition(params, run),
        sections=("partition", "model"), metrics_file=None,
    ))
