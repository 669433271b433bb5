"""DVC stage task_vectors: tau_i = theta_i - theta for every range -> task_vectors/."""
import sys

from dtm_core import cli
from dtm_core.steps import common
from dtm_core.steps import task_vectors as step

if __name__ == "__main__":
    sys.exit(cli.main(
        "task_vectors", lambda params, args, run: step.task_vectors(params, run),
        sections=("partition",), metrics_file=lambda a: common.METRICS_DIR / "task_vectors.json",
        run_name=lambda a: "task-vectors",
    ))
