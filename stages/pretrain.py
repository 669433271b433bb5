"""DVC stage pretrain: train the embedded base model, or import model.pretrained_path -> models/pretrained/."""
import sys

from dtm_core import cli, pipeline

if __name__ == "__main__":
    sys.exit(cli.main(
        "pretrain", lambda params, args, run: pipeline.pretrain(params, run),
        sections=("seed", "model", "pretrain"), metrics_file=lambda a: pipeline.METRICS_DIR / "pretrain.json",
    ))
