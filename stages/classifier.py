"""DVC stage classifier: train the feature classifier, reference features, real-vs-real floor."""
import sys

from dtm_core import cli, pipeline

if __name__ == "__main__":
    sys.exit(cli.main(
        "classifier", lambda params, args, run: pipeline.classifier(params, run),
        sections=("seed", "evaluate"), metrics_file=lambda a: pipeline.METRICS_DIR / "classifier.json",
    ))
