"""DVC stage task_vectors: tau_i = theta_i - theta for every range -> task_vectors/."""
import sys

from dtm_core import cli, pipeline

if __name__ == "__main__":
    sys.exit(cli.main(
        "task_vectors", lambda params, args, run: pipeline.task_vectors(params, run),
        sections=("partition",), metrics_file=lambda a: pipeline.METRICS_DIR / "task_vectors.json",
        run_name=lambda a: "task-vectors",
    ))
