"""DVC stage pretrain: train the embedded base model, or import model.pretrained_path -> models/pretrained/."""
import sys

from dtm_core import cli
from dtm_core.steps import common
from dtm_core.steps import pretrain as step

if __name__ == "__main__":
    sys.exit(cli.main(
        "pretrain", lambda params, args, run: step.pretrain(params, run),
        sections=("seed", "model", "pretrain"), metrics_file=lambda a: common.METRICS_DIR / "pretrain.json",
    ))
