"""DVC stage classifier: train the feature classifier, reference features, real-vs-real floor."""
import sys

from dtm_core import cli
from dtm_core.steps import common
from dtm_core.steps import classifier as step

if __name__ == "__main__":
    sys.exit(cli.main(
        "classifier", lambda params, args, run: step.classifier(params, run),
        sections=("seed", "evaluate"), metrics_file=lambda a: common.METRICS_DIR / "classifier.json",
    ))
